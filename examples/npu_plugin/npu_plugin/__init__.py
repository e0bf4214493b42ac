"""An accelerator cost model shipped as its own package, selected by name through an entry point.

The hypothetical NPU runs 4- and 8-bit weights with 8-bit activations; 4-bit weights run at twice
the 8-bit MAC rate; each layer pays a fixed dispatch cost.
"""

from hwmodels import CostModel, CostReport, MemoryModel

MACS_PER_S = {8: 2.0e11, 4: 4.0e11}
DISPATCH_S = 3e-6


class ExampleNPU(CostModel):
    name = "example-npu"
    units = {**MemoryModel.units, "latency_s": "s"}

    def legal_bits(self, op_type, kind):
        return [4, 8] if kind == "weight_bits" else [8]

    def evaluate(self, graph, plan):
        report = MemoryModel().evaluate(graph, plan)
        for layer in plan.layers:
            if layer.weight_bits not in MACS_PER_S:
                from oaq_search.errors import UserError

                raise UserError(f"layer {layer.name}: example-npu runs weight bits 4 or 8, not {layer.weight_bits}")
            latency = graph.info(layer.name).macs / MACS_PER_S[layer.weight_bits] + DISPATCH_S
            report.per_layer[layer.name]["latency_s"] = latency
        report.totals["latency_s"] = sum(costs["latency_s"] for costs in report.per_layer.values())
        return CostReport(report.totals, report.per_layer)
