"""Plans scored per second by the vectorized memory + BOPs path (goal: 10,000/s for ResNet-56).

    python benchmarks/cost_model_speed.py [--plans 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import write_results

from hwmodels import MemoryModel
from oaq_search.pipeline import layer_graph, load_model

GOAL = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=20_000)
    args = parser.parse_args()
    rows = []
    for name in ("resnet20", "resnet56"):
        graph = layer_graph(name, load_model(name))
        rng = np.random.default_rng(0)
        weight_bits = rng.integers(2, 9, size=(args.plans, len(graph.names)))
        activation_bits = rng.integers(2, 9, size=(args.plans, len(graph.names)))
        model = MemoryModel()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            model.evaluate_many(graph, weight_bits, activation_bits)
            times.append(time.perf_counter() - started)
        rows.append({"model": name, "plans": args.plans, "plans_per_s": args.plans / statistics.median(times)})
        print(rows[-1], flush=True)
    lines = ["| model | plans per call | plans per second (median of 5) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['plans']} | {r['plans_per_s']:,.0f} |" for r in rows]
    lines += ["", f"Goal: {GOAL:,} plans per second for ResNet-56 (weight bytes and BOPs)."]
    write_results("cost_model_speed", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
