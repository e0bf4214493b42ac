"""local-cpu: predicted vs measured end-to-end latency of ResNet-20 plans on this machine.

`oaq-search hw measure` builds the table (each layer on torch's int8 and float32 kernels, batch 1).
Then each plan is deployed for real, layers with 8-bit activations replaced by int8 kernels, and
its whole forward pass timed (median of repeats). Reported: Spearman rho and the mean absolute
percentage error of the table's prediction.

    python benchmarks/local_cpu_latency.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from _common import checkpoint, write_results
from scipy import stats

from hwmodels import TargetModel
from hwmodels.measure import Int8Layer, measure_local_cpu, median_seconds
from oaq_search.fake_quant import _set_submodule
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.plan import LayerPlan, Plan


def deployed(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The model as it would run: int8 kernels where the plan quantizes activations, float elsewhere."""
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for layer in plan.layers:
        if layer.activation_bits == 8:
            _set_submodule(result, layer.name, Int8Layer(modules[layer.name]))
    return result.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import tempfile

    import tomli_w

    model = load_model("resnet20", checkpoint("resnet20"))
    graph = layer_graph("resnet20", model)
    table_path = tempfile.mktemp(suffix=".toml")
    with open(table_path, "w") as handle:
        handle.write(tomli_w.dumps(measure_local_cpu(model, graph, (3, 32, 32), args.repeats)))
    target = TargetModel(table_path)
    names = graph.names
    plans = {
        "all float": set(),
        "all int8": set(names),
        "first half int8": set(names[: len(names) // 2]),
        "second half int8": set(names[len(names) // 2:]),
        "every other int8": set(names[::2]),
        "stage 3 int8": {n for n in names if n.startswith("layer3")},
    }
    rows = []
    images = torch.randn(1, 3, 32, 32)
    for label, int8_layers in plans.items():
        plan = Plan("resnet20", [LayerPlan(n, 8, 8 if n in int8_layers else None) for n in names])
        predicted = target.evaluate(graph, plan).totals["latency_s"]
        runnable = deployed(model, plan)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = median_seconds(lambda: runnable(images), args.repeats)
        rows.append({"plan": label, "int8_layers": len(int8_layers), "predicted_ms": predicted * 1e3,
                     "measured_ms": measured * 1e3})
        print(rows[-1], flush=True)
    rho = stats.spearmanr([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]).statistic
    mape = sum(abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows) / len(rows) * 100
    lines = ["| plan | int8 layers | predicted ms | measured ms |", "|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['int8_layers']} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} |" for r in rows]
    lines += ["", f"Spearman rho {rho:.3f}, mean absolute percentage error {mape:.1f} % over {len(rows)} plans "
                  f"(batch 1, median of {args.repeats} runs)."]
    write_results("local_cpu_latency", rows, "\n".join(lines), {"spearman_rho": rho, "mape_percent": mape})


if __name__ == "__main__":
    main()
