"""Hardware cost models for oaq-search, and the registry that finds them by name.

A cost model is found by built-in name, by the Python entry-point group `oaq_search.hwmodels`
(how an installed plugin registers its accelerator), or by `module:attribute` naming a class or
instance that the user points at explicitly. Nothing else is imported.
"""

from __future__ import annotations

from oaq_search.errors import UserError
from oaq_search.plugins import entry_point_names, entry_point_object, import_named

from .base import CostModel, CostReport
from .memory import MemoryModel, TernaryPackedMemoryModel
from .shift import ShiftModel
from .target import TARGETS_DIR, TargetModel, load_target

ENTRY_POINT_GROUP = "oaq_search.hwmodels"
BUILTIN = {model.name: model for model in (MemoryModel, TernaryPackedMemoryModel, ShiftModel)}
TARGET_PREFIX = "target:"  # "target:path/to/table.toml" loads a table file the user names

__all__ = ["CostModel", "CostReport", "MemoryModel", "ShiftModel", "TargetModel", "TernaryPackedMemoryModel",
           "available", "get_cost_model", "load_target"]


def available() -> list[str]:
    """Names a study file can use: built-ins, shipped target tables, then installed plugins."""
    targets = sorted(path.stem for path in TARGETS_DIR.glob("*.toml"))
    plugins = entry_point_names(ENTRY_POINT_GROUP)
    return list(BUILTIN) + targets + [name for name in plugins if name not in BUILTIN and name not in targets]


def get_cost_model(spec: str | CostModel) -> CostModel:
    """A cost model from a name, a shipped target, `target:FILE`, an entry point, `module:attribute`,
    or an instance."""
    if isinstance(spec, CostModel):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec.startswith(TARGET_PREFIX):
        return TargetModel(spec.removeprefix(TARGET_PREFIX))
    if (TARGETS_DIR / f"{spec}.toml").is_file():
        return TargetModel(spec)
    if ":" in spec:
        return _instantiate(import_named(spec, "cost model"), spec)
    plugin = entry_point_object(ENTRY_POINT_GROUP, spec)
    if plugin is not None:
        return _instantiate(plugin, spec)
    raise UserError(f"unknown cost model {spec!r}: use one of {', '.join(available())} or module:attribute")


def _instantiate(target: object, spec: str) -> CostModel:
    model = target() if isinstance(target, type) else target
    if not isinstance(model, CostModel):
        raise UserError(f"cost model {spec!r} is a {type(model).__name__}, not a hwmodels.CostModel")
    return model
