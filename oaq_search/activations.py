"""Activation fake-quantizers: uniform, unsigned after ReLU and signed otherwise, calibrated ranges.

The observer keeps a fixed-size random sample of the values it saw on calibration batches, so the
range for any bit-width (percentile or MSE-optimal clip) is computed from it without re-running data.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .grids import INT8_MAX, check_bits

CALIBRATION_METHODS = ("percentile", "mse")
_SAMPLE_SIZE = 200_000
_HISTOGRAM_BINS = 4096


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input to `bits`, with a straight-through gradient."""

    def __init__(self, bits: int, method: str = "mse", percentile: float = 99.99):
        super().__init__()
        if method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        self.bits = check_bits(bits, "activation_bits")
        self.method = method
        self.percentile = percentile
        self.observing = False
        self.fit_on_first_batch = False
        self.register_buffer("sample", torch.empty(0), persistent=False)  # calibration only, never saved
        # The range's upper end: a parameter, so fine-tuning can learn it (LSQ-style), frozen otherwise.
        self.clip = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        self.register_buffer("signed_flag", torch.tensor(False))
        self.drop_probability = 0.0  # reconstruction (QDrop): each value passes unquantized with this probability

    @property
    def calibrated(self) -> bool:
        return bool(self.clip > 0)

    @property
    def range(self) -> tuple[float, float]:
        """(low, high): (0, clip) when unsigned, (-clip, clip) when signed."""
        clip = float(self.clip.detach())
        return (-clip if bool(self.signed_flag) else 0.0, clip)

    def set_range(self, low: float, high: float) -> None:
        """Fix the range (from a plan) without calibration; low is 0 (unsigned) or -high (signed)."""
        with torch.no_grad():
            self.clip.copy_(torch.tensor(high))
        self.signed_flag = torch.tensor(low < 0)
        self.observing = False

    def start_observing(self, fit_on_first_batch: bool = False) -> None:
        """Forget earlier observations; the next forward passes are recorded, not quantized.

        `fit_on_first_batch`: the range is fixed from the first batch seen and that batch is quantized
        already, so one pass fits every layer on inputs its upstream layers have quantized."""
        self.sample = torch.empty(0)
        self.observing = True
        self.fit_on_first_batch = fit_on_first_batch

    def set_bits(self, bits: int) -> None:
        self.bits = check_bits(bits, "activation_bits")
        if self.sample.numel() > 0:
            self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            if not self.fit_on_first_batch:
                return x
            self.freeze()
        if not self.calibrated:
            raise UserError("activation quantizer used before calibration: run calibrate_activations() first")
        quantized = fake_quantize_activation(x, self.clip.clamp(min=1e-8), self.bits, bool(self.signed_flag))
        if self.drop_probability > 0:
            return torch.where(torch.rand_like(x) < self.drop_probability, x, quantized)
        return quantized

    def _observe(self, x: torch.Tensor) -> None:
        values = x.detach().flatten()
        if values.numel() > _SAMPLE_SIZE:
            values = values[torch.randint(values.numel(), (_SAMPLE_SIZE,), generator=_generator(values))]
        merged = torch.cat([self.sample, values.float()])
        if merged.numel() > _SAMPLE_SIZE:
            merged = merged[torch.randperm(merged.numel(), generator=_generator(merged))[:_SAMPLE_SIZE]]
        self.sample = merged
        self.signed_flag = torch.tensor(bool((self.sample < 0).any()))

    def freeze(self) -> None:
        """Fix the clip range from the observed sample for the current bits and method."""
        if self.method == "percentile":
            clip = torch.quantile(self.sample.abs(), self.percentile / 100)
        else:
            clip = _mse_clip(self.sample, self.bits, bool(self.signed_flag))
        with torch.no_grad():
            self.clip.copy_(clip.clamp(min=1e-8))
        self.observing = False


class OutputQuantizer(nn.Module):
    """Rounds a layer's output to int8 as ONNX Runtime requantizes it between integer kernels: steps of
    clip / 127 from -128 to 127, clip the largest magnitude seen while observing (`kernel_rounding.py`).
    Also while training: QAT that skipped it (a fifth faster) ended 0.31 points lower (W4A4 ResNet-20,
    seed 0), the peak range's steps being coarse for the heavy-tailed outputs before residual adds.
    Reconstruction passes it by (`passing`; `kernel_rounding.outputs_unrounded`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("clip", torch.tensor(0.0))
        self.observing = False
        self.passing = False  # outputs pass unrounded

    def start_observing(self) -> None:
        """Forget the range; the next forward passes are recorded, not rounded."""
        self.clip.zero_()
        self.observing = True

    def freeze(self) -> None:
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.clip = torch.maximum(self.clip, x.detach().abs().amax().to(self.clip))
            return x
        if self.passing:
            return x
        step = self.clip.clamp(min=1e-8) / INT8_MAX
        scaled = torch.clamp(x / step, -INT8_MAX - 1, INT8_MAX)
        return (scaled + (torch.round(scaled) - scaled).detach()) * step


class OutputHook:
    """A forward hook that passes a module's output through a layer's `OutputQuantizer`: the module is the
    layer, or the BatchNorm after it, whose output a deployment requantizes."""

    def __init__(self, quantizer: OutputQuantizer):
        self.quantizer = quantizer

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self.quantizer(output)


def remove_output_hooks(model: nn.Module) -> None:
    """Take every `OutputHook` off `model`'s modules (a plain model is no longer requantized)."""
    for module in model.modules():
        for key in [key for key, hook in module._forward_hooks.items() if isinstance(hook, OutputHook)]:
            del module._forward_hooks[key]


def activation_levels(bits: int, signed: bool) -> int:
    """The steps from zero to the clip: 2^b - 1 unsigned, 2^(b-1) - 1 each side signed."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def fake_quantize_activation(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Uniform quantization of x to [0, clip] (unsigned) or [-clip, clip] (signed), STE gradient."""
    levels = activation_levels(bits, signed)
    step = clip / levels
    low = -levels if signed else 0
    scaled = torch.clamp(x / step, low, levels)
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return rounded * step


def _mse_clip(sample: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The clip, of 96 candidates up to the largest magnitude, with the least squared error on `sample`.

    Scored on the sample's 4,096-bin histogram rather than its 200,000 values: the same clip on
    Gaussian, heavy-tailed and signed samples at 2-8 bits, about 6x faster (it ran twice per layer
    per trial, the largest part of a trial with quantized activations)."""
    top = float(sample.abs().max())
    counts, edges = torch.histogram(sample, bins=_HISTOGRAM_BINS, range=(-top, top) if signed else (0.0, top))
    centres = (edges[1:] + edges[:-1]) / 2
    candidates = top * torch.linspace(0.05, 1.0, 96)
    errors = ((fake_quantize_activation(centres[None, :], candidates[:, None], bits, signed) - centres) ** 2 * counts).sum(1)
    return candidates[int(errors.argmin())]


def _generator(values: torch.Tensor) -> torch.Generator:
    return torch.Generator().manual_seed(values.numel())
