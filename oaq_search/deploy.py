"""A quantized model as QDQ ONNX that ONNX Runtime runs with integer kernels (QLinearConv, QGemm).

`torch.onnx.export` cannot express ranges under 8 bits, so the float model is exported (BatchNorm
folded by the exporter) and the quantization is written into the graph afterwards:
- each quantized layer's weight becomes int8 codes and a per-output-channel scale (DequantizeLinear):
  the plan's b-bit codes on an integer lattice of the grid's levels, refined (the codes multiplied by
  up to 127 // lattice) and shifted by OAQ's offset mu, which plans quantize onto that finer lattice
  (`oaq.int8_offset`), so the weights are the plan's exactly. Of a plan quantized before that, what is
  left of mu shifts a channel's weights alike; its mean effect on calibration images goes into the
  bias, as BatchNorm correction would;
- its input: QuantizeLinear (uint8; zero point 128 for signed inputs) -> Clip to the plan's 2^b levels
  -> DequantizeLinear, exactly the fake quantizer's grid and range;
- a layer the plan gives no input bits keeps its float input and gets the plan's weights in float32:
  ONNX Runtime has no integer kernel for it, and a DequantizeLinear before its float kernel ran on
  every call (ResNet-20 weight-only: 2.9x the float model's latency at batch 1). A measured ONNX Runtime
  table (`hw measure --runtime onnxruntime`) prices a plan by which layers get integer kernels;
- its output: int8 QuantizeLinear -> DequantizeLinear, because ONNX Runtime fuses a layer into an integer
  kernel only when its output is requantized: at the next layer's input grid where only a ReLU lies
  between, else at the int8 range the plan's model rounds it to (`kernel_rounding.py`).
`weights="packed"` writes the plan's exact model at its true size instead: each layer's codes as int2,
int4 or int8, dequantized and offset in the graph, inputs quantized as above, outputs rounded where the
plan's model rounds them.
ONNX Runtime runs it with float kernels (dequantizing the weights on every call).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import grids
from .activations import activation_levels, fake_quantize_activation
from .errors import UserError
from .fake_quant import quantized_layers, unwrap
from .files import replace_atomically
from .grids import INT8_MAX
from .kernel_rounding import hook_output_quantizers
from .oaq import QuantizedWeight, dequantize, int8_refinement
from .packing import PackedModel
from .plan import Plan

OPSET = 17  # QDQ with per-channel weights needs 13; 17 is the newest the TorchScript exporter fully supports
WEIGHT_FORMATS = ("int8", "packed")  # int8 containers ONNX Runtime fuses into integer kernels | exact-size codes
PACKED_OPSET = {2: 25, 4: 21, 8: OPSET}  # container bits -> the first opset whose DequantizeLinear reads them


@dataclass
class DeployableLayer:
    """One quantized layer in the terms deployment needs: its codes and their grid, its input quantizer."""

    weight: QuantizedWeight  # codes, scale (sigma * R) and offset (mu), per tensor or per output channel
    grid: str
    bits: int
    input_bits: int | None
    input_range: tuple[float, float] | None  # (0, clip) unsigned or (-clip, clip) signed
    output_clip: float | None = None  # int8 range its output is rounded to (`kernel_rounding.py`); None: not


def deployable_layers(model: nn.Module) -> dict[str, DeployableLayer]:
    """A fake-quantized model's layers (post-training or fine-tuned): the codes `pack_model` would write."""
    layers = {}
    for layer in quantized_layers(model):
        quantizer, activation = layer.weight_quantizer, layer.input_quantizer
        output = None if layer.output_quantizer is None else float(layer.output_quantizer.clip)
        layers[layer.name] = DeployableLayer(
            layer.codes(), quantizer.grid, quantizer.bits,
            activation.bits if activation is not None else None, activation.range if activation is not None else None,
            output)
    return layers


def from_packed(packed: PackedModel, model: nn.Module) -> dict[str, DeployableLayer]:
    """Load a packed file's tensors into `model` (its architecture, freshly built) and return its layers as
    deployment needs them; `model`'s quantized layers get the plan's weights, dequantized."""
    plain = dict(model.named_modules())
    expected = {key for key in model.state_dict() if not key.endswith("num_batches_tracked")}
    quantized = {f"{name}.{part}" for name in packed.layers for part in ("weight", "bias")}
    missing = sorted(expected - quantized - set(packed.state))
    if missing or any(name not in plain for name in packed.layers):
        raise UserError(f"the packed model does not fit model {packed.plan.model!r} (missing {', '.join(missing[:3])}"
                        f"): name the model it was made for")
    model.load_state_dict({k: v for k, v in packed.state.items() if k in expected}, strict=False)
    layers = {}
    with torch.no_grad():
        for name, entry in packed.layers.items():
            layer_plan, weight = packed.plan.layer(name), packed.weight(name)
            plain[name].weight.copy_(dequantize(weight, layer_plan.weight_quantizer()))
            if "bias" in entry:
                plain[name].bias.copy_(entry["bias"])
            clip, signed = packed.state.get(f"{name}.input_quantizer.clip"), packed.state.get(
                f"{name}.input_quantizer.signed_flag")
            bits, output = layer_plan.activation_bits, packed.state.get(f"{name}.output_quantizer.clip")
            layers[name] = DeployableLayer(weight, entry["grid"], entry["bits"], bits, None if clip is None else (
                -float(clip) if bool(signed) else 0.0, float(clip)), None if output is None else float(output))
    model.eval()
    return layers


def reference_model(model: nn.Module, layers: dict[str, DeployableLayer]) -> nn.Module:
    """A copy of a `from_packed` model that fake-quantizes each quantized layer's input, and rounds the
    outputs the packed model rounds, as the plan says: what PyTorch computes for the packed plan, to compare
    ONNX Runtime with."""
    reference = copy.deepcopy(model)
    hook_output_quantizers(reference, {name: layer.output_clip for name, layer in layers.items()
                                       if layer.output_clip is not None})
    modules = dict(reference.named_modules())
    for name, layer in layers.items():
        if layer.input_range is not None:
            low, high = layer.input_range
            modules[name].register_forward_pre_hook(lambda _module, inputs, high=high, bits=layer.input_bits,
                                                    signed=low < 0: (fake_quantize_activation(
                                                        inputs[0], torch.tensor(high), bits, signed),))
    return reference


def export_onnx(model: nn.Module, plan: Plan, images: torch.Tensor | None, path: str | Path,
                layers: dict[str, DeployableLayer] | None = None, weights: str = "int8",
                quantize_skips: bool = False, input_shape: tuple[int, ...] | None = None) -> None:
    """Write `model` (fake-quantized by `plan`, or a plain model with `layers` given) as QDQ ONNX to `path`.

    `images`, a batch of calibration images (a few hundred), fixes the input shape, and what a model
    quantized before output rounding and held offsets does not carry: int8 output ranges, and the mean
    effect of what its codes leave of mu. A model quantized since needs no data: `images` None and
    `input_shape` one image's (C, H, W). `weights="packed"` stores each
    layer's codes in the narrowest ONNX integer type (int2, int4 or int8) instead, for the file's true
    size: exactly the plan's model, which ONNX Runtime runs with float kernels on the dequantized weights.
    `quantize_skips` gives each residual add the 8-bit quantized block input its next layer reads, in
    place of the float one the plan adds, so ONNX Runtime runs the add as an integer QLinearAdd (faster;
    no longer exactly the plan's model). The file is written whole or not at all."""
    import onnx

    if weights not in WEIGHT_FORMATS:
        raise UserError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if quantize_skips and weights == "packed":
        raise UserError("quantized skips speed up integer kernels, which packed weights do not run on: drop one of them")
    if images is None and input_shape is None:
        raise UserError("export_onnx needs calibration images or, for a model that carries its ranges, the input shape")
    layers = deployable_layers(model) if layers is None else layers
    _check_layers(plan, layers)
    plain = unwrap(model)
    if weights == "packed":
        stored = {name: _packed_weight(name, layer) for name, layer in layers.items()}
    else:
        stored = {name: _integer_weight(name, layer) for name, layer in layers.items() if layer.input_range is not None}
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            weight = stored[name].representable(weights == "packed") if name in stored else _planned_weight(layer)
            modules[name].weight.copy_(torch.from_numpy(weight).to(modules[name].weight.dtype))
    graph = _export_float(plain, images[:1] if images is not None else torch.zeros(1, *input_shape))
    residuals = _quantize_weights_and_inputs(graph, layers, stored, exact=weights == "packed")
    if weights == "packed":
        _quantize_outputs(graph, images, layers, planned_only=True)
        graph = _with_opset(graph, PACKED_OPSET[min(weight.bits for weight in stored.values())])
    else:
        _compensate_residuals(graph, residuals, images)
        _quantize_outputs(graph, images, layers)
        if quantize_skips:
            _quantize_skips(graph)
    onnx.checker.check_model(graph)
    _save(graph, path)


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """The full-precision model as ONNX (BatchNorm folded): the baseline deployed latency is compared with."""
    _save(_export_float(unwrap(model), example[:1]), path)


def _save(graph, path: str | Path) -> None:
    """The ONNX file, written whole or not at all."""
    replace_atomically(path, lambda partial: partial.write_bytes(graph.SerializeToString()))


def _check_layers(plan: Plan, layers: dict[str, DeployableLayer]) -> None:
    """The model's quantized layers are the plan's."""
    strays = sorted(set(plan.names()) ^ set(layers))
    if strays:
        raise UserError(f"layer {strays[0]} is quantized in the plan or the model but not both: export the model "
                        f"with the plan it was quantized by")


@dataclass
class IntegerWeight:
    """A layer's weight as step_c * codes + offset_c (per output channel), the codes in a `bits`-bit integer."""

    codes: np.ndarray  # int8 values within the container's range
    step: np.ndarray
    offset: np.ndarray  # int8 export: what the codes leave of OAQ's mu (<= step / 2), for the bias; packed: exact
    bits: int = 8  # the container: 2, 4 or 8

    def representable(self, with_offset: bool = False) -> np.ndarray:
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return self.step.reshape(shape) * self.codes + (self.offset.reshape(shape) if with_offset else 0)


def _integer_weight(name: str, layer: DeployableLayer) -> IntegerWeight:
    """The plan's codes on the grid's integer lattice, refined and shifted so they hold OAQ's mu as well
    (`oaq.int8_refinement`; plans quantize mu onto that point, so nothing is left of it). An 8-bit grid
    int8 cannot hold with its mu is rounded afresh onto int8's own grid, what is left of each channel's
    mean kept."""
    lattice = grids.int8_lattice(layer.grid, layer.bits)
    values, scale, offset = _per_channel(layer)
    if lattice is None or (lattice == INT8_MAX and np.any(offset)):  # the latter: a plan from before offsets were held
        if layer.bits == 8:
            return _rounded_afresh(layer)
        raise UserError(f"layer {name}: the {layer.grid} grid at {layer.bits} bits has levels int8 codes cannot hold "
                        f"exactly; deploy plans on the uniform or midrise grid, or pot/ipot at 4 bits or fewer")
    factor, shift = (t.numpy() for t in int8_refinement(torch.from_numpy(offset / scale * lattice), lattice))
    step = scale / lattice / factor
    shape = (-1,) + (1,) * (values.ndim - 1)
    codes = np.round(values * lattice) * factor.reshape(shape) + shift.reshape(shape)
    return IntegerWeight(codes.astype(np.int8), step, offset - shift * step)


def _per_channel(layer: DeployableLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes' grid values, and each output channel's scale and offset (mu), in float64."""
    values = grids.codes_to_values(layer.weight.codes.to(torch.float64), layer.grid, layer.bits).numpy()
    channels = values.shape[0]
    return (values, np.broadcast_to(layer.weight.scale.double().numpy(), (channels,)),
            np.broadcast_to(layer.weight.offset.double().numpy(), (channels,)))


def _levels(layer: DeployableLayer) -> np.ndarray:
    """The grid's levels, one per code from the lowest up."""
    low, high = grids.code_range(layer.grid, layer.bits)
    return grids.codes_to_values(torch.arange(low, high + 1, dtype=torch.float64), layer.grid, layer.bits).numpy()


def _packed_weight(name: str, layer: DeployableLayer) -> IntegerWeight:
    """The plan's weights exactly, in the narrowest signed container that holds their integers: an evenly
    spaced grid (uniform, midrise) stores its codes, its own offset joining mu's; PoT and IPoT store their
    levels on an integer lattice."""
    levels = _levels(layer)
    low = grids.code_range(layer.grid, layer.bits)[0]
    unit = levels[1] - levels[0]
    values, scale, offset = _per_channel(layer)
    if np.allclose(levels, levels[0] + unit * np.arange(len(levels)), rtol=0, atol=1e-12):
        ints, base = layer.weight.codes.numpy().astype(np.int64), levels[0] - unit * low
    else:
        lattice = grids.int8_lattice(layer.grid, layer.bits)
        if lattice is None:
            raise UserError(f"layer {name}: the {layer.grid} grid at {layer.bits} bits has levels no integer type holds "
                            f"exactly; deploy plans on the uniform or midrise grid, or pot/ipot at 4 bits or fewer")
        ints, unit, base = np.round(values * lattice).astype(np.int64), 1.0 / lattice, 0.0
    bits = next(b for b in PACKED_OPSET if -(2 ** (b - 1)) <= ints.min() and ints.max() < 2 ** (b - 1))
    return IntegerWeight(ints.astype(np.int8), scale * unit, scale * base + offset, bits)


def _planned_weight(layer: DeployableLayer) -> np.ndarray:
    """The plan's weights, scale * values + offset, in float."""
    values, scale, offset = _per_channel(layer)
    shape = (-1,) + (1,) * (values.ndim - 1)
    return scale.reshape(shape) * values + offset.reshape(shape)


def _rounded_afresh(layer: DeployableLayer) -> IntegerWeight:
    """The plan's weights rounded onto a symmetric int8 grid per output channel."""
    weight = _planned_weight(layer)
    channels, shape = weight.shape[0], (-1,) + (1,) * (weight.ndim - 1)
    step = np.maximum(np.abs(weight).reshape(channels, -1).max(1), 1e-30) / INT8_MAX
    codes = np.round(weight / step.reshape(shape))
    return IntegerWeight(codes.astype(np.int8), step, (weight - step.reshape(shape) * codes).reshape(channels, -1).mean(1))


def _export_float(model: nn.Module, example: torch.Tensor):
    """The model as an ONNX graph (eval mode: BatchNorm folded into the convolutions), batch dynamic."""
    import onnx

    model.eval()
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        target = Path(scratch) / "model.onnx"
        try:
            torch.onnx.export(model, (example,), str(target), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as error:  # the exporter's own message names the op it does not know
            raise UserError(f"ONNX export failed: {str(error).splitlines()[0][:300]}") from None
        return onnx.load(str(target))


def _layer_of(node, names: set[str]) -> str | None:
    """The module a Conv/Gemm node came from, read from the exporter's scope name: one segment per module,
    a container's child as '<container>.<index>' ('/blocks/blocks.0/depthwise/depthwise.0/Conv')."""
    parts: list[str] = []
    for scope in node.name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    name = ".".join(parts)
    return name if name in names else None


def _quantize_weights_and_inputs(graph, layers: dict[str, DeployableLayer], stored: dict[str, IntegerWeight],
                                 exact: bool) -> list[tuple[object, np.ndarray]]:
    """Each stored layer's Conv/Gemm: its codes through DequantizeLinear, its input (when the plan gives it
    bits) through its quantizer. `exact`: each channel's offset is added after dequantization; otherwise
    returns the nodes whose codes left part of mu, with that part per output channel (BatchNorm folded)."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.graph.initializer}
    found, chains, residuals = set(), {}, []
    for node in list(graph.graph.node):
        name = _layer_of(node, set(stored)) if node.op_type in ("Conv", "Gemm") else None
        if name is None:
            continue
        weight = stored[name]
        folded = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        if folded.shape != weight.codes.shape:
            raise UserError(f"layer {name}: the exported weight has shape {folded.shape}, the plan's codes "
                            f"{weight.codes.shape}: the plan is for another model")
        planned = weight.representable(exact).reshape(len(folded), -1)
        flat = folded.reshape(len(folded), -1)
        gain = (flat * planned).sum(1) / np.maximum((planned**2).sum(1), 1e-30)  # BatchNorm folded in by the exporter
        if np.abs(gain.reshape(-1, 1) * planned - flat).max() > 1e-4 * max(np.abs(flat).max(), 1e-12):
            raise UserError(f"layer {name}: the exported weight is not the plan's weight times a per-channel factor")
        shape = (-1,) + (1,) * (folded.ndim - 1)
        if exact:  # no integer kernel reads these scales: a negative one (a negative BatchNorm gain) is fine
            codes, scale = weight.codes, (gain * weight.step).astype(np.float32)
        else:  # ONNX Runtime's integer kernels want positive scales
            codes = (weight.codes * np.sign(gain + (gain == 0)).reshape(shape)).astype(np.int8)
            scale = np.maximum(np.abs(gain) * weight.step, 1e-30).astype(np.float32)
        prefix, container = f"{name}.weight", _container(weight.bits)
        graph.graph.initializer.remove(initializers[node.input[1]])
        dequantize = [helper.make_node(
            "DequantizeLinear", [_constant(graph, f"{prefix}.codes", codes.astype(container)),
                                 _constant(graph, f"{prefix}.scale", scale),
                                 _constant(graph, f"{prefix}.zero", np.zeros(len(scale), container))],
            [f"{prefix}.dequantized"], axis=0)]
        node.input[1] = f"{prefix}.dequantized"
        if exact and np.abs(weight.offset).max() > 0:
            offset = _constant(graph, f"{prefix}.offset", (gain * weight.offset).reshape(shape).astype(np.float32))
            dequantize.append(helper.make_node("Add", [f"{prefix}.dequantized", offset], [f"{prefix}.planned"]))
            node.input[1] = f"{prefix}.planned"
        _insert(graph, node, dequantize)
        if layers[name].input_range is not None:
            node.input[0] = _input_chain(graph, node, layers[name], chains)
        if not exact and np.any(np.abs(weight.offset) > 1e-4 * weight.step):  # below: float rounding, ~1e-7 steps
            residuals.append((node, gain * weight.offset))
        found.add(name)
    missing = sorted(set(stored) - found)
    if missing:
        raise UserError(f"layer {missing[0]} is not a Conv or Gemm in the exported graph: the exporter does not know "
                        f"how to place its quantization")
    return residuals


def _container(bits: int):
    """The numpy type of a `bits`-bit signed integer, as onnx packs it (ml_dtypes comes with onnx)."""
    import ml_dtypes

    return {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}[bits]


def _with_opset(graph, opset: int):
    """`graph` converted to `opset` (int4 weights need 21, int2 25), with the IR version that opset needs and
    without the converter's inferred shapes, which only add to the file."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(graph, opset)
    except Exception as error:
        raise UserError(f"the exported graph cannot be converted to ONNX opset {opset} for packed weights "
                        f"({str(error).splitlines()[0][:200]}): deploy without --weights packed") from None
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(list(converted.opset_import)))
    del converted.graph.value_info[:]
    return converted


def _compensate_residuals(graph, residuals: list[tuple[object, np.ndarray]], images: torch.Tensor | None) -> None:
    """Add to each bias what the residual of mu adds on average: residual_c * the mean sum of the layer's
    (quantized) input over a kernel window, on `images`."""
    from onnx import numpy_helper

    if not residuals:
        return
    _need_images(images, f"the int8 codes of {len(residuals)} layers leave part of their weights' offset mu, whose "
                         f"mean effect goes into the bias")
    window_sums = _mean_window_sums(graph, [node for node, _ in residuals], images)
    initializers = {init.name: init for init in graph.graph.initializer}
    for (node, residual), window_sum in zip(residuals, window_sums):
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            graph.graph.initializer.remove(initializers[node.input[2]])
        else:
            bias = np.zeros(len(residual))
            node.input.append("")
        node.input[2] = _constant(graph, f"{node.output[0]}.bias", (bias + residual * window_sum).astype(np.float32))


def _mean_window_sums(graph, nodes: list, images: torch.Tensor) -> list[np.ndarray]:
    """Per node, the mean over images and output positions of its input summed over a kernel window (all
    input channels; each channel alone for a depthwise conv)."""
    import torch.nn.functional as F
    from onnx import helper

    inputs = [node.input[0] for node in nodes]
    totals, count = [0.0] * len(nodes), 0
    for batch in _run(graph, inputs, images):
        for index, (node, tensor) in enumerate(zip(nodes, batch)):
            x = torch.from_numpy(tensor).double()
            if node.op_type == "Gemm":
                totals[index] = totals[index] + x.sum(1).sum().item()
                continue
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            groups, kernel = attributes.get("group", 1), attributes["kernel_shape"]
            source = x if groups > 1 else x.sum(1, keepdim=True)
            pads = attributes.get("pads", [0] * 4)
            windows = F.conv2d(F.pad(source, (pads[1], pads[3], pads[0], pads[2])),
                               torch.ones(source.shape[1], 1, *kernel, dtype=torch.float64),
                               stride=attributes.get("strides", 1), dilation=attributes.get("dilations", 1),
                               groups=source.shape[1])
            totals[index] = totals[index] + windows.mean((2, 3)).sum(0).numpy()
        count += len(batch[0])
    return [np.asarray(total) / count for total in totals]


def _need_images(images: torch.Tensor | None, why: str) -> None:
    if images is None:
        raise UserError(f"deploying this model needs calibration images: {why}; pass --data-root (or --study), "
                        f"or quantize the plan again")


def _run(graph, outputs: list[str], images: torch.Tensor, batch_size: int = 100):
    """`graph`'s named tensors for `images`, batch by batch (exposed as extra outputs of a copy)."""
    import onnx
    import onnxruntime
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    known = {output.name for output in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(outputs)
                              if name not in known)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in images.float().split(batch_size):
        yield session.run(outputs, {"image": batch.contiguous().numpy()})


def _constant(graph, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _insert(graph, anchor, nodes: list, after: bool = False) -> None:
    """`nodes`, in order, just before (or after) `anchor`: the graph stays topologically sorted."""
    position = list(graph.graph.node).index(anchor) + after
    for offset, new in enumerate(nodes):
        graph.graph.node.insert(position + offset, new)


def _input_chain(graph, node, layer: DeployableLayer, chains: dict) -> str:
    """node's input through Q (uint8) -> Clip to the plan's levels -> DQ; shared by layers quantizing alike."""
    from onnx import helper

    low, high = layer.input_range
    signed = low < 0
    levels = activation_levels(layer.input_bits, signed)
    zero = 128 if signed else 0
    key = (node.input[0], round(high / levels, 12), zero, levels)
    if key in chains:
        return chains[key]
    tag = f"{node.input[0]}.q{len(chains)}"
    scale = _constant(graph, f"{tag}.scale", np.array(high / levels, np.float32))
    zero_point = _constant(graph, f"{tag}.zero", np.array(zero, np.uint8))
    clip = [] if levels == 255 else [helper.make_node("Clip", [  # the plan's levels, where uint8 has more
        f"{tag}.codes", _constant(graph, f"{tag}.low", np.array(zero - levels if signed else 0, np.uint8)),
        _constant(graph, f"{tag}.high", np.array(zero + levels, np.uint8))], [f"{tag}.clipped"])]
    _insert(graph, node, [helper.make_node("QuantizeLinear", [node.input[0], scale, zero_point], [f"{tag}.codes"]),
                          *clip, helper.make_node("DequantizeLinear", [f"{tag}.clipped" if clip else f"{tag}.codes",
                                                                       scale, zero_point], [f"{tag}.values"])])
    chains[key] = f"{tag}.values"
    return chains[key]


def _quantize_outputs(graph, images: torch.Tensor, layers: dict[str, DeployableLayer],
                      planned_only: bool = False) -> None:
    """Each integer layer's output through Q -> DQ (uint8 around 128 where signed). A layer the plan's model
    rounds the output of (`kernel_rounding.py`) takes that int8 grid; with `planned_only`, only those. A
    layer whose output only passes a ReLU (or a ReLU6 above the range) on to the next layer's input
    quantizer is read by that quantizer directly, the activation dropped: exact, as the quantizer rounds
    and clips alike. Others (a packed model from before output rounding) get the largest magnitude `images`
    reach, with a warning: the plan's model does not round those."""
    from onnx import helper

    targets = [node for node in graph.graph.node if node.op_type in ("Conv", "Gemm") and
               node.input[1].endswith((".weight.dequantized", ".weight.planned"))]
    consumers, values = _consumers(graph), _constants(graph)
    grids, unplanned, names = {}, [], set(layers)
    for node in targets:
        clip = layers[_layer_of(node, names)].output_clip
        if clip is not None:
            grids[node.name] = np.float32(clip) / np.float32(INT8_MAX)
        elif not planned_only:
            activation = _activation_before_quantizer(consumers.get(node.output[0], []), consumers, values)
            if activation is None:
                unplanned.append(node)
                continue
            for quantizer in consumers[activation.output[0]]:  # it reads the layer; the activation goes
                quantizer.input[0] = node.output[0]
            graph.graph.node.remove(activation)
    if unplanned:
        _need_images(images, f"{len(unplanned)} layer outputs have no int8 range in the model (a packed model written "
                             f"before output rounding)")
        peaks = np.zeros(len(unplanned))
        for outputs in _run(graph, [node.output[0] for node in unplanned], images):
            peaks = np.maximum(peaks, [float(np.abs(output).max()) for output in outputs])
        grids.update({node.name: np.float32(max(peak, 1e-8)) / np.float32(INT8_MAX)
                      for node, peak in zip(unplanned, peaks)})
        warnings.warn(f"{len(unplanned)} layer outputs are rounded to int8 at ranges fitted here, which the plan's "
                      f"model does not round (a packed model written before output rounding): ONNX Runtime's accuracy "
                      f"may differ from PyTorch's by tenths of a point; quantize the plan again to round them alike")
    for node in (node for node in targets if node.name in grids):
        tensor, raw = node.output[0], f"{node.output[0]}.float"
        node.output[0] = raw
        scale = _constant(graph, f"{raw}.scale", np.array(grids[node.name], np.float32))
        zero_point = _constant(graph, f"{raw}.zero", np.array(128, np.uint8))
        _insert(graph, node, [helper.make_node("QuantizeLinear", [raw, scale, zero_point], [f"{raw}.codes"]),
                              helper.make_node("DequantizeLinear", [f"{raw}.codes", scale, zero_point], [tensor])],
                after=True)


def _consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _quantize_skips(graph) -> None:
    """Each Add's float operand that an unsigned 8-bit input quantizer (Q -> DQ, no Clip) also reads, taken
    from that quantizer's DequantizeLinear instead, when it comes earlier in the graph. An operand reached
    from such a tensor through Slice and zero Pad alone (ResNet's parameter-free shortcut) runs that chain
    on the quantizer's uint8 codes, dequantized after it: the same values (zero is code 0), and ONNX Runtime
    runs the add as QLinearAdd with no float tensor left in the shortcut."""
    from onnx import helper

    consumers, values = _consumers(graph), _constants(graph)
    position = {id(node): index for index, node in enumerate(graph.graph.node)}
    producers = {output: node for node in graph.graph.node for output in node.output}
    for node in list(graph.graph.node):
        if node.op_type != "Add":
            continue
        for index, operand in enumerate(node.input):
            chain, source = [], operand
            while source in producers and len(consumers[source]) == 1 and _keeps_grid(producers[source], values):
                chain.insert(0, producers[source])
                source = chain[0].input[0]
            first = chain[0] if chain else node
            quantizers = [(q, d) for q in consumers.get(source, []) if q.op_type == "QuantizeLinear"
                          for d in consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"
                          and position[id(d)] < position[id(first)]]
            if not quantizers or (chain and int(values[quantizers[0][1].input[2]]) != 0):
                continue
            quantizer, dequantizer = quantizers[0]
            if not chain:
                node.input[index] = dequantizer.output[0]
                continue
            first.input[0] = quantizer.output[0]
            for pad in (link for link in chain if link.op_type == "Pad" and len(link.input) > 2):
                pad.input[2] = ""  # pads with code 0, the zero point
            tag = f"{operand}.dequantized"
            _insert(graph, chain[-1], [helper.make_node("DequantizeLinear", [operand, *dequantizer.input[1:3]], [tag])],
                    after=True)
            node.input[index] = tag


def _keeps_grid(node, values: dict) -> bool:
    """A Slice, or a Pad with zeros: a tensor on a grid holding zero stays on it."""
    if node.op_type == "Slice":
        return True
    constant = node.input[2] if len(node.input) > 2 else ""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    return node.op_type == "Pad" and mode == b"constant" and (not constant or float(values.get(constant, 1.0)) == 0)


def _constants(graph) -> dict:
    """Initializer and Constant node values by tensor name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    values.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.graph.node
                   if node.op_type == "Constant"})
    return values


def _activation_before_quantizer(following: list, consumers: dict, values: dict):
    """The ReLU through which alone a layer's output reaches an unsigned input quantizer, or the ReLU6
    whose top is at or above the quantizer's (which then clips first); None otherwise."""
    if len(following) != 1 or following[0].op_type not in ("Relu", "Clip"):
        return None
    activation = following[0]
    quantizers = consumers.get(activation.output[0], [])
    if not quantizers or any(q.op_type != "QuantizeLinear" or q.input[1:] != quantizers[0].input[1:] for q in quantizers):
        return None
    scale, zero_point = quantizers[0].input[1:3]
    if int(values[zero_point]) != 0:
        return None  # a signed input quantizer: its grid reaches below zero, where the ReLU cut
    if activation.op_type == "Clip":
        low, high = (values.get(name) if name else None for name in (list(activation.input) + ["", ""])[1:3])
        clips = [n for n in consumers.get(quantizers[0].output[0], []) if n.op_type == "Clip"]
        levels = int(values[clips[0].input[2]]) if clips else 255
        if low is None or float(low) != 0 or (high is not None and float(high) < levels * float(values[scale])):
            return None
    return activation
