"""Target-independent metrics: packed weight bytes, peak activation bytes, and BOPs."""

from __future__ import annotations

import numpy as np

from oaq_search.graph import LayerGraph
from oaq_search.packing import code_bytes, packed_weight_bytes
from oaq_search.plan import Plan

from .base import CostModel, CostReport

FULL_PRECISION_BITS = 32


class MemoryModel(CostModel):
    """Weight bytes as packed (codes, scales, offsets, biases), activation liveness peak, BOPs."""

    name = "memory"
    units = {"weight_bytes": "B", "peak_activation_bytes": "B", "bops": "bit-ops"}

    def evaluate(self, graph: LayerGraph, plan: Plan) -> CostReport:
        plan.check_against(graph)
        per_layer = {}
        activation_bits = {}
        for layer in plan.layers:
            info = graph.info(layer.name)
            scale_count = info.weight_shape[0] if layer.per_channel else 1
            bias_count = info.params - info.weight_count
            input_bits = layer.activation_bits or FULL_PRECISION_BITS
            activation_bits[layer.name] = input_bits
            per_layer[layer.name] = {
                "weight_bytes": packed_weight_bytes(info.weight_count, layer.weight_bits, scale_count, bias_count,
                                                    layer.code_packing),
                "bops": info.macs * layer.weight_bits * input_bits,
            }
        planned = set(per_layer)
        for info in graph.infos():  # layers left out of the plan stay float32
            if info.name not in planned:
                per_layer[info.name] = {
                    "weight_bytes": info.params * FULL_PRECISION_BITS // 8,
                    "bops": info.macs * FULL_PRECISION_BITS * FULL_PRECISION_BITS,
                }
        totals = {metric: sum(costs[metric] for costs in per_layer.values()) for metric in ("weight_bytes", "bops")}
        # Tensors no quantized layer reads (add operands, logits) are kept at the widest planned precision.
        widest = max(activation_bits.values()) if len(activation_bits) == len(graph.names) else FULL_PRECISION_BITS
        totals["peak_activation_bytes"] = graph.peak_activation_bytes(activation_bits, widest)
        return CostReport(totals, per_layer)

    def evaluate_many(self, graph: LayerGraph, weight_bits: np.ndarray,
                      activation_bits: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """weight_bytes and bops for plans x layers arrays of bits (per-tensor scales), vectorized."""
        infos = graph.infos()
        counts = np.array([info.weight_count for info in infos], dtype=np.int64)
        macs = np.array([info.macs for info in infos], dtype=np.float64)
        extras = sum(packed_weight_bytes(0, 8, 1, info.params - info.weight_count) for info in infos)
        bits = np.asarray(weight_bits, dtype=np.int64)
        acts = np.full(bits.shape, FULL_PRECISION_BITS) if activation_bits is None else np.asarray(activation_bits)
        weight_bytes = code_bytes(counts, bits, self.code_packing).sum(axis=1) + extras
        return {"weight_bytes": weight_bytes.astype(np.float64), "bops": (macs * bits * acts).sum(axis=1)}


class TernaryPackedMemoryModel(MemoryModel):
    """`memory` for a target that stores 2-bit layers' ternary codes five to a byte: 1.6 bits a weight."""

    name = "memory-base3"
    code_packing = "base3"
