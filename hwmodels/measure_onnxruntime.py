"""Build an ONNX Runtime target by timing this machine's ONNX Runtime kernels for a model's layer shapes.

Each layer shape is exported alone, as `oaq-search deploy` writes it inside a model, and timed in ONNX
Runtime (CPU provider) at one batch size, two ways: with a quantized input (ONNX Runtime fuses it into
QLinearConv / QGemm) and with a float input (a float kernel on the layer's weights in float, what a
layer the plan gives no input bits becomes). Weights and inputs of 2 to 8 bits all run on those int8 kernels, so
the table lists one time for them all; 32 means a float input. A layer whose output is shaped like its
input is also timed twice in a row, and the second copy's time is the layer's: a model alone pays layout
changes and quantize calls at its ends that a layer inside a chain does not (at batch 1 they can weigh
more than the kernel). Other layers are timed alone, less what one `run` call on their input costs (an
Identity model). Whole models tie the layers to what a model costs: `other_ops_s` is the all-float
model's time less its layers' (BatchNorm is folded: the adds, activations, pooling and one call), and the 8-bit times are scaled so that they and `other_ops_s` add
up to the all-8-bit model's (a layer alone pays its own quantize and dequantize calls, which integer
layers in a row share). A third, every other layer with 8-bit inputs, prices a switch between integer
and float kernels (`switch_s_per_value`, per input value of the layer after it): ONNX Runtime's integer
kernels run NHWC and its float ones NCHWc, so each switch transposes and reorders the value, and a
float Conv loses the Add and Relu it would fuse. A fourth, all inputs 4-bit, prices the Clip each input
quantizer below 8 bits adds (per input value, into those entries). The layers and the whole models are
timed in one alternation, so a machine that slows down mid-way slows them alike.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oaq_search.deploy import export_float_onnx, export_onnx
from oaq_search.fake_quant import calibrate_activations, quantize_
from oaq_search.graph import LayerGraph, build_layer_graph
from oaq_search.grids import FLOAT_INPUT_BITS
from oaq_search.kernel_rounding import round_like_kernels_
from oaq_search.plan import LayerPlan, Plan
from oaq_search.runtime import paired_latency

from .measure import WEIGHT_BITS, layer_shape, target_table
from .target import switching_layers

ACTIVATION_BITS = list(range(2, 9))  # uint8 containers, clipped to the plan's levels below 8
RUNS_PER_TURN = 3  # runs of a model in a row per timing round, the last timed (see runtime.paired_latency)
CLIPPED_BITS = 4  # the input bits of the whole model that prices the Clip below 8 bits


@dataclass
class OrtTimings:
    """Seconds ONNX Runtime took: each layer inside a chain (`layers`: name -> "int8" / "float", see
    `_in_chain`) and the whole models a table is tied to (`whole`: label of `anchor_plans`)."""

    layers: dict[str, dict[str, float]]
    whole: dict[str, float]


def measure_onnxruntime(model: nn.Module, graph: LayerGraph, input_shape: tuple[int, ...], batch: int = 1,
                        threads: int = 2, repeats: int = 50) -> dict:
    """A target table (TOML-ready dict) with ONNX Runtime's int8 and float times for every layer shape."""
    return ort_table(graph, time_onnxruntime(model, graph, input_shape, batch, threads, repeats), batch, threads)


def time_onnxruntime(model: nn.Module, graph: LayerGraph, input_shape: tuple[int, ...], batch: int = 1,
                     threads: int = 2, repeats: int = 50) -> OrtTimings:
    """Every layer shape (`_single_layer_models`) and the whole anchor models, all timed in one
    alternation (a machine that slows down mid-way slows them alike)."""
    modules = dict(model.named_modules())
    first = {}  # layer shape -> the first layer of that shape, the one timed
    for info in graph.infos():
        first.setdefault(_shape_key(info), info)
    paths, inputs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for info in first.values():
            single = _single_layer_models(modules[info.name], info, batch, folder)
            if "int8 twice" not in single:  # timed alone: what a `run` call costs is taken off
                single["call"] = _identity(folder, (batch, *info.input_shape))
            for kind, path in single.items():
                paths[f"{info.name}.{kind}"], inputs[f"{info.name}.{kind}"] = path, torch.randn(batch, *info.input_shape)
        for label, path in anchor_models(model, graph, input_shape, batch, folder).items():
            paths[label], inputs[label] = path, torch.randn(batch, *input_shape)
        seconds = paired_latency(paths, inputs, threads, repeats, RUNS_PER_TURN)
    timed = {key: {kind: _in_chain(seconds, info.name, kind) for kind in ("int8", "float")} for key, info in first.items()}
    return OrtTimings({info.name: timed[_shape_key(info)] for info in graph.infos()},
                      {label: seconds[label] for label in anchor_plans(graph)})


def anchor_plans(graph: LayerGraph) -> dict[str, Plan]:
    """The whole models a table is tied to: all float inputs, all 8-bit, every other layer 8-bit (the
    switches) and all 4-bit (the Clip)."""
    names = graph.names
    return {"float": _plan(graph, ()), "int8": _plan(graph, names), "alternating": _plan(graph, names[::2]),
            "clipped": _plan(graph, names, CLIPPED_BITS)}


def anchor_models(model: nn.Module, graph: LayerGraph, input_shape: tuple[int, ...], batch: int,
                  folder: Path) -> dict[str, Path]:
    """`anchor_plans` deployed as ONNX files in `folder` (label -> path)."""
    images = torch.randn(max(batch, 8), *input_shape)
    return {label: _deployed(model, plan, images, folder / f"whole-{label}.onnx")
            for label, plan in anchor_plans(graph).items()}


def ort_table(graph: LayerGraph, timings: OrtTimings, batch: int, threads: int) -> dict:
    """The target table from `timings`: the layers' times tied to what the anchor models cost whole."""
    layers, whole = [timings.layers[name] for name in graph.names], timings.whole
    values = {name: math.prod(graph.info(name).input_shape) for name in graph.names}
    other = max(whole["float"] - sum(times["float"] for times in layers), 0.0)
    # a layer timed alone pays its own quantize and dequantize calls, which integer layers in a row share
    chained = (whole["int8"] - other) / max(sum(times["int8"] for times in layers), 1e-12)
    # below 8 bits each input quantizer adds a Clip to the codes' range: priced per input value
    clip = max(whole["clipped"] - whole["int8"], 0.0) / max(sum(values.values()), 1)
    plans = anchor_plans(graph)
    every_other = {layer.name for layer in plans["alternating"].layers if layer.activation_bits}
    alternating = other + sum(times["int8"] * chained if name in every_other else times["float"]
                              for name, times in zip(graph.names, layers))
    switched = sum(values[name] for name in switching_layers(graph, plans["alternating"], FLOAT_INPUT_BITS))
    switch = max(whole["alternating"] - alternating, 0.0) / max(switched, 1)
    entries, measured = [], set()
    for info, times in zip(graph.infos(), layers):
        if _shape_key(info) in measured:
            continue
        measured.add(_shape_key(info))
        entries += [{**layer_shape(info), "weight_bits": w, "activation_bits": a,
                     "latency_s": times["int8"] * chained + (clip * values[info.name] if a < 8 else 0.0)}
                    for w in WEIGHT_BITS for a in ACTIVATION_BITS]
        entries += [{**layer_shape(info), "weight_bits": w, "activation_bits": FLOAT_INPUT_BITS,
                     "latency_s": times["float"]} for w in WEIGHT_BITS]
    import onnxruntime

    description = (f"ONNX Runtime {onnxruntime.__version__} CPU provider, batch {batch}, {threads} threads, "
                   f"measured on this machine; 8-bit layer times scaled by {chained:.3f} to the all-8-bit model's")
    table = target_table("onnxruntime-cpu", description, entries, other, ACTIVATION_BITS + [FLOAT_INPUT_BITS],
                         FLOAT_INPUT_BITS)
    table["target"]["switch_s_per_value"] = switch
    return table


def _shape_key(info) -> tuple:
    """What layers share one timing by: their op and shape."""
    return tuple(sorted((k, str(v)) for k, v in layer_shape(info).items()))


def _single_layer_models(layer: nn.Module, info, batch: int, folder: Path) -> dict[str, Path]:
    """The layer alone as deployed ONNX: "int8" with 8-bit weights and input, "float" with 8-bit weights
    and a float input; where its output is shaped like its input, also the layer twice in a row ("int8
    twice", "float twice"): the second's time is what the layer costs inside a chain, without the layout
    changes and quantize calls at a model's ends."""
    own = getattr(layer, "layer", layer)  # a QuantizedLayer's own layer
    chains = {"": nn.Sequential(copy.deepcopy(own))}
    if tuple(info.output_shape) == tuple(info.input_shape):
        second = copy.deepcopy(own)
        with torch.no_grad():
            second.weight.neg_()  # weights of their own: the exporter stores equal initializers once
        chains[" twice"] = nn.Sequential(copy.deepcopy(own), second)
    images = torch.randn(max(batch, 8), *info.input_shape)
    models = {}
    for suffix, chain in chains.items():
        graph = build_layer_graph(chain, info.input_shape)
        for kind, integer in (("int8", graph.names), ("float", ())):
            models[kind + suffix] = _deployed(chain, _plan(graph, integer), images,
                                              folder / f"{info.name}.{kind}{suffix}.onnx")
    return models


def _in_chain(seconds: dict[str, float], name: str, kind: str) -> float:
    """What a layer costs inside a model: the layer twice less once where it was timed twice, else alone
    less one `run` call."""
    twice = seconds.get(f"{name}.{kind} twice")
    alone = seconds[f"{name}.{kind}"]
    return max((twice - alone) if twice is not None else (alone - seconds[f"{name}.call"]), 0.0)


def _plan(graph: LayerGraph, integer: Iterable[str], activation_bits: int = 8) -> Plan:
    """8-bit weights everywhere, and `activation_bits` inputs for the `integer` layers (the others read float)."""
    integer = set(integer)
    return Plan("measured", [LayerPlan(name, 8, activation_bits=activation_bits if name in integer else None,
                                       method="vanilla") for name in graph.names])


def _deployed(model: nn.Module, plan: Plan, images: torch.Tensor, path: Path) -> Path:
    """`model` quantized by `plan`, written as `oaq-search deploy` writes it."""
    quantized = quantize_(copy.deepcopy(model).eval(), plan)
    if any(layer.activation_bits for layer in plan.layers):
        calibrate_activations(quantized, [images])
        round_like_kernels_(quantized, images)
    export_onnx(quantized, plan, images, path)
    return path


def _identity(folder: Path, shape: tuple[int, ...]) -> Path:
    """An Identity model on inputs of `shape`: what one `run` call costs, data in and out included, which a
    layer timed alone pays and a layer inside a model does not."""
    path = folder / f"identity-{'x'.join(map(str, shape))}.onnx"
    export_float_onnx(nn.Identity(), torch.randn(*shape), path)
    return path
