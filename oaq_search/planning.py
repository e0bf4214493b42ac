"""From per-layer settings (weight bits, grid, input bits) to complete plans: OAQ's (s, T) chosen
once per layer, bit-width and grid.

Without calibration images the choice is data-free (weight MSE); with them, it minimises the
layer's output error on those images (see `oaq.choose_outlier_settings_by_output`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cache import cache_file
from .errors import UserError
from .files import write_text_atomically
from .graph import LayerGraph
from .grids import FLOAT_INPUT_BITS
from .oaq import (
    REVISION,
    SCALE_FACTOR_CANDIDATES,
    THRESHOLD_MULTIPLIERS,
    WeightQuantizer,
    choose_outlier_settings,
    choose_outlier_settings_by_output,
)
from .observe import observe_inputs
from .plan import LayerPlan, Plan, packing_for

OUTPUT_ERROR_IMAGES = 32  # calibration images whose layer inputs score (s, T) candidates
STORED_INPUT_VALUES = 50_000_000  # at most this many input values kept (200 MB): fewer images for large inputs


@dataclass(frozen=True)
class Setting:
    """What the search chooses for a layer (its whole tie group): weight bits, their grid and the
    input's bits (FLOAT_INPUT_BITS: left float); None: the factory's default for the layer."""

    weight_bits: int
    grid: str | None = None
    activation_bits: int | None = None


class PlanFactory:
    """Per-layer settings -> a Plan, each layer's (s, T) picked once per bit-width and grid, and cached.

    `cache_dir` (e.g. "default", see `oaq_search.cache`) keeps the choices made on calibration images
    on disk, keyed by the weights and those images: the next run on the same model reads them."""

    def __init__(self, model_name: str, model: nn.Module, graph: LayerGraph, method: str = "oaq",
                 grid: str = "uniform", per_channel: bool = False, calibration: torch.Tensor | None = None,
                 activation_bits: Mapping[str, int] | None = None, code_packing: str = "fields",
                 cache_dir: str | Path | None = None):
        self.model_name, self.graph = model_name, graph
        self.code_packing = code_packing  # how the cost model's target stores ternary codes
        self.activation_bits = activation_bits  # per layer, for plans that do not say otherwise
        self.method, self.grid, self.per_channel = method, grid, per_channel
        modules = dict(model.named_modules())
        self._weights = {name: modules[name].weight.detach() for name in graph.names}
        self._quantizers: dict[tuple[str, int, str], WeightQuantizer] = {}
        self._output_errors, self._stored_choices, self._unsaved = None, None, False
        if calibration is not None and method != "vanilla":
            images = _output_error_images(graph, calibration)
            self._output_errors = _output_error_functions(model, graph, images)
            self._stored_choices = cache_file(cache_dir, {**self._weights, "calibration images": images}, {
                "method": method, "per_channel": per_channel, "version": 1, "quantizer": REVISION,
                "candidates": [SCALE_FACTOR_CANDIDATES, THRESHOLD_MULTIPLIERS]}, prefix="outliers-")
            self._read_choices()

    def weight_quantizer(self, layer: str, bits: int, grid: str | None = None) -> WeightQuantizer:
        """The layer's quantizer at `bits` on `grid` (default: the factory's), its (s, T) chosen once."""
        key = (layer, bits, grid or self.grid)
        if key not in self._quantizers:
            base = WeightQuantizer(bits, key[2], self.method, per_channel=self.per_channel)
            if self._output_errors is None:
                self._quantizers[key] = choose_outlier_settings(self._weights[layer], base)
            else:
                self._quantizers[key] = choose_outlier_settings_by_output(self._weights[layer], base,
                                                                        self._output_errors[layer])
                self._unsaved = self._stored_choices is not None
        return self._quantizers[key]

    def _read_choices(self) -> None:
        """The stored choices, each validated as a WeightQuantizer; a file that does not parse is ignored
        (the choices are made again and the file replaced)."""
        if self._stored_choices is None or not self._stored_choices.is_file():
            return
        try:
            for key, (scale_factor, threshold) in json.loads(self._stored_choices.read_text()).items():
                layer, bits, grid = key.rsplit("|", 2)
                self._quantizers[layer, int(bits), grid] = WeightQuantizer(
                    int(bits), grid, self.method, scale_factor, threshold, self.per_channel)
        except (ValueError, TypeError, UserError):
            self._quantizers.clear()

    def _write_choices(self) -> None:
        choices = {f"{layer}|{bits}|{grid}": [q.scale_factor, q.threshold]
                   for (layer, bits, grid), q in self._quantizers.items()}
        write_text_atomically(self._stored_choices, json.dumps(choices) + "\n")
        self._unsaved = False

    def __call__(self, weight_bits: Mapping[str, int], activation_bits: Mapping[str, int] | None = None,
                 tie_groups: Mapping[str, int] | None = None, grids: Mapping[str, str] | None = None) -> Plan:
        """A plan with these per-layer weight bits; input bits and grids where given, else the defaults."""
        activation_bits = {**(self.activation_bits or {}), **(activation_bits or {})}
        layers = []
        for name in self.graph.names:
            chosen = self.weight_quantizer(name, weight_bits[name], (grids or {}).get(name))
            inputs = activation_bits.get(name)
            layers.append(LayerPlan(name, chosen.bits, None if inputs == FLOAT_INPUT_BITS else inputs, chosen.grid,
                                    chosen.method, chosen.scale_factor, chosen.threshold, chosen.per_channel,
                                    code_packing=packing_for(self.code_packing, chosen.bits, chosen.grid),
                                    tie_group=(tie_groups or {}).get(name)))
        if self._unsaved:
            self._write_choices()
        return Plan(self.model_name, layers, list(self.graph.float_layers))

    def from_settings(self, settings: Mapping[str, Setting], tie_groups: Mapping[str, int] | None = None) -> Plan:
        """A plan from every layer's `Setting`."""
        return self({name: s.weight_bits for name, s in settings.items()},
                    {name: s.activation_bits for name, s in settings.items() if s.activation_bits is not None},
                    tie_groups, {name: s.grid for name, s in settings.items() if s.grid is not None})

    def uniform(self, weight_bits: int, activation_bits: int | None = None, first_last_bits: int | None = 8) -> Plan:
        """Every layer at `weight_bits` (and `activation_bits`), the first and last at `first_last_bits`."""
        ends = end_layers(self.graph, first_last_bits)
        weights = {n: first_last_bits if n in ends else weight_bits for n in self.graph.names}
        return self(weights, uniform_activation_bits(self.graph, activation_bits, first_last_bits))


def end_layers(graph: LayerGraph, first_last_bits: int | None) -> set[str]:
    """The first layers (every one reading the model's input, as a stem's branches do) and the last,
    when they are pinned (first_last_bits set), else none."""
    if first_last_bits is None:
        return set()
    image = graph.info(graph.names[0]).input_tensor
    return {name for name in graph.names if graph.info(name).input_tensor == image} | {graph.names[-1]}


def uniform_activation_bits(graph: LayerGraph, bits: int | None, first_last_bits: int | None) -> dict[str, int] | None:
    """`bits` for every layer's input, at least `first_last_bits` for the pinned ends (the image input)."""
    if bits is None:
        return None
    ends = end_layers(graph, first_last_bits)
    return {n: max(first_last_bits, bits) if n in ends else bits for n in graph.names}


def _output_error_images(graph: LayerGraph, calibration: torch.Tensor) -> torch.Tensor:
    """The calibration images (s, T) are chosen on: every layer's inputs on them are kept, so their count
    is capped to bound that memory."""
    per_image = sum(math.prod(graph.info(name).input_shape) for name in graph.names)
    return calibration[:max(1, min(OUTPUT_ERROR_IMAGES, STORED_INPUT_VALUES // per_image))]


def _output_error_functions(model: nn.Module, graph: LayerGraph, images: torch.Tensor) -> dict[str, Callable]:
    """Per layer, stacked weight errors (K, *weight) -> K squared output errors on the layer's FP inputs."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    observe_inputs(model, {name: modules[name] for name in graph.names}, images,
                   lambda name, module, x: inputs.__setitem__(name, x))
    return {name: partial(_output_errors, getattr(modules[name], "layer", modules[name]), inputs[name])
            for name in graph.names}  # a QuantizedLayer's own Conv2d/Linear


def _output_errors(layer: nn.Module, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    count = len(deltas)
    if isinstance(layer, nn.Linear):
        return F.linear(x, deltas.flatten(0, 1)).unflatten(-1, (count, -1)).square().sum(dim=(0, 2))
    if layer.groups == 1:  # all candidates as one convolution with count x the output channels
        return layer._conv_forward(x, deltas.flatten(0, 1), None).unflatten(1, (count, -1)).square().sum(dim=(0, 2, 3, 4))
    return torch.stack([layer._conv_forward(x, delta, None).square().sum() for delta in deltas])
