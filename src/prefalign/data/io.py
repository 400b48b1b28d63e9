"""Reading rows from preference-data files, and writing JSON Lines.

Supported inputs: ``.jsonl`` files, ``.json`` files (a list of objects, or JSON Lines saved
as ``.json``), ``.parquet`` files, and folders saved with ``datasets``' ``save_to_disk``.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import DataError, DataFileNotFoundError
from .records import PreferenceRecord

SUPPORTED_FORMATS = (
    ".jsonl, .json (a list of objects or one object per line), .parquet, "
    "or a folder saved with datasets' save_to_disk"
)

_BOM = b"\xef\xbb\xbf"

# (row number, parsed row or the error that row produced)
RowItem = tuple[int, "dict | DataError"]


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(number, row)`` for each row of a data file.

    ``number`` is the 1-based line for JSON Lines and the 1-based row otherwise. Problems with
    the file itself (missing, unknown format) raise at once; problems with a row raise a
    :class:`DataError` naming it when that row is reached.
    """
    _unit, items = open_rows(path)

    def gen() -> Iterator[tuple[int, dict]]:
        for number, row in items:
            if isinstance(row, DataError):
                raise row
            yield number, row

    return gen()


def open_rows(path: str | os.PathLike) -> tuple[str, Iterator[RowItem]]:
    """Check ``path`` and return ``(unit, items)``.

    ``unit`` is ``"line"`` or ``"row"``; ``items`` yields ``(number, dict)`` or, for a row that
    could not be read (bad UTF-8, invalid JSON, not an object), ``(number, DataError)`` so that
    callers may skip it and carry on. Errors that spoil the whole file are raised.
    """
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise DataFileNotFoundError(
            f"file not found (supported: {SUPPORTED_FORMATS})", path=shown
        )
    if p.is_dir():
        return "row", _dataset_folder_rows(p, shown)
    check_regular_file(p, DataError)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "line", _jsonl_rows(_open_binary(p, shown), shown)
    if suffix == ".json":
        return _json_rows(p, shown)
    if suffix == ".parquet":
        return "row", _parquet_rows(p, shown)
    raise DataError(
        f"unsupported file type {p.suffix or '(no extension)'!r}; supported: {SUPPORTED_FORMATS}",
        path=shown,
        kind="format",
    )


# --------------------------------------------------------------------------- files


def os_error_message(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OS error on a user's path: ``PATH: cannot read: Permission denied``."""
    where = path if path is not None else (exc.filename if exc.filename is not None else "")
    reason = exc.strerror or str(exc)
    if getattr(exc, "filename2", None):
        reason = f"{reason} ({exc.filename2})"
    return f"{where}: {reason}" if where != "" else reason


def check_regular_file(p: str | os.PathLike, error: type[Exception] = DataError) -> None:
    """Raise ``error`` naming the path unless it is a regular file (or a link to one): a FIFO with
    no writer would block a reader forever, and a device or socket is no data file."""
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        raise _as_error(error, os_error_message(exc, str(p)), str(p)) from None
    if stat.S_ISREG(mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    raise _as_error(error, f"{p}: is {kind}, not a regular file; give a file", str(p), kind="not_regular")


def _as_error(error: type[Exception], message: str, path: str, kind: str = "os") -> Exception:
    if issubclass(error, DataError):
        # DataError puts the path in front itself.
        return error(message.removeprefix(f"{path}: "), path=path, kind=kind)
    return error(message)


def _open_binary(p: Path, path: str):
    try:
        return open(p, "rb")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=path, kind="os") from None


# --------------------------------------------------------------------------- JSON Lines


def _utf8_error(exc: UnicodeDecodeError, raw: bytes, path: str, line: int) -> DataError:
    bad = raw[exc.start]
    return DataError(
        f"not valid UTF-8 (byte 0x{bad:02x} at column {exc.start + 1})",
        path=path,
        line=line,
        kind="encoding",
    )


def _parse_line(raw: bytes, number: int, path: str, is_last_unterminated: bool):
    """Parse one JSON Lines line; returns a dict, a DataError, or None for a blank line."""
    if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _utf8_error(exc, raw, path, number)
    text = text.rstrip("\r\n")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if is_last_unterminated:
            return DataError(
                "truncated last line (file ends mid-record)",
                path=path,
                line=number,
                kind="truncated",
            )
        return DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=number, kind="json"
        )
    if not isinstance(value, dict):
        hint = ""
        if isinstance(value, list):
            hint = " (a JSON array on one line? save a list of objects as .json)"
        return DataError(
            f"expected a JSON object, found {type_name(value)}{hint}",
            path=path,
            line=number,
            kind="not_object",
        )
    return value


def _jsonl_rows(fh, path: str) -> Iterator[RowItem]:
    with fh:
        for number, raw in enumerate(fh, 1):
            row = _parse_line(raw, number, path, not raw.endswith(b"\n"))
            if row is not None:
                yield number, row


# --------------------------------------------------------------------------- JSON


def _json_rows(p: Path, path: str) -> tuple[str, Iterator[RowItem]]:
    with _open_binary(p, path) as fh:
        data = fh.read()
    body = data[len(_BOM):] if data.startswith(_BOM) else data
    if not body.lstrip().startswith(b"["):
        # JSON Lines saved as .json -- unless the file is one object spread over many lines.
        nonblank = [ln for ln in body.splitlines() if ln.strip()]
        if len(nonblank) > 1:
            try:
                whole = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                whole = None
            if whole is not None:
                raise DataError(
                    f"a .json file must hold a list of objects or one object per line "
                    f"(JSON Lines); found a single {type_name(whole)} over several lines",
                    path=path,
                    kind="format",
                )
        return "line", _jsonl_rows(_open_binary(p, path), path)

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = body.rfind(b"\n", 0, exc.start) + 1
        line = body.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{body[exc.start]:02x} at column {exc.start - line_start + 1})",
            path=path,
            line=line,
            kind="encoding",
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise DataError(
                "truncated JSON array (file ends mid-record)",
                path=path,
                line=exc.lineno,
                kind="truncated",
            ) from None
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})",
            path=path,
            line=exc.lineno,
            kind="json",
        ) from None

    def gen() -> Iterator[RowItem]:
        for number, row in enumerate(value, 1):
            if isinstance(row, dict):
                yield number, row
            else:
                yield number, DataError(
                    f"expected a JSON object, found {type_name(row)}",
                    path=path,
                    line=number,
                    unit="row",
                    kind="not_object",
                )

    return "row", gen()


# --------------------------------------------------------------------------- Parquet / datasets


def _clean_arrow_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("__index_level_")}


def _parquet_rows(p: Path, path: str) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"not a readable Parquet file ({exc})", path=path, kind="format") from None

    def gen() -> Iterator[RowItem]:
        number = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, _clean_arrow_row(row)

    return gen()


def _dataset_folder_rows(p: Path, path: str) -> Iterator[RowItem]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((p / m).exists() for m in markers):
        raise DataError(
            f"folder is not a dataset saved with save_to_disk (no {' / '.join(markers)}); "
            f"supported: {SUPPORTED_FORMATS}",
            path=path,
            kind="format",
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise DataError(f"could not load dataset folder ({exc})", path=path, kind="format") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(
                f"dataset has splits {splits} and none is called 'train'; "
                "save the split to use on its own",
                path=path,
                kind="format",
            )

    def gen() -> Iterator[RowItem]:
        for number, row in enumerate(ds, 1):
            yield number, _clean_arrow_row(dict(row))

    return gen()


def read_resumable_lines(path: Path) -> tuple[list[tuple[bytes, dict]], bool]:
    """For an output that is appended to and resumed (``prefalign generate``): ``([(raw line,
    parsed object)], torn)``, every complete line, and whether a torn last line (no newline at the
    end, or unparseable: a process killed while appending) was left out. A bad line before the end
    is an error. The raw lines let :func:`rewrite_lines` drop the torn one byte for byte."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    if not data:
        return [], False
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline
    torn = bool(tail.strip())
    rows: list[tuple[bytes, dict]] = []
    for number, raw in enumerate(pieces, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"not a valid JSON line ({exc}); fix or remove it before resuming",
                            path=path, line=number, kind="json") from None
        if not isinstance(obj, dict):
            raise DataError("expected a JSON object", path=path, line=number, kind="not_object")
        rows.append((raw, obj))
    return rows, torn


def rewrite_lines(path: Path, raw_lines: list[bytes]) -> None:
    """Replace ``path`` with these lines, atomically (see :class:`atomic_writer`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as fh:
        fh.write("".join(raw.decode("utf-8") + "\n" for raw in raw_lines))


# --------------------------------------------------------------------------- writing


def record_to_dict(record: PreferenceRecord | dict) -> dict:
    """A record as a plain dict: None fields, an empty ``meta`` and ``source`` are dropped."""
    if isinstance(record, dict):
        return dict(record)
    out: dict[str, Any] = {}
    for f in fields(record):
        if f.name == "source":
            continue
        value = getattr(record, f.name)
        if value is None or (f.name == "meta" and not value):
            continue
        out[f.name] = value
    return out


def write_jsonl(
    path: str | os.PathLike,
    records_or_dicts: Iterable[PreferenceRecord | dict],
    append: bool = False,
) -> int:
    """Write one JSON object per line (UTF-8, ``ensure_ascii=False``); returns the count written.

    Without ``append`` the file is written atomically: to a temporary file next to it, renamed
    over ``path`` only once complete, so a crash or a bad row never leaves it half-written.
    With ``append=True`` rows are added to the end; if the file ends mid-line (an interrupted
    write) a newline is added first so the new rows are not glued onto it.
    """
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)

    def write(fh) -> int:
        n = 0
        for item in records_or_dicts:
            row = record_to_dict(item)
            try:
                line = json.dumps(row, ensure_ascii=False, allow_nan=False)
            except ValueError as exc:
                raise ValueError(f"cannot write row {n + 1} to {path} as JSON: {exc}") from None
            fh.write(line + "\n")
            n += 1
        return n

    if not append:
        with atomic_writer(p) as fh:
            return write(fh)
    needs_newline = False
    if p.exists() and p.stat().st_size > 0:
        with open(p, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            needs_newline = fh.read(1) != b"\n"
    with open(p, "a", encoding="utf-8", newline="\n") as fh:
        if needs_newline:
            fh.write("\n")
        n = write(fh)
        fh.flush()
    return n


class atomic_writer:
    """``with atomic_writer(path) as fh: fh.write(...)``: text goes to a temporary file in the same
    folder, which replaces ``path`` (``os.replace``) only when the block ends without an error;
    on an error the temporary file is removed and ``path`` is left as it was."""

    def __init__(self, path: str | os.PathLike, encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.encoding = encoding

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
        self.fh = os.fdopen(fd, "w", encoding=self.encoding, newline="\n")
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
            if exc_type is None:
                os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import (os.umask can only be read by setting it)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :class:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(text)


def type_name(value: Any) -> str:
    """JSON-style name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__
