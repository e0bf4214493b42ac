"""From bit-widths to complete plans: OAQ's (s, T) chosen per layer and bit-width, data-free."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from .graph import LayerGraph
from .oaq import WeightQuantizer, choose_outlier_settings
from .plan import LayerPlan, Plan


class PlanFactory:
    """Per-layer weight bits -> a Plan, each layer's (s, T) picked by `choose_outlier_settings` once."""

    def __init__(self, model_name: str, model: nn.Module, graph: LayerGraph, method: str = "oaq",
                 grid: str = "uniform", per_channel: bool = False):
        self.model_name, self.graph = model_name, graph
        self.method, self.grid, self.per_channel = method, grid, per_channel
        modules = dict(model.named_modules())
        self._weights = {name: modules[name].weight.detach() for name in graph.names}
        self._settings: dict[tuple[str, int], WeightQuantizer] = {}

    def settings(self, layer: str, bits: int) -> WeightQuantizer:
        key = (layer, bits)
        if key not in self._settings:
            base = WeightQuantizer(bits, self.grid, self.method, per_channel=self.per_channel)
            self._settings[key] = choose_outlier_settings(self._weights[layer], base)
        return self._settings[key]

    def __call__(self, weight_bits: Mapping[str, int], activation_bits: Mapping[str, int] | None = None,
                 tie_groups: Mapping[str, int] | None = None) -> Plan:
        layers = []
        for name in self.graph.names:
            chosen = self.settings(name, weight_bits[name])
            layers.append(LayerPlan(name, chosen.bits, (activation_bits or {}).get(name), chosen.grid, chosen.method,
                                    chosen.scale_factor, chosen.threshold, chosen.per_channel,
                                    tie_group=(tie_groups or {}).get(name)))
        return Plan(self.model_name, layers)

    def uniform(self, weight_bits: int, activation_bits: int | None = None, first_last_bits: int | None = 8) -> Plan:
        """Every layer at `weight_bits` (and `activation_bits`), the first and last at `first_last_bits`."""
        ends = {self.graph.names[0], self.graph.names[-1]} if first_last_bits is not None else set()
        weights = {n: first_last_bits if n in ends else weight_bits for n in self.graph.names}
        activations = None if activation_bits is None else {
            n: max(first_last_bits, activation_bits) if n in ends else activation_bits for n in self.graph.names}
        return self(weights, activations)
