"""Signed quantization grids on [-1, 1] with 2^b - 1 levels: uniform, power-of-two, inverse PoT.

Rounding is to the nearest level with ties away from zero. Exponent grids run out of float
precision at high bit-widths: IPoT's 1 - 2^-j equals 1 for j >= 53 in float64 (j >= 24 in float32),
so IPoT above 6 bits has fewer distinct levels than 2^b - 1; use uniform there. Gradients pass straight through the
rounding (STE), so the same functions serve post-training quantization and fine-tuning.
"""

from __future__ import annotations

import functools

import torch

from .errors import UserError

GRIDS = ("uniform", "pot", "ipot")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise UserError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


@functools.cache
def positive_levels(grid: str, bits: int) -> torch.Tensor:
    """The 2^(b-1) non-negative levels (0 first, 1 last) in float64; negatives mirror them."""
    check_grid(grid)
    check_bits(bits)
    count = 2 ** (bits - 1) - 1  # non-zero levels per sign
    if grid == "uniform":
        levels = [k / count for k in range(1, count + 1)]
    elif grid == "pot":
        levels = [2.0**-j for j in range(count)]
    else:  # ipot: dense near the edge, mirror of PoT
        levels = [1.0 - 2.0**-j for j in range(1, count)] + [1.0]
    return torch.tensor([0.0] + sorted(levels), dtype=torch.float64)


def level_index(x: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """Signed integer codes: sign(x) * index of |x|'s nearest non-negative level (ties away from 0)."""
    magnitude = x.abs().clamp(max=1.0)
    if grid == "uniform":
        count = 2 ** (bits - 1) - 1
        index = torch.floor(magnitude * count + 0.5)
    else:
        levels = positive_levels(grid, bits)
        midpoints = ((levels[1:] + levels[:-1]) / 2).to(x.device, x.dtype)
        index = torch.bucketize(magnitude, midpoints, right=True).to(x.dtype)
    return torch.sign(x) * index


def codes_to_values(codes: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """Grid values in [-1, 1] for signed integer codes from `level_index`."""
    if grid == "uniform":
        return codes / (2 ** (bits - 1) - 1)
    levels = positive_levels(grid, bits).to(codes.device, codes.dtype)
    return torch.sign(codes) * levels[codes.abs().long()]


def quantize(x: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """x in [-1, 1] -> nearest grid value, with a straight-through gradient."""
    with torch.no_grad():
        rounded = codes_to_values(level_index(x, grid, bits), grid, bits)
    return x + (rounded - x).detach()
