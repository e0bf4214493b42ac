"""Build the `local-cpu` target by timing this machine's real kernels for a model's layer shapes.

Each quantizable layer is timed at batch 1 twice: as float32 (torch's Conv2d/Linear) and as int8
(torch.ao quantized kernels on the default quantized engine, x86/fbgemm here), the int8 time
including quantizing its input and dequantizing its output, as a layer runs inside a float model.
Weights of 2 to 8 bits all run on the int8 kernel (stored packed, unpacked at load), so the table
lists the same time for each. Activations are int8 (8) or float32 (32, what a plan's `None` means).
`other_ops_s` is the float model's time minus its layers' times: BatchNorm, ReLU, adds, pooling.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.ao.nn.quantized as quantized_nn
from torch import nn

from oaq_search.graph import LayerGraph

from .target import layer_key

WEIGHT_BITS = list(range(2, 9))


class Int8Layer(nn.Module):
    """A Conv2d/Linear run on torch's int8 kernels, float in and float out."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, input_scale: float = 0.05, output_scale: float = 0.05):
        super().__init__()
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; they are the real kernels
            warnings.simplefilter("ignore")
            weight = torch.quantize_per_tensor(layer.weight.detach(), float(layer.weight.abs().max()) / 127 or 1.0,
                                               0, torch.qint8)
            if isinstance(layer, nn.Conv2d):
                self.kernel = quantized_nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                                  layer.stride, layer.padding, layer.dilation, layer.groups,
                                                  bias=layer.bias is not None)
            else:
                self.kernel = quantized_nn.Linear(layer.in_features, layer.out_features, bias_=layer.bias is not None)
            self.kernel.set_weight_bias(weight, None if layer.bias is None else layer.bias.detach())
        self.kernel.scale, self.kernel.zero_point = output_scale, 128
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(torch.quantize_per_tensor(x, self.input_scale, 128, torch.quint8)).dequantize()


def median_seconds(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_local_cpu(model: nn.Module, graph: LayerGraph, input_shape: tuple[int, ...], repeats: int = 50) -> dict:
    """A target table (TOML-ready dict) with measured float32 and int8 times for every layer shape."""
    modules = dict(model.named_modules())
    entries, float_total = [], 0.0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in graph.infos():
            layer = modules[info.name]
            x = torch.randn(1, *info.input_shape)
            float_s = median_seconds(lambda: layer(x), repeats)
            int8 = Int8Layer(layer)
            int8_s = median_seconds(lambda: int8(x), repeats)
            float_total += float_s
            shape = layer_shape(info)
            entries += [{**shape, "weight_bits": bits, "activation_bits": 8, "latency_s": int8_s} for bits in WEIGHT_BITS]
            entries += [{**shape, "weight_bits": bits, "activation_bits": 32, "latency_s": float_s} for bits in WEIGHT_BITS]
        images = torch.randn(1, *input_shape)
        model_s = median_seconds(lambda: model(images), repeats)
    description = (f"measured on this machine, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"engine {torch.backends.quantized.engine}")
    return target_table("local-cpu", description, entries, model_s - float_total, [8, 32], 32)


def target_table(name: str, description: str, entries: list[dict], other_ops_s: float, activation_bits: list[int],
                 default_activation_bits: int) -> dict:
    """A measured target (TOML-ready dict): exact per-layer `entries`, `other_ops_s` (never below 0), and per
    op a MACs-per-second rate for int8 and float from their sums (the fallback for shapes not measured)."""
    def rate(bits: int) -> dict:
        timed = [e for e in entries if e["activation_bits"] == bits and e["weight_bits"] == 8]
        return {"macs_per_s": sum(e["macs"] for e in timed) / max(sum(e["latency_s"] for e in timed), 1e-12)}

    return {
        "target": {"name": name, "default_activation_bits": default_activation_bits, "other_ops_s": max(other_ops_s, 0.0),
                   "description": description},
        "capabilities": {"weight_bits": {"conv2d": WEIGHT_BITS, "linear": WEIGHT_BITS},
                         "activation_bits": {"conv2d": activation_bits, "linear": activation_bits},
                         "scale_formats": ["float32", "pow2"]},
        "rates": {op: {"w8a8": rate(8), f"w8a{default_activation_bits}": rate(default_activation_bits)}
                  for op in ("conv2d", "linear")},
        "layers": [{k: v for k, v in e.items() if k != "macs"} for e in entries],
    }


def layer_shape(info) -> dict:
    """What a target's exact entry names a layer by (its op and shape), and its MACs for the rates."""
    key = layer_key(info.op_type, info, 0, 0)
    shape = {"op": info.op_type, "in_channels": key[1], "out_channels": key[2], "kernel": key[3], "stride": key[4],
             "groups": key[5], "macs": info.macs}
    if info.op_type == "conv2d":
        shape["input_hw"] = list(key[6:-2])
    return shape
