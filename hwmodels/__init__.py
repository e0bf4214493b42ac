"""Hardware cost models for oaq-search, and the registry that finds them by name.

A cost model is found by built-in name, by the Python entry-point group `oaq_search.hwmodels`
(how an installed plugin registers its accelerator), or by `module:attribute` naming a class or
instance that the user points at explicitly. Nothing else is imported.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from oaq_search.errors import UserError

from .base import CostModel, CostReport
from .memory import MemoryModel

ENTRY_POINT_GROUP = "oaq_search.hwmodels"
BUILTIN = {MemoryModel.name: MemoryModel}

__all__ = ["CostModel", "CostReport", "MemoryModel", "available", "get_cost_model"]


def available() -> list[str]:
    """Names a study file or --hw option can use: built-ins, then installed plugins."""
    return list(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN)


def get_cost_model(spec: str | CostModel) -> CostModel:
    """A cost model from a name, an entry point, a `module:attribute` path, or an instance."""
    if isinstance(spec, CostModel):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise UserError(f"cost model {spec!r} cannot be loaded: {error}") from None
        return _instantiate(target, spec)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP, name=spec):
        return _instantiate(entry_point.load(), spec)
    raise UserError(f"unknown cost model {spec!r}: use one of {', '.join(available())} or module:attribute")


def _instantiate(target: object, spec: str) -> CostModel:
    model = target() if isinstance(target, type) else target
    if not isinstance(model, CostModel):
        raise UserError(f"cost model {spec!r} is a {type(model).__name__}, not a hwmodels.CostModel")
    return model
