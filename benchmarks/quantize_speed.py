"""How long one search trial spends quantizing weights: re-applying a plan to a wrapped model.

The model is wrapped once; each trial's `quantize_(model, plan)` re-quantizes every layer's weights
once (OAQ reshaping, grid rounding, cache). Median of repeats, per model and grid.

    python benchmarks/quantize_speed.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import checkpoint, write_results

from oaq_search.fake_quant import quantize_
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.planning import PlanFactory

GOAL_MS = 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for name in ("resnet20", "resnet56"):
        model = load_model(name, checkpoint(name))
        graph = layer_graph(name, model)
        for grid in ("uniform", "pot"):
            factory = PlanFactory(name, model, graph, "oaq", grid)
            plans = [factory.uniform(bits) for bits in (2, 3, 4)]  # (s, T) chosen up front, as the search caches them
            quantize_(model, plans[0])
            times = []
            for index in range(args.repeats):
                started = time.perf_counter()
                quantize_(model, plans[index % len(plans)])
                times.append(time.perf_counter() - started)
            rows.append({"model": name, "grid": grid, "median_ms": 1e3 * statistics.median(times),
                         "max_ms": 1e3 * max(times), "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
    lines = ["| model | grid | median ms per plan | max ms | torch threads |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['grid']} | {r['median_ms']:.2f} | {r['max_ms']:.2f} | {r['threads']} |" for r in rows]
    lines += ["", f"Goal: under {GOAL_MS:.0f} ms for ResNet-20."]
    write_results("quantize_speed", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
