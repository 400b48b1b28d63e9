"""Errors raised while reading and validating preference data."""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """A problem with a data file, pointing at the file, the line (or row) and the field.

    ``line`` is the 1-based line number for JSON Lines files and the 1-based row number for
    JSON arrays, Parquet files and ``datasets`` folders (``unit`` is then ``"row"`` and the
    message says "row"). ``str()`` gives e.g. ``data.jsonl:17: field 'chosen': response is empty``
    or ``data.parquet: row 17: field 'chosen': response is empty``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
        kind: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.unit = unit
        self.kind = kind
        super().__init__(self._format())

    @property
    def location(self) -> str:
        """``file:line``, ``file: row N`` or just ``file`` (empty when there is no path)."""
        return format_location(self.path, self.line, self.unit)

    def _format(self) -> str:
        parts = []
        if self.location:
            parts.append(self.location)
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # keep pickling (e.g. across DataLoader workers) working
        return (
            _rebuild,
            (self.__class__, self.message, self.path, self.line, self.field, self.unit, self.kind),
        )


def _rebuild(cls, message, path, line, field, unit, kind):
    return cls(message, path=path, line=line, field=field, unit=unit, kind=kind)


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data file or folder does not exist (both a DataError and a FileNotFoundError)."""

    def __init__(self, message: str, *, path=None, **kwargs) -> None:
        DataError.__init__(self, message, path=path, kind="not_found", **kwargs)


def format_location(path: str | None, line: int | None, unit: str = "line") -> str:
    if path is None:
        return "" if line is None else f"{unit} {line}"
    if line is None:
        return path
    if unit == "line":
        return f"{path}:{line}"
    return f"{path}: {unit} {line}"
