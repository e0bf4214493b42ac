"""Signed quantization grids on [-1, 1]: uniform, power-of-two, inverse PoT, and mid-rise uniform.

The first three are mid-tread: 2^b - 1 levels, zero among them, codes -(2^(b-1) - 1) .. 2^(b-1) - 1
(at 2 bits they are ternary). `midrise` uses every b-bit code: 2^b levels (k + 1/2) / (2^(b-1) - 1/2)
for codes k = -2^(b-1) .. 2^(b-1) - 1, and no zero; at 2 bits it has four levels where the others
have three. Rounding is to the nearest level with ties away from zero. Exponent grids run out of
float precision at high bit-widths: IPoT's 1 - 2^-j equals 1 for j >= 53 in float64 (j >= 24 in
float32), so IPoT above 6 bits has fewer distinct levels than 2^b - 1; use uniform there. Gradients
pass straight through the rounding (STE), so the same functions serve post-training quantization
and fine-tuning.
"""

from __future__ import annotations

import functools

import torch

from .choices import GRIDS
from .errors import UserError

MIN_BITS, MAX_BITS = 2, 8
INT8_MAX = 127
FLOAT_INPUT_BITS = 32  # in a searched list of input bits: the input stays float (the layer runs a float kernel)


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise UserError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


def code_range(grid: str, bits: int) -> tuple[int, int]:
    """The smallest and largest signed code of `grid` at `bits`."""
    half = 2 ** (bits - 1)
    return (-half, half - 1) if grid == "midrise" else (1 - half, half - 1)


def is_ternary(grid: str, bits: int) -> bool:
    """Whether codes take three values (-1, 0, 1): what base-3 packing needs."""
    low, high = code_range(grid, bits)
    return high - low + 1 == 3


@functools.cache
def positive_levels(grid: str, bits: int) -> torch.Tensor:
    """The 2^(b-1) levels of a magnitude in float64, ascending, 1 last (0 first unless midrise)."""
    check_grid(grid)
    check_bits(bits)
    count = 2 ** (bits - 1) - 1  # non-zero levels per sign of the mid-tread grids
    if grid == "midrise":
        return torch.tensor([(k + 0.5) / (count + 0.5) for k in range(count + 1)], dtype=torch.float64)
    if grid == "uniform":
        levels = [k / count for k in range(1, count + 1)]
    elif grid == "pot":
        levels = [2.0**-j for j in range(count)]
    else:  # ipot: dense near the edge, mirror of PoT
        levels = [1.0 - 2.0**-j for j in range(1, count)] + [1.0]
    return torch.tensor([0.0] + sorted(levels), dtype=torch.float64)


def levels(grid: str, bits: int) -> torch.Tensor:
    """Every signed level of `grid` at `bits`, ascending, in float64."""
    positive = positive_levels(grid, bits)
    negative = -positive.flip(0) if grid == "midrise" else -positive[1:].flip(0)
    return torch.cat([negative, positive])


def level_index(x: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """Signed integer codes of x's nearest levels, ties away from zero (see `code_range`)."""
    magnitude = x.abs().clamp(max=1.0)
    if grid == "midrise":  # the magnitude's level index, then codes k >= 0 above zero and -k - 1 below
        count = 2 ** (bits - 1)
        index = torch.floor(magnitude * (count - 0.5)).clamp(max=count - 1)
        return torch.where(x < 0, -index - 1, index)
    if grid == "uniform":
        count = 2 ** (bits - 1) - 1
        index = torch.floor(magnitude * count + 0.5)
    else:
        midpoints = ((positive_levels(grid, bits)[1:] + positive_levels(grid, bits)[:-1]) / 2).to(x.device, x.dtype)
        index = torch.bucketize(magnitude, midpoints, right=True).to(x.dtype)
    return torch.sign(x) * index


def floor_code(x: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """The code of the highest level at or below x, never the top code: x lies between the levels of
    this code and the next, the two choices a learned rounding (AdaRound) picks from."""
    every = levels(grid, bits).to(x.device, x.dtype)
    index = torch.bucketize(x.clamp(-1.0, 1.0).contiguous(), every, right=True) - 1
    return (index.clamp(0, len(every) - 2) + code_range(grid, bits)[0]).to(x.dtype)


def rounded_codes(x: torch.Tensor, grid: str, bits: int, round_up: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of x: the nearest levels, or with `round_up` (0/1 per value) the level below or above."""
    return level_index(x, grid, bits) if round_up is None else floor_code(x, grid, bits) + round_up.to(x.dtype)


@functools.cache
def int8_lattice(grid: str, bits: int) -> int | None:
    """The smallest m that makes every level times m an integer within int8 (levels end at 1, so m is
    the largest): how an int8 container holds the grid's codes. None for a grid it cannot hold (PoT and
    IPoT above 4 bits, midrise at 8)."""
    every = levels(grid, bits)
    return next((m for m in range(1, INT8_MAX + 1) if (every * m - torch.round(every * m)).abs().max() < 1e-6), None)


def codes_to_values(codes: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """Grid values in [-1, 1] for signed integer codes from `level_index`."""
    if grid == "midrise":
        return (codes + 0.5) / (2 ** (bits - 1) - 0.5)
    if grid == "uniform":
        return codes / (2 ** (bits - 1) - 1)
    positive = positive_levels(grid, bits).to(codes.device, codes.dtype)
    return torch.sign(codes) * positive[codes.abs().long()]


def quantize(x: torch.Tensor, grid: str, bits: int, round_up: torch.Tensor | None = None) -> torch.Tensor:
    """x in [-1, 1] -> its grid value (nearest, or as `round_up` says), with a straight-through gradient."""
    with torch.no_grad():
        rounded = codes_to_values(rounded_codes(x, grid, bits, round_up), grid, bits)
    return x + (rounded - x).detach()
