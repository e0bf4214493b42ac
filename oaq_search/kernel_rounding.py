"""The rounding a deployment's integer kernels add to the plan, made part of the plan's model.

ONNX Runtime runs a quantized layer as an integer kernel (QLinearConv, QGemm; `deploy.py`) that adds
its bias as an int32, in steps of input step times weight step, and requantizes its output to int8.
Neither rounding is in the fake quantizers: at 4-bit activations the two changed ResNet-20's class on
about 5 % of test images against PyTorch, moving its accuracy by up to 0.2 points either way. So a
post-training quantized, reconstructed or fine-tuned model rounds alike (`round_like_kernels_`):
- each integer layer's bias, with its BatchNorm folded in, onto that int32 grid (the BatchNorm's beta,
  or the layer's bias, moves by less than half a step);
- the outputs the deployment requantizes over a range of their own (before a residual add, a linear
  bottleneck's output, the logits) to int8 over the largest magnitude calibration images reach, by an
  `OutputQuantizer` after the BatchNorm, whose range the packed model carries for `deploy`. An output
  that passes nothing but a ReLU on to quantized inputs is requantized to the next layer's input grid,
  which rounds it as the plan does anyway.
The search's trials go without: at 8 bits and int32 these roundings move a trial's score by noise alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import OutputHook, OutputQuantizer, activation_levels
from .errors import UserError
from .fake_quant import QuantizedLayer, calibrate_activations, quantized_layers, unwrap
from .graph import trace
from .oaq import int8_steps

InputGrid = tuple[int, tuple[float, float]]  # a layer's input quantizer: bits, (low, high)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_RELU_TOPS = {nn.ReLU: math.inf, nn.ReLU6: 6.0, F.relu: math.inf, torch.relu: math.inf, F.relu6: 6.0,
              "relu": math.inf, "relu_": math.inf}


def round_like_kernels_(quantized: nn.Module, images: torch.Tensor) -> nn.Module:
    """Round `quantized` (post-training quantized, reconstructed or fine-tuned) as a deployment's integer
    kernels do: biases onto their int32 grids, and the outputs a deployment requantizes on its own to
    int8, over the ranges `images` reach. Again after anything that changes weights or ranges."""
    layers = {layer.name: layer for layer in quantized_layers(quantized) if layer.input_quantizer is not None}
    if not layers:
        return quantized
    modules = dict(quantized.named_modules())
    inputs = {name: (layer.input_quantizer.bits, layer.input_quantizer.range) for name, layer in layers.items()}
    outputs = layer_outputs(unwrap(quantized), set(layers))
    with torch.no_grad():
        for name, output in outputs.items():
            _round_bias(layers[name], modules[output.target] if output.target != name else None)
    for name, output in outputs.items():
        if layers[name].output_quantizer is None and not _rounded_by_next_inputs(output, inputs, modules):
            layers[name].output_quantizer = OutputQuantizer().to(layers[name].weight.device)
            modules[output.target].register_forward_hook(OutputHook(layers[name].output_quantizer))
    return _fit_outputs(quantized, images)


@contextlib.contextmanager
def outputs_unrounded(model: nn.Module) -> Iterator[None]:
    """Inside, `model`'s outputs pass its output quantizers unrounded. For reconstruction: ranges fitted
    before it clipped the outputs the reconstructed blocks reach (ResNet-20 W2A8's last block: 24.1 before,
    32.2 after), and reconstructing through them ended lower (W2A8 -3.78 against -3.39); `round_like_kernels_`
    fits the ranges afterwards."""
    quantizers = [layer.output_quantizer for layer in quantized_layers(model) if layer.output_quantizer is not None]
    for quantizer in quantizers:
        quantizer.passing = True
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.passing = False


def hook_output_quantizers(model: nn.Module, clips: dict[str, float]) -> None:
    """Round the outputs of a plain `model` (a packed model's architecture, its biases rounded already) as
    its plan's model does: `clips`, the output ranges the packed model holds, by layer."""
    modules = dict(model.named_modules())
    for name, output in layer_outputs(model, set(clips)).items():
        quantizer = OutputQuantizer()
        quantizer.clip.fill_(clips[name])
        modules[output.target].register_forward_hook(OutputHook(quantizer))


def layer_outputs(model: nn.Module, layers: set[str]) -> dict[str, fx.Node]:
    """Each of `layers`' output as a deployment computes it: the node of the layer, or of the BatchNorm it
    alone feeds (folded into it). Empty for a model torch.fx cannot trace, whose deployment then rounds
    where the plan's model does not."""
    try:
        traced = trace(model, set())
    except UserError:
        return {}
    modules = dict(traced.named_modules())
    found = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target in layers:
            users = list(node.users)
            batchnorm = len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules[users[0].target], _BATCHNORMS)
            found[node.target] = users[0] if batchnorm else node
    return found


def _round_bias(layer: QuantizedLayer, batchnorm: nn.Module | None) -> None:
    """Move the layer's bias, its BatchNorm folded in, onto the int32 grid of input step times int8 weight
    step (per output channel) by shifting the BatchNorm's beta or, without one, the layer's bias."""
    steps = int8_steps(layer.codes(), layer.weight_quantizer.grid, layer.weight_quantizer.bits)
    if steps is None:  # a grid int8 cannot hold: `deploy` refuses or rounds it afresh
        return
    low, high = layer.input_quantizer.range
    steps = steps * (high / activation_levels(layer.input_quantizer.bits, low < 0))
    bias = layer.layer.bias
    if batchnorm is None:
        if bias is not None:
            bias.copy_(_onto(bias.double(), steps))
        return
    if batchnorm.bias is None:
        return  # no beta to shift: left as it is
    gain = (batchnorm.weight.double() if batchnorm.weight is not None else 1.0) / torch.sqrt(
        batchnorm.running_var.double() + batchnorm.eps)
    layer_bias = bias.double() if bias is not None else 0.0
    folded = batchnorm.bias.double() + gain * (layer_bias - batchnorm.running_mean.double())
    batchnorm.bias.add_(_onto(folded, steps * gain.abs()) - folded)


def _onto(values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    steps = steps.to(values.device).clamp(min=1e-30)
    return torch.round(values / steps) * steps


def _fit_outputs(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Fit each output quantizer's range to the largest magnitude its output reaches on `images`."""
    quantizers = [layer.output_quantizer for layer in quantized_layers(model) if layer.output_quantizer is not None]
    if quantizers:
        calibrate_activations(model, [images.to(quantizers[0].clip.device)], quantizers)
    return model


def _rounded_by_next_inputs(output: fx.Node, inputs: dict[str, InputGrid], modules: dict[str, nn.Module]) -> bool:
    """Whether `output` reaches nothing but one ReLU and, after it, the unsigned input quantizers of layers
    that share one grid (after a ReLU6: one whose top is below 6): the deployment's int8 output then is that
    grid."""
    if len(output.users) != 1:
        return False
    (activation,) = output.users
    kind = type(modules[activation.target]) if activation.op == "call_module" else activation.target
    top = _RELU_TOPS.get(kind) if activation.op in ("call_module", "call_function", "call_method") else None
    readers = list(activation.users)
    if top is None or not readers or any(r.op != "call_module" or r.target not in inputs for r in readers):
        return False
    grids = {inputs[reader.target] for reader in readers}
    if len(grids) != 1:
        return False
    _bits, (low, high) = grids.pop()
    return low == 0 and high < top
