"""Crash-tolerant JSON Lines helpers for the resumable outputs of ``prefalign generate``.

A process killed while appending leaves at most one torn line, at the end of the file: it is
detected here and dropped (the file is rewritten atomically: temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefalign.data.errors import DataError


def read_lines(path: Path) -> tuple[list[tuple[bytes, dict]], bool]:
    """``([(raw line, parsed object)], torn)``: every complete line, and whether a torn last line
    (no newline at the end, or unparseable) was left out. A bad line before the end is an error."""
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


def rewrite(path: Path, raw_lines: list[bytes]) -> None:
    """Replace ``path`` with these lines, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for raw in raw_lines:
                fh.write(raw + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
