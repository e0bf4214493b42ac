"""The cost-model interface: a layer graph and a plan in, named metrics with units out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from oaq_search.graph import LayerGraph
from oaq_search.plan import LayerPlan, Plan, packing_for


@dataclass
class CostReport:
    """Totals per metric for the whole model, and each layer's share where a metric is per layer."""

    totals: dict[str, float]
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)


class CostModel(ABC):
    """A hardware target's view of a plan. Subclass, set `name` and `units`, implement `evaluate`."""

    name: str = "abstract"
    units: dict[str, str] = {}  # metric name -> unit, e.g. {"weight_bytes": "B"}
    code_packing: str = "fields"  # how the target stores 2-bit (ternary) codes: "fields" or "base3" (packing.py)

    @abstractmethod
    def evaluate(self, graph: LayerGraph, plan: Plan) -> CostReport:
        """Every metric in `units` for `plan` on the model traced in `graph`."""

    def legal_bits(self, op_type: str, kind: str) -> list[int] | None:
        """Bit-widths this target runs for `op_type` ("conv2d", "linear"); kind is "weight_bits" or
        "activation_bits". None: anything from 2 to 8."""
        return None

    def evaluate_many(self, graph: LayerGraph, weight_bits: np.ndarray,
                      activation_bits: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Totals for many plans at once: row p of `weight_bits` (plans x layers, graph order) is a plan.

        This default loops over `evaluate`; models with additive metrics override it with array math.
        """
        rows = []
        for index, bits in enumerate(np.asarray(weight_bits)):
            acts = None if activation_bits is None else np.asarray(activation_bits)[index]
            layers = [LayerPlan(name, int(b), None if acts is None else int(acts[i]),
                                code_packing=packing_for(self.code_packing, int(b)))
                      for i, (name, b) in enumerate(zip(graph.names, bits))]
            rows.append(self.evaluate(graph, Plan("batch", layers)).totals)
        return {metric: np.array([row[metric] for row in rows]) for metric in rows[0]}

    def fingerprint(self) -> str:
        """What identifies this model's predictions; stored with studies to refuse stale resumes."""
        return f"{type(self).__module__}.{type(self).__qualname__}:{self.name}"
