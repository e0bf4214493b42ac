"""Hardware cost models for oaq-search, and the registry that finds them by name.

A cost model is found by built-in name, by the Python entry-point group `oaq_search.hwmodels`
(how an installed plugin registers its accelerator), or by `module:attribute` naming a class or
instance that the user points at explicitly. Nothing else is imported.
"""

from __future__ import annotations

from oaq_search.registry import Registry

from .base import CostModel, CostReport
from .memory import MemoryModel, TernaryPackedMemoryModel
from .shift import ShiftModel
from .target import TARGETS_DIR, TargetModel, load_target

ENTRY_POINT_GROUP = "oaq_search.hwmodels"
COST_MODELS = Registry("cost model", CostModel, ENTRY_POINT_GROUP,
                       other_names=lambda: sorted(path.stem for path in TARGETS_DIR.glob("*.toml")))
for _builtin in (MemoryModel, TernaryPackedMemoryModel, ShiftModel):
    COST_MODELS.register(_builtin.name)(_builtin)
TARGET_PREFIX = "target:"  # "target:path/to/table.toml" loads a table file the user names

__all__ = ["COST_MODELS", "CostModel", "CostReport", "MemoryModel", "ShiftModel", "TargetModel", "TernaryPackedMemoryModel",
           "available", "get_cost_model", "load_target"]


def available() -> list[str]:
    """Names a study file can use: built-ins, shipped target tables, then installed plugins."""
    return COST_MODELS.names()


def get_cost_model(spec: str | CostModel) -> CostModel:
    """A cost model from a name, a shipped target, `target:FILE`, an entry point, `module:attribute`,
    or an instance."""
    if isinstance(spec, str) and spec.startswith(TARGET_PREFIX):
        return TargetModel(spec.removeprefix(TARGET_PREFIX))
    if isinstance(spec, str) and spec not in COST_MODELS.builtin and (TARGETS_DIR / f"{spec}.toml").is_file():
        return TargetModel(spec)
    return COST_MODELS.get(spec)
