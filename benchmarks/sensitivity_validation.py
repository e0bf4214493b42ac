"""Do sensitivity metrics rank layers like the damage they predict?

Ground truth: each quantizable layer quantized alone (data-free OAQ or vanilla, others full
precision) to 2 and 3 bits; accuracy drop and cross-entropy increase on the search split. For
every metric: Kendall tau and Spearman rho against both, and its compute time.

    python benchmarks/sensitivity_validation.py          # both models, with the settings below
    python benchmarks/sensitivity_validation.py --models resnet56 --methods oaq --images 1000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import SHARED, checkpoint, write_results
from scipy import stats

from oaq_search.data import ImageSplit, load_cifar10
from oaq_search.fake_quant import quantize_
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.plan import LayerPlan, Plan
from oaq_search.planning import PlanFactory
from oaq_search.sensitivity import compute_sensitivity

METRICS = ("ssim_distribution", "ssim_weight", "mse", "hessian")
# What the committed results used: ResNet-56 has 56 layers, so fewer images and OAQ only.
DEFAULTS = {"resnet20": {"methods": ["oaq", "vanilla"], "images": 3000}, "resnet56": {"methods": ["oaq"], "images": 1000}}


def accuracy_and_loss(model: torch.nn.Module, split: ImageSplit) -> tuple[float, float]:
    correct, loss = 0, 0.0
    model.eval()
    with torch.inference_mode():
        for images, labels in split.batches(500):
            logits = model(images)
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    return 100.0 * correct / len(split), loss / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULTS))
    parser.add_argument("--methods", nargs="+", help="default: per model, see DEFAULTS")
    parser.add_argument("--images", type=int, help="search-split images scored per measurement (default per model)")
    parser.add_argument("--data-root", default=str(SHARED / "data/cifar10"))
    args = parser.parse_args()
    splits = load_cifar10(args.data_root)
    for name in args.models:
        methods = args.methods or DEFAULTS.get(name, DEFAULTS["resnet20"])["methods"]
        images = args.images or DEFAULTS.get(name, DEFAULTS["resnet20"])["images"]
        validate(name, methods, splits, splits.search.subset(images))


def validate(name: str, methods: list[str], splits, scored: ImageSplit) -> None:
    """Ground truth and correlations for one model; writes sensitivity_validation_<name>."""
    rows = []
    model = load_model(name, checkpoint(name))
    graph = layer_graph(name, model)
    table = compute_sensitivity(model, graph, METRICS, bits=[2, 3], methods=methods,
                                data=splits.search, cache_dir=None)
    print(f"{name}: sensitivity computed in " + ", ".join(f"{k} {v:.2f} s" for k, v in table.seconds.items()),
          flush=True)
    fp_accuracy, fp_loss = accuracy_and_loss(model, scored)
    probe = load_model(name, checkpoint(name))
    for method in methods:
        factory = PlanFactory(name, model, graph, method)
        for bits in (2, 3):
            started = time.perf_counter()
            drops, losses = [], []
            for layer in graph.names:
                chosen = factory.weight_quantizer(layer, bits)
                plan = Plan(name, [LayerPlan(layer, bits, method=method, scale_factor=chosen.scale_factor,
                                             threshold=chosen.threshold)])
                accuracy, loss = accuracy_and_loss(quantize_(probe, plan), scored)
                drops.append(fp_accuracy - accuracy)
                losses.append(loss - fp_loss)
            truth_s = time.perf_counter() - started
            print(f"  {method} {bits} bits: ground truth in {truth_s:.0f} s, largest drop {max(drops):.2f} points",
                  flush=True)
            for metric in METRICS:
                scores = [table.score(metric, method, layer, bits) for layer in graph.names]
                rows.append({
                    "model": name, "method": method, "bits": bits, "metric": metric,
                    "kendall_tau_drop": stats.kendalltau(scores, drops).statistic,
                    "spearman_rho_drop": stats.spearmanr(scores, drops).statistic,
                    "kendall_tau_loss": stats.kendalltau(scores, losses).statistic,
                    "spearman_rho_loss": stats.spearmanr(scores, losses).statistic,
                    "metric_seconds": table.seconds[metric] + (table.seconds["quantize"] if metric != "hessian" else 0),
                    "ground_truth_seconds": truth_s, "images": len(scored),
                })
    write_results(f"sensitivity_validation_{name}", rows, markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | bits | metric | tau vs drop | rho vs drop | tau vs loss | rho vs loss | metric time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['metric']} | {r['kendall_tau_drop']:.3f} | "
                     f"{r['spearman_rho_drop']:.3f} | {r['kendall_tau_loss']:.3f} | {r['spearman_rho_loss']:.3f} | "
                     f"{r['metric_seconds']:.2f} |")
    means = {}
    for r in rows:
        means.setdefault(r["metric"], []).append(r["kendall_tau_loss"])
    lines += ["", "Mean Kendall tau against the loss increase, over models, methods and bits:", ""]
    lines += [f"- {metric}: {sum(v) / len(v):.3f}" for metric, v in sorted(means.items(), key=lambda kv: -sum(kv[1]))]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
