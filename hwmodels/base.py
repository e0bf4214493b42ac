"""The cost-model interface: a layer graph and a plan in, named metrics with units out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from oaq_search.graph import LayerGraph
from oaq_search.plan import Plan


@dataclass
class CostReport:
    """Totals per metric for the whole model, and each layer's share where a metric is per layer."""

    totals: dict[str, float]
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)


class CostModel(ABC):
    """A hardware target's view of a plan. Subclass, set `name` and `units`, implement `evaluate`."""

    name: str = "abstract"
    units: dict[str, str] = {}  # metric name -> unit, e.g. {"weight_bytes": "B"}

    @abstractmethod
    def evaluate(self, graph: LayerGraph, plan: Plan) -> CostReport:
        """Every metric in `units` for `plan` on the model traced in `graph`."""

    def fingerprint(self) -> str:
        """What identifies this model's predictions; stored with studies to refuse stale resumes."""
        return f"{type(self).__module__}.{type(self).__qualname__}:{self.name}"
