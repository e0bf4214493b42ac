"""Bit-shift friendliness: which layers requantize by shifts alone, and what the rest costs.

A layer needs no multiplier when its weights sit on a power-of-two grid (PoT, IPoT as 1 - 2^-j)
or its scale is a power of two (`scale_format = "pow2"`): rescaling is then a shift.
"""

from __future__ import annotations

from oaq_search.graph import LayerGraph
from oaq_search.plan import LayerPlan, Plan

from .base import CostModel, CostReport

SHIFT_GRIDS = ("pot", "ipot")


def needs_multiplier(layer: LayerPlan) -> bool:
    return layer.grid not in SHIFT_GRIDS and layer.scale_format != "pow2"


def shift_metrics(graph: LayerGraph, plan: Plan, penalty_per_layer: float = 1.0) -> dict[str, float]:
    """Share of MACs needing no multiplier, layers needing one, and their penalty (per layer)."""
    multiply = [layer for layer in plan.layers if needs_multiplier(layer)]
    total_macs = sum(graph.info(layer.name).macs for layer in plan.layers) or 1
    shift_macs = total_macs - sum(graph.info(layer.name).macs for layer in multiply)
    return {"shift_mac_share": shift_macs / total_macs, "multiply_layers": float(len(multiply)),
            "multiply_penalty": penalty_per_layer * len(multiply)}


class ShiftModel(CostModel):
    """The bit-shift metrics alone, for budgets like `multiply_layers`."""

    name = "shift"
    units = {"shift_mac_share": "fraction", "multiply_layers": "layers", "multiply_penalty": "penalty"}

    def evaluate(self, graph: LayerGraph, plan: Plan) -> CostReport:
        plan.check_against(graph)
        per_layer = {layer.name: {"multiply_penalty": float(needs_multiplier(layer))} for layer in plan.layers}
        return CostReport(shift_metrics(graph, plan), per_layer)
