"""The only ways user code is imported: an installed entry point, or a `module:attribute` the user names."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .errors import UserError


def import_named(spec: str, what: str) -> Any:
    """The object at `module:attribute`; `what` says what it is for in the one-line error."""
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise UserError(f"{what} {spec!r} cannot be loaded: {error}") from None


def entry_point_object(group: str, name: str) -> Any | None:
    """The object an installed package registered as `name` in entry-point `group`, or None."""
    for entry_point in entry_points(group=group, name=name):
        return entry_point.load()
    return None


def entry_point_names(group: str) -> list[str]:
    return sorted(entry_point.name for entry_point in entry_points(group=group))
