"""OAQ weight reshaping: normalise, pull outliers toward the bulk, quantize, de-normalise.

Per layer (see shared/docs/oaq-method.md, section 2):
  z = (w - mu) / sigma;  z~ = z inside +-T, else sign(z) * (T + s * (|z| - T));  R = max|z~|
  w^ = sigma * R * Q(z~ / R) + mu
s = 1 is vanilla max-range quantization, s = 0 clips at T. The `literal` method multiplies the
outliers by s instead (an ablation). Statistics are per tensor or per output channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import grids
from .choices import METHODS
from .errors import UserError

# Part of every cache key of results computed from quantized weights; bump when they change.
# 2: OAQ's mu held on a lattice int8 codes reach (`int8_offset`).
REVISION = 2
MIN_REFINEMENT = 16  # int8 refines a grid's lattice this often to hold mu (<= 1/32 step off), or the grid is centred on 0

# Gaussian-MSE-optimal clipping thresholds (sigma units) of the symmetric uniform grids: 2^b - 1
# levels (mid-tread, also used for pot and ipot) and 2^b levels (midrise); the method note's
# 1.7/2.2/2.6/4.0 are neither. tests/test_quantizers.py re-derives both.
DEFAULT_THRESHOLDS = {2: 1.22, 3: 1.95, 4: 2.47, 5: 2.90, 6: 3.27, 7: 3.61, 8: 3.92}
MIDRISE_THRESHOLDS = {2: 1.49, 3: 2.05, 4: 2.51, 5: 2.92, 6: 3.28, 7: 3.61, 8: 3.92}


def default_threshold(grid: str, bits: int) -> float:
    return (MIDRISE_THRESHOLDS if grid == "midrise" else DEFAULT_THRESHOLDS)[bits]


@dataclass(frozen=True)
class WeightQuantizer:
    """How one layer's weights are quantized. `scale_factor` is OAQ's s, `threshold` its T."""

    bits: int
    grid: str = "uniform"
    method: str = "oaq"
    scale_factor: float = 1.0
    threshold: float | None = None  # None: default_threshold(grid, bits)
    per_channel: bool = False

    def __post_init__(self):
        grids.check_bits(self.bits, "weight_bits")
        grids.check_grid(self.grid)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.scale_factor <= 1.0:
            raise UserError(f"scale_factor (OAQ's s) must be in [0, 1], got {self.scale_factor}")
        if self.threshold is not None and not 0 < self.threshold < math.inf:
            raise UserError(f"threshold (OAQ's T, in sigma units) must be positive and finite, got {self.threshold}")

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else default_threshold(self.grid, self.bits)


@dataclass(frozen=True)
class QuantizedWeight:
    """Deployable form: w^ = step * codes + offset, step = sigma * R / levels-denominator folded in."""

    codes: torch.Tensor  # signed integer codes, same shape as the weight
    scale: torch.Tensor  # sigma * R, per tensor (shape ()) or per output channel (C_out,)
    offset: torch.Tensor  # mu, same shape as scale


def normalize(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mu, sigma), statistics broadcastable against `weight`; sigma = 0 is replaced by 1."""
    dims = tuple(range(1, weight.dim())) if per_channel else tuple(range(weight.dim()))
    mu = weight.mean(dim=dims, keepdim=True)
    sigma = weight.std(dim=dims, keepdim=True, unbiased=False) if weight.numel() > 1 else torch.zeros_like(mu)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # a constant layer has z = 0
    return (weight - mu) / sigma, mu, sigma


def reshape_outliers(z: torch.Tensor, quantizer: WeightQuantizer, scale_factor: torch.Tensor | float | None = None) -> torch.Tensor:
    """z~: outliers beyond T moved toward the bulk. `scale_factor` overrides s (a learnable tensor)."""
    s = quantizer.scale_factor if scale_factor is None else scale_factor
    if quantizer.method == "vanilla":
        return z
    threshold = quantizer.effective_threshold
    magnitude = z.abs()
    if quantizer.method == "oaq":
        outside = torch.sign(z) * (threshold + s * (magnitude - threshold))
    else:  # literal ablation
        outside = z * s
    return torch.where(magnitude <= threshold, z, outside)


def fake_quantize_weight(weight: torch.Tensor, quantizer: WeightQuantizer, name: str = "weight",
                         scale_factor: torch.Tensor | None = None, round_up: torch.Tensor | None = None) -> torch.Tensor:
    """w^ in the weight's own units, differentiable w.r.t. `scale_factor` and the weight (STE).
    `round_up` (0/1 per weight, learned by reconstruction) replaces rounding to the nearest level."""
    x, mu, sigma, scale = normalized_grid_input(weight, quantizer, name, scale_factor)
    return sigma * scale * grids.quantize(x, quantizer.grid, quantizer.bits, round_up) + mu


def quantize_weight(weight: torch.Tensor, quantizer: WeightQuantizer, name: str = "weight",
                    round_up: torch.Tensor | None = None) -> QuantizedWeight:
    """Integer codes plus per-tensor or per-channel (scale, offset): what gets packed and deployed."""
    with torch.no_grad():
        x, mu, sigma, scale = normalized_grid_input(weight, quantizer, name)
        codes = grids.rounded_codes(x, quantizer.grid, quantizer.bits, round_up).to(torch.int8)
    shape = (-1,) if quantizer.per_channel else ()
    return QuantizedWeight(codes, (sigma * scale).reshape(shape), mu.reshape(shape))


def normalized_grid_input(weight, quantizer, name="weight", scale_factor=None):
    """(x in [-1, 1], mu, sigma, R): the reshaped, range-normalised weight and its statistics, mu where
    int8 holds it (`int8_offset`; 0 for grids too fine for int8 to refine: they are centred on zero)."""
    if not torch.isfinite(weight).all():
        raise UserError(f"layer {name} has NaN or inf weights: fix the checkpoint before quantizing")
    z, mu, sigma = normalize(weight, quantizer.per_channel)
    lattice = grids.int8_lattice(quantizer.grid, quantizer.bits)
    centred = lattice is not None and grids.INT8_MAX // lattice < MIN_REFINEMENT  # int8 holds no fine offset
    if centred:
        z, mu = z + mu / sigma, torch.zeros_like(mu)
    reshaped = reshape_outliers(z, quantizer, scale_factor)
    dims = tuple(range(1, z.dim())) if quantizer.per_channel else tuple(range(z.dim()))
    scale = reshaped.abs().amax(dim=dims, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)
    if centred:  # int8 holds mu = 0 as it is
        return reshaped / scale, mu, sigma, scale
    offset = int8_offset(mu, sigma * scale, quantizer.grid, quantizer.bits)
    return reshaped / scale + (mu - offset) / (sigma * scale), offset, sigma, scale


def int8_offset(mu: torch.Tensor, step: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """mu moved to the nearest point an int8 container holds beside the grid's codes (see
    `int8_refinement`), so the deployed ONNX model has the plan's weights exactly; it moves by at most
    half a refined step (1/32 of a grid step or less, for offsets under a step). Grids int8 cannot
    hold, and offsets beyond its reach, keep mu. Gradients pass straight through."""
    lattice = grids.int8_lattice(grid, bits)
    if lattice is None:
        return mu
    with torch.no_grad():
        units = (mu / step * lattice).reshape(-1).double()
        factor, shift = int8_refinement(units, lattice)
        within = (units - shift / factor).abs() <= 0.5 / factor  # not clipped: int8 reaches this offset
        held = torch.where(within, shift / factor, units).reshape(mu.shape).to(mu.dtype) * step / lattice
    return mu + (held - mu).detach()


def int8_refinement(units: torch.Tensor, lattice: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For offsets of `units` lattice steps (one per channel): the refinement F and integer k, offset
    ~ k / F steps, nearest the offset with codes * F + k inside int8 (F * lattice + |k| <= 127); F = 1
    and k clipped where none fits. How deployment stores codes and offset in one int8 tensor."""
    units = units.reshape(-1, 1).double()
    factors = torch.arange(1, grids.INT8_MAX // lattice + 1, dtype=torch.float64, device=units.device)
    shifts = torch.round(units * factors)
    fits = factors * lattice + shifts.abs() <= grids.INT8_MAX
    nearest = torch.where(fits, (units - shifts / factors).abs(), torch.inf).argmin(1, keepdim=True)  # F = 1 if none
    room = grids.INT8_MAX - lattice
    return factors[nearest].squeeze(1), shifts.gather(1, nearest).clamp(-room, room).squeeze(1)


def int8_steps(quantized: QuantizedWeight, grid: str, bits: int) -> torch.Tensor | None:
    """Per output channel, what one step of the int8 codes a deployment stores the weight in is worth: the
    grid's lattice step refined by `int8_refinement`. None where int8 cannot hold the grid."""
    lattice = grids.int8_lattice(grid, bits)
    if lattice is None:
        return None
    scale = quantized.scale.double().expand(quantized.codes.shape[0])
    factor, _shift = int8_refinement(quantized.offset.double().expand_as(scale) / scale * lattice, lattice)
    return scale / lattice / factor


def dequantize(quantized: QuantizedWeight, quantizer: WeightQuantizer) -> torch.Tensor:
    """w^ back from codes, scale and offset."""
    values = grids.codes_to_values(quantized.codes.to(torch.float32), quantizer.grid, quantizer.bits)
    shape = (-1,) + (1,) * (values.dim() - 1) if quantizer.per_channel else ()
    return quantized.scale.reshape(shape) * values + quantized.offset.reshape(shape)


# Candidates for the data-free choice of (s, T): s from the method note's range plus the two
# extremes (clipping, vanilla); T as multiples of the Gaussian default for the bit-width.
SCALE_FACTOR_CANDIDATES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
THRESHOLD_MULTIPLIERS = (0.75, 1.0, 1.25, 1.5, 2.0)


def candidate_thresholds(grid: str, bits: int) -> list[float]:
    return [round(default_threshold(grid, bits) * m, 4) for m in THRESHOLD_MULTIPLIERS]


def choose_outlier_settings(weight: torch.Tensor, quantizer: WeightQuantizer) -> WeightQuantizer:
    """OAQ without fine-tuning: the (s, T) that minimises the weight MSE, found by grid search.

    Weight MSE is the criterion because it is what quantization directly distorts, needs no data
    and is cheap; s = 1 is among the candidates, so the choice is never worse than vanilla. The
    error of a symmetric quantizer depends on |z| alone, so all candidates are scored at once on
    magnitudes: reshaped = min(|z|, T) + s * relu(|z| - T), range R = its maximum (closed form).
    Errors are compared in normalised units (sigma^2 times the weight MSE, per channel).
    """
    if quantizer.method == "vanilla":
        return quantizer
    if not torch.isfinite(weight).all():
        raise UserError("weights have NaN or inf values: fix the checkpoint before quantizing")
    thresholds = candidate_thresholds(quantizer.grid, quantizer.bits)
    with torch.no_grad():
        z, _, sigma = normalize(weight, quantizer.per_channel)
        rows = z.shape[0] if quantizer.per_channel else 1
        magnitude = z.abs().reshape(rows, -1)
        row_weight = sigma.reshape(-1, 1) ** 2  # back to weight units, per channel when per channel
        peak = magnitude.amax(dim=1, keepdim=True)
        candidates, errors = [], []
        for threshold in thresholds:
            bulk, excess = magnitude.clamp(max=threshold), (magnitude - threshold).clamp(min=0)
            for factor in SCALE_FACTOR_CANDIDATES:
                if quantizer.method == "oaq":
                    reshaped = bulk + factor * excess
                    scale = torch.where(peak > threshold, threshold + factor * (peak - threshold), peak)
                else:  # literal ablation: outliers multiplied by s
                    reshaped = torch.where(magnitude <= threshold, magnitude, factor * magnitude)
                    scale = reshaped.amax(dim=1, keepdim=True)
                scale = scale.clamp(min=torch.finfo(z.dtype).tiny)
                values = grids.codes_to_values(grids.level_index(reshaped / scale, quantizer.grid, quantizer.bits),
                                               quantizer.grid, quantizer.bits)
                errors.append((((values * scale - magnitude) ** 2).sum(dim=1, keepdim=True) * row_weight).sum())
                candidates.append((threshold, factor))
    best_threshold, best_factor = candidates[int(torch.stack(errors).argmin())]
    return replace(quantizer, scale_factor=best_factor, threshold=best_threshold)


def choose_outlier_settings_by_output(weight: torch.Tensor, quantizer: WeightQuantizer,
                                      output_errors: Callable[[torch.Tensor], torch.Tensor]) -> WeightQuantizer:
    """OAQ with calibration data: the (s, T) whose weight error changes the layer's output least.

    `output_errors(deltas)` takes K stacked weight errors (K, *weight.shape) and returns, per
    candidate, ||layer(x; delta)||^2 on the layer's inputs from calibration images: the error
    weighted by how much each weight is actually used. Outliers that weight MSE would clip are
    often the weights a layer relies on most; this keeps them when they matter. s = 1 (vanilla)
    is a candidate, so the output error never exceeds vanilla's.
    """
    if quantizer.method == "vanilla":
        return quantizer
    candidates = [replace(quantizer, scale_factor=factor, threshold=threshold)
                  for threshold in candidate_thresholds(quantizer.grid, quantizer.bits) for factor in SCALE_FACTOR_CANDIDATES]
    errors = []
    with torch.no_grad():
        for start in range(0, len(candidates), _CANDIDATES_PER_PASS):
            deltas = torch.stack([fake_quantize_weight(weight, c) - weight
                                  for c in candidates[start:start + _CANDIDATES_PER_PASS]])
            errors.append(output_errors(deltas))
    return candidates[int(torch.cat(errors).argmin())]


_CANDIDATES_PER_PASS = 7  # candidates scored by one stacked conv: fewer, larger kernels; bounded memory
