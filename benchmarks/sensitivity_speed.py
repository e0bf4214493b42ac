"""Time of the full sensitivity table (bits 2..8, vanilla and OAQ) for ResNet-56, and of the Hessian.

Goal (issue 4): the SSIM table in under 5 s on 2 CPU cores. No cache; the Hessian needs data.

    python benchmarks/sensitivity_speed.py
"""

from __future__ import annotations

import time

from _common import SHARED, checkpoint, write_results

from oaq_search.data import load_cifar10
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.sensitivity import compute_sensitivity


def main() -> None:
    rows = []
    search = load_cifar10(SHARED / "data/cifar10").search
    for name in ("resnet20", "resnet56"):
        model = load_model(name, checkpoint(name))
        graph = layer_graph(name, model)
        for metrics in (["ssim_weight", "ssim_distribution"], ["ssim_weight", "ssim_distribution", "mse"], ["hessian"]):
            started = time.perf_counter()
            table = compute_sensitivity(model, graph, metrics, bits=range(2, 9), methods=("vanilla", "oaq"),
                                        data=search, cache_dir=None)
            rows.append({"model": name, "metrics": "+".join(metrics), "seconds": time.perf_counter() - started,
                         "parts": table.seconds})
            print(rows[-1], flush=True)
    lines = ["| model | metrics (bits 2..8, vanilla and OAQ) | seconds |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['metrics']} | {r['seconds']:.2f} |" for r in rows]
    lines += ["", "Goal: the SSIM table for ResNet-56 in under 5 s on 2 cores; the Hessian trace beside it."]
    write_results("sensitivity_speed", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
