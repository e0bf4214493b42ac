"""The per-layer bit plan: a versioned, JSON round-tripping dataclass, validated on load."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .choices import CODE_PACKINGS
from .errors import UserError
from .files import write_text_atomically
from .graph import LayerGraph
from .grids import check_bits, is_ternary
from .oaq import WeightQuantizer
from .schema import parse, read_document, to_dict

PLAN_SCHEMA_VERSION = 1
SCALE_FORMATS = ("float32", "pow2")
TERNARY_BITS = 2  # 2-bit codes of the mid-tread grids are ternary (-1, 0, 1), so base3 can pack them


def check_code_packing(packing: str, bits: int, grid: str = "uniform") -> str:
    if packing not in CODE_PACKINGS:
        raise UserError(f"code_packing must be one of {', '.join(CODE_PACKINGS)}, got {packing!r}")
    if packing == "base3" and not is_ternary(grid, bits):
        raise UserError(f"code_packing 'base3' holds ternary codes only (2 bits, a grid with zero), not {bits}-bit "
                        f"{grid} ones: use 'fields'")
    return packing


def packing_for(code_packing: str, weight_bits: int, grid: str = "uniform") -> str:
    """A layer's packing where ternary codes are packed `code_packing`: other codes are always fields."""
    return code_packing if is_ternary(grid, weight_bits) else "fields"


@dataclass(frozen=True)
class LayerPlan:
    """One layer's quantization: weight bits and OAQ settings, optional input activation bits."""

    name: str
    weight_bits: int
    activation_bits: int | None = None  # None: activations stay full precision
    grid: str = "uniform"
    method: str = "oaq"
    scale_factor: float = 1.0  # OAQ's s
    threshold: float | None = None  # OAQ's T in sigma units; None: the Gaussian default for the bits
    per_channel: bool = False
    scale_format: str = "float32"
    code_packing: str = "fields"  # "base3": 2-bit layers' ternary codes five to a byte (packing.py)
    activation_range: list[float] | None = None  # [low, high] of the input, e.g. learned; None: calibrate
    tie_group: int | None = None
    cost: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.weight_quantizer()  # validates bits, grid, method, s, T
        if self.activation_bits is not None:
            check_bits(self.activation_bits, "activation_bits")
        if self.activation_range is not None:
            bounds = self.activation_range
            if not (len(bounds) == 2 and bounds[1] > 0 and bounds[0] in (0.0, -bounds[1])):
                raise UserError(f"layer {self.name}: activation_range must be [0, high] or [-high, high] with "
                                f"high > 0, got {self.activation_range}")
        check_code_packing(self.code_packing, self.weight_bits, self.grid)
        if self.scale_format not in SCALE_FORMATS:
            raise UserError(f"scale_format must be one of {', '.join(SCALE_FORMATS)}, got {self.scale_format!r}")

    def summary(self) -> str:
        """Bits in brief: "w4" (float input), "w4a8", with the grid when not uniform ("w2a8 midrise")."""
        inputs = "" if self.activation_bits is None else f"a{self.activation_bits}"
        return f"w{self.weight_bits}{inputs}" + ("" if self.grid == "uniform" else f" {self.grid}")

    def weight_quantizer(self) -> WeightQuantizer:
        return WeightQuantizer(self.weight_bits, self.grid, self.method, self.scale_factor, self.threshold,
                               self.per_channel)


@dataclass
class Plan:
    """Every quantized layer of one model, cost totals per metric, and where the plan came from."""

    model: str
    layers: list[LayerPlan]
    float_layers: list[str] = field(default_factory=list)  # convolutions and linears kept in full precision
    totals: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise UserError(f"plan schema_version {self.schema_version} is not supported (this version reads "
                            f"{PLAN_SCHEMA_VERSION}): re-export the plan")
        names = [layer.name for layer in self.layers]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise UserError(f"layer {duplicated[0]} appears more than once in the plan")

    @classmethod
    def uniform(cls, model: str, graph: LayerGraph, weight_bits: int, **settings: Any) -> "Plan":
        """The same setting for every quantizable layer of `graph`."""
        return cls(model, [LayerPlan(name, weight_bits, **settings) for name in graph.names])

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def with_layers(self, changes_by_layer: dict[str, dict[str, Any]]) -> "Plan":
        """A copy with some layers' fields changed: plan.with_layers({"conv1": {"weight_bits": 8}})."""
        layers = [replace(layer, **changes_by_layer.get(layer.name, {})) for layer in self.layers]
        return replace(self, layers=layers)

    def check_against(self, graph: LayerGraph, model: str | None = None) -> None:
        """Refuse a plan that is not for `model` (by default, the one it names): one naming layers it does
        not have, or leaving some of its layers neither quantized nor listed as float (another model's plan)."""
        model = model or self.model
        unknown = [layer.name for layer in self.layers if layer.name not in graph.layers]
        if unknown:
            raise UserError(f"plan for {self.model} names layer {unknown[0]!r}, which is not a quantizable layer of "
                            f"{model} (its layers: {', '.join(graph.names[:4])}, ...): use a plan made for {model}")
        covered = {layer.name for layer in self.layers} | set(self.float_layers)
        uncovered = [name for name in graph.names if name not in covered]
        if uncovered:
            raise UserError(f"plan for {self.model} leaves {len(uncovered)} of {model}'s {len(graph.names)} layers "
                            f"unplanned ({uncovered[0]}, ...): use a plan made for {model}, or list the layers kept "
                            f"in full precision under float_layers")

    def key(self) -> str:
        """A hash of the quantization settings alone (not costs or metadata): equal plans, equal keys."""
        # code_packing came later: left out at its default, so plans written before it keep their keys
        settings = [{k: v for k, v in to_dict(layer).items()
                     if k not in ("cost", "tie_group") and (k, v) != ("code_packing", "fields")} for layer in self.layers]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    def save(self, path: str | Path) -> Path:
        return write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        return parse(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_document(path, "plan file", format="json"), f"plan file {path}")
