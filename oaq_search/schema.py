"""Typed dataclasses from parsed JSON/TOML: every key checked, nothing executed.

One small validator serves plans and study files alike, so a wrong key or type gets the same
one-line error everywhere: which file, which key, what was expected, what was found.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")
_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def parse(cls: type[T], data: Any, source: str, path: str = "") -> T:
    """Build dataclass `cls` from a mapping. `source` names the file, `path` the key within it."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {_key(path) or 'the top level'} must be a table, got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown key {_key(path, unknown[0])} (allowed here: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, source, _dotted(path, name)) for name, value in data.items()}
    for name, field in fields.items():
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{source}: missing required key {_key(path, name)}")
    try:
        return cls(**values)
    except UserError as error:
        raise UserError(f"{source}: {_key(path) + ' ' if path else ''}{error}") from None


def read_document(path: str | Path, what: str, format: str | None = None) -> Any:
    """Parsed JSON or TOML from `path` (`format`, else by suffix: .json is JSON, the rest TOML);
    `what` names the file in errors."""
    path = Path(path)
    is_json = format == "json" or (format is None and path.suffix == ".json")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder: name the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not text: name the {'JSON' if is_json else 'TOML'} file") from None
    except OSError as error:
        raise UserError(f"{what} {path} cannot be read: {error.strerror or error}") from None
    try:
        return json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{what} {path} is not valid {'JSON' if is_json else 'TOML'}: {error}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a {what}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/TOML-ready data; None values dropped (TOML has no null)."""
    return _drop_none(dataclasses.asdict(obj))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _coerce(option, value, source, path)
            except UserError:
                pass
        return _coerce(options[-1], value, source, path)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: key {_key(path)} must be a list, got {value!r}")
        return [_coerce(args[0], item, source, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: key {_key(path)} must be a table, got {value!r}")
        return {str(k): _coerce(args[1], v, source, _dotted(path, str(k))) for k, v in value.items()}
    if hint is float and type(value) is int:
        return float(value)
    if hint in _EXPECTED:
        if type(value) is not hint:
            raise UserError(f"{source}: key {_key(path)} must be {_EXPECTED[hint]}, got {value!r}")
        return value
    raise TypeError(f"schema cannot parse {hint!r} at {path}")  # a bug in a dataclass, not user input


def _dotted(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key(path: str, name: str | None = None) -> str:
    full = _dotted(path, name) if name else path
    return f"'{full}'" if full else ""
