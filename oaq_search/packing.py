"""The deployable form: integer codes bit-packed, plus per-layer scales, offsets and biases.

`packed_weight_bytes` is the single size formula: the memory cost model uses it to predict and
`pack_model` produces files whose layer payloads have exactly that many bytes.

Codes are packed one of two ways (a layer's `code_packing`): "fields", each code in its own b-bit
field; or "base3", for ternary layers only (2 bits on a grid with a zero level, codes -1, 0, 1): five as the
base-3 digits of one byte (3^5 = 243 <= 256), 1.6 bits a weight instead of 2, decoded on the
target with a 256-entry table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .fake_quant import quantized_layers
from .grids import code_range
from .errors import UserError
from .files import save_atomically
from .oaq import QuantizedWeight
from .plan import TERNARY_BITS, Plan, check_code_packing

FLOAT_BYTES = 4  # scales, offsets and biases are stored as float32
PACKED_FORMAT = "oaq-packed-2"  # 2: layers say their code packing
TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = 3 ** np.arange(TRITS_PER_BYTE)


def code_bytes(weight_count, bits, packing: str = "fields"):
    """Bytes of packed codes; `weight_count` and `bits` may be numpy arrays (base3 applies where bits == 2)."""
    counts = np.asarray(weight_count)
    fields = -(-counts * bits // 8)
    if packing == "base3":
        return np.where(np.asarray(bits) == TERNARY_BITS, -(-counts // TRITS_PER_BYTE), fields)
    return fields


def packed_weight_bytes(weight_count: int, bits: int, scale_count: int = 1, bias_count: int = 0,
                        packing: str = "fields") -> int:
    """Bytes of one layer's packed codes plus its float32 scales, offsets and bias."""
    return int(code_bytes(weight_count, bits, packing)) + FLOAT_BYTES * (2 * scale_count + bias_count)


def pack_codes(codes: torch.Tensor, bits: int, packing: str = "fields", grid: str = "uniform") -> torch.Tensor:
    """Signed codes -> unsigned (code minus the grid's lowest code) packed into uint8: dense `bits`-bit
    fields, or base-3 digits."""
    unsigned = (codes.flatten().to(torch.int16) - code_range(grid, bits)[0]).numpy().astype(np.uint8)
    if check_code_packing(packing, bits, grid) == "base3":
        digits = np.pad(unsigned, (0, -len(unsigned) % TRITS_PER_BYTE)).reshape(-1, TRITS_PER_BYTE)
        return torch.from_numpy((digits @ _TRIT_WEIGHTS).astype(np.uint8))
    bit_matrix = np.unpackbits(unsigned[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(bit_matrix.flatten()))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], packing: str = "fields",
                 grid: str = "uniform") -> torch.Tensor:
    count = math.prod(shape)
    if check_code_packing(packing, bits, grid) == "base3":
        unsigned = (packed.numpy()[:, None].astype(np.int64) // _TRIT_WEIGHTS % 3).flatten()[:count]
    else:
        bit_matrix = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits)
        unsigned = np.packbits(np.pad(bit_matrix, ((0, 0), (8 - bits, 0))), axis=1).flatten()
    return torch.from_numpy(unsigned.astype(np.int16) + code_range(grid, bits)[0]).to(torch.int8).reshape(shape)


def pack_model(model: nn.Module, plan: Plan, path: str | Path, input_shape: tuple[int, ...] | None = None) -> int:
    """Write the quantized model (packed layers + every other tensor) and return its layer bytes.

    The file holds only tensors, strings and numbers, so `torch.load(weights_only=True)` reads it.
    `input_shape`, one image's (C, H, W), lets `deploy` export it without data.
    """
    layers, payload_bytes = {}, 0
    for layer in quantized_layers(model):
        quantized = layer.codes()
        bits = layer.weight_quantizer.bits
        packing = plan.layer(layer.name).code_packing
        bias = layer.layer.bias
        entry = {
            "codes": pack_codes(quantized.codes, bits, packing, layer.weight_quantizer.grid),
            "shape": list(quantized.codes.shape),
            "bits": bits,
            "packing": packing,
            "grid": layer.weight_quantizer.grid,
            "scale": quantized.scale.float(),
            "offset": quantized.offset.float(),
        }
        if bias is not None:
            entry["bias"] = bias.detach().float()
        layers[layer.name] = entry
        payload_bytes += (entry["codes"].numel() + FLOAT_BYTES * (entry["scale"].numel() + entry["offset"].numel()
                          + (bias.numel() if bias is not None else 0)))
    quantized_names = {f"{name}.{suffix}" for name in layers for suffix in ("layer.weight", "layer.bias", "round_up")}
    rest = {k: v for k, v in model.state_dict().items() if k not in quantized_names}
    payload = {"format": PACKED_FORMAT, "plan": plan.to_json(), "layers": layers, "state": rest}
    if input_shape is not None:
        payload["input_shape"] = [int(size) for size in input_shape]
    save_atomically(payload, path)
    return payload_bytes


@dataclass
class PackedModel:
    """What `pack_model` wrote: the plan, each quantized layer's codes, and every other tensor."""

    plan: Plan
    layers: dict[str, dict]  # per layer: codes (unpacked, int8), scale, offset, bits, grid, bias (optional)
    state: dict[str, torch.Tensor]  # the rest of the quantized model's state_dict (BatchNorm, activation ranges)
    input_shape: tuple[int, ...] | None = None  # one image's (C, H, W); None in files written before it

    def weight(self, name: str) -> QuantizedWeight:
        entry = self.layers[name]
        return QuantizedWeight(entry["codes"], entry["scale"], entry["offset"])


def load_packed(path: str | Path) -> PackedModel:
    """Read a packed model (`weights_only=True`), its codes unpacked; one-line errors for other files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"packed model {path} does not exist: `quantize`, `apply`, `finetune` and `run` write one")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged or not a torch file at all: many exception types
        raise UserError(f"packed model {path} cannot be read: {str(error).strip().splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != PACKED_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{path} is not a packed model of format {PACKED_FORMAT} (found {found!r}): write it again "
                        f"with `oaq-search apply --out`")
    try:
        plan = Plan.from_dict(json.loads(payload["plan"]), f"packed model {path}")
        layers = {name: {**entry, "codes": unpack_codes(entry["codes"], entry["bits"], tuple(entry["shape"]),
                                                        entry["packing"], entry["grid"])}
                  for name, entry in payload["layers"].items()}
        shape = payload.get("input_shape")
        return PackedModel(plan, layers, dict(payload["state"]), None if shape is None else tuple(int(size) for size in shape))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"packed model {path} is damaged ({type(error).__name__}: {error}): write it again") from None
