"""Shared handling of typed configs: reading a YAML file into a mapping, and turning pydantic's
validation errors into one line per problem that names the file and the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

# A model-level check says "field: problem"; the field then belongs in the location.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\-]*): (.+)$", re.DOTALL)


def one_of(names) -> str:
    """A registry's names for help texts: ``a, b or c``."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def validation_messages(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":  # allow_inf_nan=False
            message = f"must be a finite number, found {e.get('input')!r}"
        found = _FIELD_PREFIX.match(message)
        if found and e["type"] == "value_error":
            loc.append(found.group(1))
            message = found.group(2)
        where = ".".join([*([prefix] if prefix else []), *loc]) or "(config)"
        lines.append(f"{source}: field '{where}': {message}")
    return "\n".join(lines)


def read_yaml_mapping(path: str | Path, error: type[Exception], *, section: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file (or its ``section:`` sub-mapping when it has one); problems
    raise ``error`` with the path in the message."""
    from prefalign.data.io import check_regular_file, os_error_message

    p = Path(path)
    if not p.exists():
        raise error(f"{path}: config file not found")
    check_regular_file(p, error)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {os_error_message(exc, '').removeprefix(': ')}") from None
    except UnicodeDecodeError as exc:
        line = text_line(exc.object, exc.start)
        raise error(f"{path}:{line}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(yaml_error_message(exc, path)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{path}: top level must be a mapping of field: value")
    if section and isinstance(loaded.get(section), dict):
        return dict(loaded[section])
    return loaded


def text_line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def yaml_error_message(exc: yaml.YAMLError, path: str | Path) -> str:
    """One line: ``run.yaml:3: not valid YAML: mapping values are not allowed here (column 7)``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    what = " ".join(str(what).split())
    if mark is None:
        return f"{path}: not valid YAML: {what}"
    return f"{path}:{mark.line + 1}: not valid YAML: {what} (column {mark.column + 1})"
