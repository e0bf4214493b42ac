"""Block reconstruction: post-training quantization that holds at 2-3 bits (BRECQ and QDrop, with
AdaRound's learned rounding), kept inside OAQ's quantizer.

Block by block in execution order (a residual block, or a layer outside any block: `blocks`), each
weight's rounding, down or up to the grid levels around it, and each input's quantization range are
learned so the block's output on calibration images matches full precision's. The block is fed what the
already reconstructed blocks before it compute, and while it learns, each activation value passes
unquantized with probability `drop_probability` (QDrop), which makes the fit hold on new images.
OAQ's s and T, the weights and BatchNorm stay as post-training quantization left them; the result
is a 0/1 `round_up` per weight (packed and exported as codes) and the learned ranges.
"""

from __future__ import annotations

import torch
from torch import nn

from . import grids
from .blocks import find_blocks
from .config import PtqConfig
from .devices import training_device
from .fake_quant import QuantizedLayer, quantized_layers
from .oaq import normalized_grid_input
from .progress import bar

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # the rounding regularizer's annealing and its delay (share of steps)


class SoftRounding(nn.Module):
    """AdaRound for one layer: each weight at h(V) of the way from the grid level below it to the one
    above, h = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1), starting where rounding to nearest is."""

    def __init__(self, layer: QuantizedLayer):
        super().__init__()
        quantizer = layer.weight_quantizer
        with torch.no_grad():
            x, mu, sigma, scale = normalized_grid_input(layer.layer.weight, quantizer, layer.name)
            below = grids.floor_code(x, quantizer.grid, quantizer.bits)
            low = grids.codes_to_values(below, quantizer.grid, quantizer.bits)
            gap = grids.codes_to_values(below + 1, quantizer.grid, quantizer.bits) - low
            fraction = ((x - low) / gap).clamp(0.0, 1.0)
        self.register_buffer("low", low)
        self.register_buffer("gap", gap)
        self.register_buffer("step", sigma * scale)
        self.register_buffer("offset", mu)
        self.logit = nn.Parameter(-torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1))

    def up(self) -> torch.Tensor:
        return (torch.sigmoid(self.logit) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        """The layer's weight under the current soft rounding."""
        return self.step * (self.low + self.up() * self.gap) + self.offset

    def regularizer(self, beta: float) -> torch.Tensor:
        """Zero where every weight is fully down or up; annealing beta from high to low pushes them there."""
        return (1 - (2 * self.up() - 1).abs().pow(beta)).sum()

    def round_up(self) -> torch.Tensor:
        return (self.logit.detach() >= 0).to(torch.uint8)  # h >= 1/2


def reconstruct(quantized: nn.Module, fp_model: nn.Module, images: torch.Tensor, config: PtqConfig | None = None,
                progress: bool | None = None) -> nn.Module:
    """Reconstruct `quantized` (post-training quantized, calibrated) in place against `fp_model` on
    `images` (unlabelled calibration images) with `config`'s settings (default: [ptq]'s defaults);
    returns it in eval mode."""
    config = config or PtqConfig()
    device = training_device(config.device)
    blocks = find_blocks(quantized, images[:1], QuantizedLayer)
    _restore_outer_batchnorms(quantized, fp_model, blocks)
    quantized.eval().requires_grad_(False).to(device)
    fp_model = fp_model.eval().to(device)
    images = images.to(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            for name in bar(len(blocks), "reconstruct", progress, iterable=blocks):
                inputs = _captured(quantized, name, images, output=False)
                targets = _captured(fp_model, name, images, output=True)
                _fit(quantized.get_submodule(name), inputs, targets, config)
    finally:
        quantized.to("cpu")
        fp_model.to("cpu")
    return quantized


def _restore_outer_batchnorms(quantized: nn.Module, fp_model: nn.Module, blocks: list[str]) -> None:
    """BatchNorms outside every block get full precision's statistics back: the blocks before them are fitted
    to full precision's outputs, so BatchNorm correction's shift for rounding to nearest no longer applies."""
    fp_modules = dict(fp_model.named_modules())
    for name, module in quantized.named_modules():
        inside = any(name.startswith(block + ".") for block in blocks)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not inside and name in fp_modules:
            module.running_mean.copy_(fp_modules[name].running_mean)
            module.running_var.copy_(fp_modules[name].running_var)


class _Captured(Exception):
    """Stops a forward pass once the block's tensor is captured: nothing after it is needed."""


def _captured(model: nn.Module, name: str, images: torch.Tensor, output: bool, batch_size: int = 256) -> torch.Tensor:
    """The input (or output) of module `name` on every image, computed by `model` as it is now."""
    found = []

    def hook(_module, args, result):
        found.append((result if output else args[0]).detach())
        raise _Captured

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                try:
                    model(batch)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(found)


def _fit(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: PtqConfig) -> None:
    """Learn `block`'s roundings and input ranges so that block(inputs) matches `targets` (squared error
    summed over channels), then fix them: hard roundings, ranges frozen, no dropping. Where the result
    fits the calibration images worse than what the block had (too few steps), the block keeps that."""
    layers = [block] if isinstance(block, QuantizedLayer) else list(quantized_layers(block))
    quantizers = [layer.input_quantizer for layer in layers if layer.input_quantizer is not None]
    before = {name: value.clone() for name, value in block.state_dict().items()}
    error_before = _error(block, inputs, targets)
    _learn(block, layers, quantizers, inputs, targets, config)
    if _error(block, inputs, targets) > error_before:
        for layer in layers:
            layer.round_up = None
        block.load_state_dict(before)
        for layer in layers:
            layer.refresh()


def _error(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    with torch.no_grad():
        return sum(float((block(x) - y).pow(2).sum(1).sum()) for x, y in zip(inputs.split(batch_size),
                                                                           targets.split(batch_size)))


def _learn(block: nn.Module, layers: list[QuantizedLayer], quantizers: list, inputs: torch.Tensor, targets: torch.Tensor,
           config: PtqConfig) -> None:
    """The optimization itself: soft roundings and ranges by Adam, the rounding regularizer annealed."""
    if config.learn_rounding:
        for layer in layers:
            layer.rounding = SoftRounding(layer).to(inputs.device)
    roundings = [layer.rounding for layer in layers if layer.rounding is not None]
    ranges = [quantizer.clip for quantizer in quantizers] if config.learn_activation_ranges else []
    groups = ([{"params": [r.logit for r in roundings], "lr": config.learning_rate}] if roundings else []) + \
             ([{"params": ranges, "lr": config.range_learning_rate}] if ranges else [])
    if not groups:
        return
    for parameter in ranges:
        parameter.requires_grad_(True)
    for quantizer in quantizers:
        quantizer.drop_probability = config.drop_probability
    optimizer = torch.optim.Adam(groups)
    warmup = int(WARMUP * config.iterations)
    try:
        with torch.enable_grad():
            for step in range(config.iterations):
                index = torch.randint(len(inputs), (config.batch_size,), device=inputs.device)
                loss = (block(inputs[index]) - targets[index]).pow(2).sum(1).mean()
                if roundings and step >= warmup:
                    decay = 1 - (step - warmup) / max(config.iterations - warmup, 1)
                    beta = BETA_END + (BETA_START - BETA_END) * decay
                    loss = loss + config.rounding_weight * sum(r.regularizer(beta) for r in roundings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for layer in layers:
            if layer.rounding is not None:
                layer.round_up = layer.rounding.round_up()
                layer.rounding = None
            layer.refresh()
        for parameter in ranges:
            parameter.requires_grad_(False)
        for quantizer in quantizers:
            quantizer.drop_probability = 0.0
