"""Hardware targets from a table file (TOML or JSON): capabilities, latency and energy per layer.

A target file has four parts (see hwmodels/targets/*.toml):
  [target]        name, description, default_activation_bits (for layers the plan leaves float), and for
                  measured tables other_ops_s and switch_s_per_value (`switching_layers`)
  [capabilities]  weight_bits / activation_bits per op ("conv2d", "linear"), scale_formats, and
                  code_packing ("fields", or "base3": ternary codes five to a byte; packing.py)
  [rates]         per op, per bit pair "w{W}a{A}": macs_per_s, and optionally joules_per_mac
  [[layers]]      optional exact entries (op, shape, bits) with latency_s / energy_j, e.g. measured

Lookup rule, per layer: an exact [[layers]] entry for its shape and bit pair wins; otherwise
MACs / macs_per_s of the narrowest listed bit pair that covers it (weight and activation bits at
least the layer's: hardware runs narrow data on wider kernels), plus `layer_overhead_s`.
A plan using bits outside the capabilities fails, naming the layer and the allowed bits.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from oaq_search.errors import UserError
from oaq_search.graph import LayerGraph, LayerInfo
from oaq_search.grids import FLOAT_INPUT_BITS
from oaq_search.plan import CODE_PACKINGS, TERNARY_BITS, LayerPlan, Plan, packing_for
from oaq_search.schema import read_document

from .base import CostModel, CostReport
from .memory import MemoryModel
from .shift import shift_metrics

TARGETS_DIR = Path(__file__).resolve().parent / "targets"
OPS = ("conv2d", "linear")
_BIT_PAIR = re.compile(r"w(\d+)a(\d+)")
REQUIRED = object()  # a number the table must give


@dataclass(frozen=True)
class Rate:
    weight_bits: int
    activation_bits: int
    macs_per_s: float
    joules_per_mac: float | None = None


@dataclass
class TargetTable:
    """A parsed, validated target file."""

    name: str
    description: str
    default_activation_bits: int
    weight_bits: dict[str, list[int]]
    activation_bits: dict[str, list[int]]
    scale_formats: list[str]
    rates: dict[str, list[Rate]]
    code_packing: str = "fields"
    layer_overhead_s: float = 0.0
    other_ops_s: float = 0.0  # time of everything that is not a quantizable layer (measured tables)
    switch_s_per_value: float = 0.0  # per input value (one image) of a layer whose kernel kind differs from a producer's
    layers: dict[tuple, dict[str, float]] = field(default_factory=dict)


def layer_key(op: str, info: LayerInfo | dict, weight_bits: int, activation_bits: int) -> tuple:
    """Shape + bits key of an exact table entry."""
    if isinstance(info, LayerInfo):
        channels_in = info.input_shape[0]
        kernel = info.weight_shape[-1] if op == "conv2d" else 1
        spatial = tuple(info.input_shape[1:]) if op == "conv2d" else ()
        stride = info.input_shape[-1] // info.output_shape[-1] if op == "conv2d" else 1
        shape = (channels_in, info.weight_shape[0], kernel, stride, info.groups, *spatial)
    else:
        shape = (info["in_channels"], info["out_channels"], info.get("kernel", 1), info.get("stride", 1),
                 info.get("groups", 1), *info.get("input_hw", []))
    return (op, *shape, weight_bits, activation_bits)


def load_target(spec: str | Path) -> TargetTable:
    """A target by built-in name (a file in hwmodels/targets) or by path to a TOML/JSON file."""
    path = Path(spec)
    if not path.suffix:
        path = TARGETS_DIR / f"{spec}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TARGETS_DIR.glob("*.toml")))
        raise UserError(f"target table {path} does not exist (built-in targets: {known})")
    return _parse(read_document(path, "target table"), path)


def _parse(data: dict, path: Path) -> TargetTable:
    def need(table: dict, key: str, kind, where: str):
        if key not in table:
            raise UserError(f"target table {path}: missing key '{where}{key}'")
        value = table[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = {dict: "a table", list: "a list", str: "a string", (int, float): "a number", int: "an integer"}
            raise UserError(f"target table {path}: key '{where}{key}' must be {expected.get(kind, kind)}, got {value!r}")
        return value

    def number(table: dict, key: str, where: str, positive: bool, default: object = REQUIRED) -> float | None:
        """A finite number, > 0 (`positive`: rates) or >= 0 (times, energies); `default` when absent."""
        if key not in table and default is not REQUIRED:
            return default
        value = need(table, key, (int, float), where)
        if not math.isfinite(value) or value < 0 or positive and value == 0:
            bound = "positive" if positive else "zero or more"
            raise UserError(f"target table {path}: key '{where}{key}' must be a finite number, {bound}, got {value!r}")
        return float(value)

    target = need(data, "target", dict, "")
    capabilities = need(data, "capabilities", dict, "")
    rates_table = need(data, "rates", dict, "")
    bits = {}
    for kind in ("weight_bits", "activation_bits"):
        per_op = need(capabilities, kind, dict, "capabilities.")
        bits[kind] = {}
        for op in OPS:
            values = need(per_op, op, list, f"capabilities.{kind}.")
            if not values or not all(isinstance(b, int) and 1 <= b <= 32 for b in values):
                raise UserError(f"target table {path}: key 'capabilities.{kind}.{op}' must list bit-widths "
                                f"from 1 to 32, got {values!r}")
            bits[kind][op] = sorted(values)
    code_packing = capabilities.get("code_packing", "fields")
    if code_packing not in CODE_PACKINGS:
        raise UserError(f"target table {path}: key 'capabilities.code_packing' must be one of "
                        f"{', '.join(CODE_PACKINGS)}, got {code_packing!r}")
    rates = {}
    for op in OPS:
        entries = need(rates_table, op, dict, "rates.")
        rates[op] = []
        for pair, entry in entries.items():
            where = f"rates.{op}.{pair}."
            match = _BIT_PAIR.fullmatch(pair)
            if not match:
                raise UserError(f"target table {path}: key 'rates.{op}.{pair}' must be named w<bits>a<bits>, e.g. w8a8")
            weight_bits, activation_bits = int(match.group(1)), int(match.group(2))
            if not isinstance(entry, dict):
                raise UserError(f"target table {path}: key 'rates.{op}.{pair}' must be a table, got {entry!r}")
            rates[op].append(Rate(weight_bits, activation_bits, number(entry, "macs_per_s", where, positive=True),
                                  number(entry, "joules_per_mac", where, positive=False, default=None)))
    layers = {}
    for index, entry in enumerate(data.get("layers", [])):
        where = f"layers[{index}]."
        op = need(entry, "op", str, where)
        for key in ("in_channels", "out_channels", "weight_bits", "activation_bits"):
            need(entry, key, int, where)
        energy = number(entry, "energy_j", where, positive=False, default=None)
        layers[layer_key(op, entry, entry["weight_bits"], entry["activation_bits"])] = {
            "latency_s": number(entry, "latency_s", where, positive=False), **({} if energy is None else {"energy_j": energy})}
    return TargetTable(
        name=need(target, "name", str, "target."), description=target.get("description", ""),
        default_activation_bits=int(target.get("default_activation_bits", 8)),
        weight_bits=bits["weight_bits"], activation_bits=bits["activation_bits"],
        scale_formats=list(capabilities.get("scale_formats", ["float32", "pow2"])), rates=rates,
        code_packing=code_packing,
        layer_overhead_s=number(rates_table, "layer_overhead_s", "rates.", positive=False, default=0.0),
        other_ops_s=number(target, "other_ops_s", "target.", positive=False, default=0.0),
        switch_s_per_value=number(target, "switch_s_per_value", "target.", positive=False, default=0.0), layers=layers)


def switching_layers(graph: LayerGraph, plan: Plan, default_activation_bits: int) -> list[str]:
    """Layers whose kernel kind (integer, or float for a float input) differs from a layer feeding them: in
    ONNX Runtime the value changes layout there (integer kernels run NHWC, float ones NCHWc)."""
    planned = {layer.name: layer for layer in plan.layers}

    def integer(name: str) -> bool | None:  # None: not in the plan (a float layer)
        layer = planned.get(name)
        return None if layer is None else (layer.activation_bits or default_activation_bits) != FLOAT_INPUT_BITS

    return [name for name in planned
            if any(integer(producer) not in (None, integer(name)) for producer in graph.layers.predecessors(name))]


class TargetModel(CostModel):
    """Memory and BOPs (as `memory`), bit-shift friendliness, and latency/energy from a target table."""

    def __init__(self, spec: str | Path):
        self.table = load_target(spec)
        self.name = self.table.name
        self.code_packing = self.table.code_packing
        energy = all(rate.joules_per_mac is not None for rates in self.table.rates.values() for rate in rates)
        self.units = {**MemoryModel.units, "latency_s": "s", "shift_mac_share": "fraction",
                      "multiply_layers": "layers", "multiply_penalty": "penalty", **({"energy_j": "J"} if energy else {})}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr(self.table).encode()).hexdigest()[:16]  # hash() differs per process
        return f"{super().fingerprint()}:{digest}"

    def legal_bits(self, op_type: str, kind: str) -> list[int]:
        return getattr(self.table, kind)[op_type]

    def check_legal(self, graph: LayerGraph, plan: Plan) -> None:
        for layer in plan.layers:
            op = graph.info(layer.name).op_type
            activation_bits = layer.activation_bits or self.table.default_activation_bits
            for kind, bits in (("weight_bits", layer.weight_bits), ("activation_bits", activation_bits)):
                allowed = getattr(self.table, kind)[op]
                if bits not in allowed:
                    raise UserError(f"layer {layer.name} ({op}) uses {kind} {bits}, which target {self.name} cannot "
                                    f"run: allowed {allowed}")
            if layer.scale_format not in self.table.scale_formats:
                raise UserError(f"layer {layer.name} uses scale_format {layer.scale_format!r}; target {self.name} "
                                f"supports {self.table.scale_formats}")
            if layer.code_packing != packing_for(self.code_packing, layer.weight_bits, layer.grid):
                raise UserError(f"layer {layer.name} packs its codes as {layer.code_packing!r}; target {self.name} "
                                f"reads {self.code_packing!r} at {TERNARY_BITS} bits (capabilities.code_packing)")

    def layer_cost(self, info: LayerInfo, layer: LayerPlan) -> dict[str, float]:
        activation_bits = layer.activation_bits or self.table.default_activation_bits
        exact = self.table.layers.get(layer_key(info.op_type, info, layer.weight_bits, activation_bits))
        if exact is not None:
            return dict(exact)
        covering = [r for r in self.table.rates[info.op_type]
                    if r.weight_bits >= layer.weight_bits and r.activation_bits >= activation_bits]
        if not covering:
            raise UserError(f"target {self.name} has no {info.op_type} rate covering w{layer.weight_bits}"
                            f"a{activation_bits} (layer {info.name})")
        rate = min(covering, key=lambda r: (r.weight_bits * r.activation_bits, r.weight_bits))
        cost = {"latency_s": info.macs / rate.macs_per_s + self.table.layer_overhead_s}
        if rate.joules_per_mac is not None:
            cost["energy_j"] = info.macs * rate.joules_per_mac
        return cost

    def evaluate(self, graph: LayerGraph, plan: Plan) -> CostReport:
        self.check_legal(graph, plan)
        report = MemoryModel().evaluate(graph, plan)
        for layer in plan.layers:
            report.per_layer[layer.name].update(self.layer_cost(graph.info(layer.name), layer))
        switch = self.table.switch_s_per_value
        if switch:
            for name in switching_layers(graph, plan, self.table.default_activation_bits):
                report.per_layer[name]["latency_s"] += switch * math.prod(graph.info(name).input_shape)
        for metric in ("latency_s", "energy_j"):
            if all(metric in costs for costs in report.per_layer.values()):
                report.totals[metric] = sum(costs[metric] for costs in report.per_layer.values())
        report.totals["latency_s"] = report.totals.get("latency_s", 0.0) + self.table.other_ops_s
        report.totals.update(shift_metrics(graph, plan))
        return report
