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


def validation_messages(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        message = e["msg"].removeprefix("Value error, ")
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
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{path}: top level must be a mapping of field: value")
    if section and isinstance(loaded.get(section), dict):
        return dict(loaded[section])
    return loaded
