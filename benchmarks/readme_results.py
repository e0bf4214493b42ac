"""Regenerate docs/results.md (every results table) and the README's headline table from
benchmarks/results/*.json. Running it twice writes the same bytes.

    python benchmarks/readme_results.py
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from search_quality import median_trials_to_match

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results -->", "<!-- /results -->"
RESULTS_PAGE = ROOT / "docs" / "results.md"
README_HEADLINE = "headline_resnet20_memory-base3"  # the one table the README shows
README_SPEED = ("search_cost_reuse", "search_cost_growth")  # the search cost per model the README shows
INTRO = """# Results

Every number below comes from a committed script in `benchmarks/`. Each writes JSON and markdown
to `benchmarks/results/` with its command, date and machine: 2-core x86 machines (AMD EPYC or
Intel Xeon; each results file names its own), torch 2.13.0+cpu, often one torch thread per process
with other benchmarks running at once, so the wall times are pessimistic; the few runs made on a
lent GPU say so where they are quoted. Accuracy is on the JPEG-rebuilt CIFAR-10 in `../shared`, so
read it as the change against the same checkpoint's full-precision accuracy (ResNet-20 88.20 %,
ResNet-56 90.13 %), never against published absolute numbers. This page is written by
`python benchmarks/readme_results.py`.
"""


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def source(data: dict) -> str:
    """The command, date, CPU and code a results file was measured with (sessions ran on different machines)."""
    machine = data.get("machine", {}).get("cpu")
    return (f"`{data['command']}`, {data['date']}" + (f", {machine}" if machine else "")
            + (f", code {data['code']}" if data.get("code") else ""))


def option(command: str, flag: str, default: int) -> int:
    """An integer option's value in a recorded command line, for results written before rows carried it."""
    words = command.split()
    return int(words[words.index(flag) + 1]) if flag in words else default


def ptq_section() -> list[str]:
    lines = ["### Post-training quantization (the paper's Table 2 protocol, 8-bit activations, test split)", "",
             "| model | method | W8 | W4 | W3 | W4, data-free | W3, data-free | paper W4 / W3 (change vs its FP) |",
             "|---|---|---|---|---|---|---|---|"]
    sources = []
    for model in ("resnet20", "resnet56"):
        data = load(f"ptq_table2_{model}")
        if not data:
            continue
        sources.append(source(data))
        rows = [r for r in data["rows"] if r["grid"] == "uniform"]
        for method in ("vanilla", "oaq"):
            cell = {(r["weight_bits"], r["bn_correction"]): r["change"] for r in rows if r["method"] == method}
            paper = {r["weight_bits"]: r["paper_change"] for r in rows if r["method"] == method}
            paper_text = " / ".join("n/a" if paper.get(b) is None else f"{paper[b]:+.1f}" for b in (4, 3))
            lines.append(f"| {model} | {method} | {cell[(8, True)]:+.2f} | {cell[(4, True)]:+.2f} | "
                         f"{cell[(3, True)]:+.2f} | {cell[(4, False)]:+.2f} | {cell[(3, False)]:+.2f} | {paper_text} |")
    lines += ["", "Change in points against the checkpoint's own full-precision accuracy. Columns without "
              "\"data-free\" use 500 search-split images: (s, T) chosen by each layer's output error, and BatchNorm "
              "correction. Data-free columns choose (s, T) by weight MSE. First and last layers at "
              "8 bits. PoT/IPoT rows and absolute numbers: `benchmarks/results/ptq_table2_*.md`. Sources: "
              + "; ".join(sources) + "."]
    return lines


def sensitivity_section() -> list[str]:
    lines = ["### Sensitivity metrics against measured single-layer damage (Kendall tau vs loss increase)", "",
             "| model | methods, bits | hessian | ssim_weight | mse | ssim_distribution | hessian time | SSIM time |",
             "|---|---|---|---|---|---|---|---|"]
    sources = []
    for model in ("resnet20", "resnet56"):
        data = load(f"sensitivity_validation_{model}")
        if not data:
            continue
        sources.append(source(data))
        mean = {}
        for row in data["rows"]:
            mean.setdefault(row["metric"], []).append(row["kendall_tau_loss"])
        seconds = {row["metric"]: row["metric_seconds"] for row in data["rows"]}
        methods = sorted({row["method"] for row in data["rows"]})
        lines.append(f"| {model} | {'+'.join(methods)}, 2 and 3 | " + " | ".join(
            f"{sum(mean[m]) / len(mean[m]):.3f}" for m in ("hessian", "ssim_weight", "mse", "ssim_distribution"))
            + f" | {seconds['hessian']:.0f} s | {seconds['ssim_weight']:.2f} s |")
    lines += ["", "The Hessian trace ranks layers best, so it is the search's default sensitivity metric; the SSIM "
              "variants are 100x cheaper but rank worse. Sources: " + "; ".join(sources) + "."]
    return lines


PAIRED_ON = {"scored": "the search-split images trials are scored on", "search": "the whole search split",
             "test": "the test split"}


def weights(row: dict) -> str:
    """A search row's model, with its checkpoint named where it is not the model's shared one."""
    own = f"{row['model']}_cifar10jpeg.pt"
    return row["model"] if row.get("checkpoint", own) == own else f"{row['model']} (`{row['checkpoint']}`)"


def margin(row: dict) -> str:
    return f", seed margin {row['seed_margin']:g}" if row.get("seed_margin") else ""


def mean_difference_from_seed(rows: list[dict], margined: list[dict]) -> float:
    """Test accuracy minus the seed's, on average, of the runs without a seed margin that match `margined`'s."""
    keys = ("checkpoint", "average_bits", "grids", "score", "cost_model", "eval_images")
    plain = [r for m in margined for r in rows
             if not r.get("seed_margin") and all(r.get(k) == m.get(k) for k in keys)]
    return sum(r["search_test"] - r["integer_program_test"] for r in plain) / max(len(plain), 1)


def table_integer_program_cell(row: dict) -> str:
    """The integer program over the sensitivity table alone (runs from 2026-12-05 on; blank before)."""
    if "table_integer_program_test" not in row:
        return ""
    return f"{row['table_integer_program_test']:.2f} % ({row['sensitivity_metric']})"


def search_section() -> list[str]:
    stems = [path.stem for path in sorted(RESULTS.glob("search_quality_*.json"))]
    found = [load(stem) for stem in stems]
    if not found:
        return []
    lines = ["### Mixed-precision search (test split, BatchNorm correction everywhere)", "",
             "| model | average bits | trials | scored by | images per trial | cost model | weight grids | seed margin | "
             "budget | uniform OAQ | integer program on the sensitivity table | integer-program seed | best of the search "
             "| FP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(({"score": "accuracy", "cost_model": "memory", "grids": ["uniform"],  # older rows: defaults
                    "eval_images": option(data["command"], "--eval-images", 1000), **r}
                   for data in found for r in data["rows"]),
                  key=lambda r: (r["model"], weights(r), -r["average_bits"], r["cost_model"], r["grids"], r["score"],
                                 r["eval_images"], r.get("seed_margin", -1)))
    for r in rows:
        lines.append(f"| {weights(r)} | {r['average_bits']} | {r['trials']} | {r['score']} | {r['eval_images']} | "
                     f"{r['cost_model']} | {' + '.join(r['grids'])} | {r.get('seed_margin', '-')} | "
                     f"{r['budget_kib']:.1f} KiB | "
                     f"{r['uniform_test']:.2f} % "
                     f"(W{r['uniform_bits']}, {r['uniform_kib']:.1f} KiB) | {table_integer_program_cell(r)} | "
                     f"{r['integer_program_test']:.2f} % | "
                     f"{r['search_test']:.2f} % ({r['search_kib']:.1f} KiB) | {r['fp_test']:.2f} % |")
    gains = "; ".join(f"{weights(r)} at {r['average_bits']} bits ({r['score']} on {r['eval_images']} images, "
                      f"{r['cost_model']}, {'+'.join(r['grids'])}{margin(r)}): "
                      f"{r['search_test'] - r['uniform_test']:+.2f} against "
                      f"uniform (W{r['uniform_bits']}), "
                      + (f"{r['search_test'] - r['table_integer_program_test']:+.2f} against the integer program on the "
                         f"{r['sensitivity_metric']} table, " if "table_integer_program_test" in r else "")
                      + f"{r['search_test'] - r['integer_program_test']:+.2f} against the seed" for r in rows)
    plain = [r for r in rows if not r.get("seed_margin")]  # the best re-scored finalist won
    margined = [r for r in rows if r.get("seed_margin")]
    below = sum(r["search_test"] < r["integer_program_test"] for r in plain)
    unseen = [r for r in plain if r.get("checkpoint") == "resnet20_scratch_cifar10jpeg.pt"]
    kept = (f" With a seed margin, {sum(r['search_seed'] == 'integer_program' for r in margined)} of "
            f"{len(margined)} runs keep their seed, and the search ends "
            f"{sum(r['search_test'] - r['integer_program_test'] for r in margined) / len(margined):+.2f} points from "
            f"it on test on average (the same runs' best re-scored finalists: "
            f"{mean_difference_from_seed(rows, margined):+.2f})." if margined else "")
    replaced = [r for r in margined if r["search_seed"] != "integer_program" and "search_minus_seed" in r]
    overruled = (" Where a finalist cleared the margin and replaced the seed, its difference from the seed on the whole "
                 "search split and on test: " + "; ".join(
                     f"{weights(r)} at {r['average_bits']} bits ({'+'.join(r['grids'])}): " + ", ".join(
                         f"{r['search_minus_seed'][split]['difference']:+.2f} ± "
                         f"{r['search_minus_seed'][split]['standard_error']:.2f}" for split in ("search", "test"))
                     for r in replaced)
                 + ". A clear win on the search split can still lose on test where the checkpoint's base weights were "
                 "trained on that split, as the shared ResNets' were." if replaced else "")
    paired = "; ".join(f"{weights(r)} at {r['average_bits']} bits ({'+'.join(r['grids'])}): " + ", ".join(
        f"{d['difference']:+.2f} ± {d['standard_error']:.2f} on {PAIRED_ON[split]} ({d['disagreements']} of "
        f"{d['images']} images scored differently)" for split, d in r["search_minus_seed"].items())
        for r in plain if "search_minus_seed" in r)
    noise = max((abs(r["search_minus_seed"]["test"]["difference"]) / r["search_minus_seed"]["test"]["standard_error"]
                 for r in plain if "search_minus_seed" in r), default=0.0)
    lines += ["", "Integer program on the sensitivity table: the exact allocation over the per-layer table alone "
              "(one grid, no plan scored on images), the plan a user gets without searching. The integer-program seed is the "
              "same program over each tie group's measured output KL (512 search-split images, every grid), the "
              "search's first step; blank: runs from before that column. "
              "Cost model memory-base3 packs 2-bit layers' ternary codes five to a byte (1.6 bits a weight), "
              "memory two bits a weight; budgets are the same bytes. Seed margin: the best re-scored finalist "
              "replaces the integer-program seed only when better by that many standard errors of their paired "
              "per-image difference on the whole search split (-: runs from before that rule, the best finalist won). "
              "With two weight grids, each tie group takes, at "
              "each bit-width, the one whose measured output KL is lower (midrise: all 2^b codes, four levels at 2 bits).",
              "", f"The search's best plan, in points on the test split: {gains}. In {below} of {len(plain)} runs "
              "without a seed margin the plan the search split ranks first scores below the integer-program seed on the test split, "
              "although the seed is among its trials. The shared ResNets' search split holds images their base "
              "checkpoint was trained on (ResNet-20 full precision scores 92.54 % there, per "
              "`../shared/models/PROVENANCE.md`), but that is not the cause: on `resnet20_scratch_cifar10jpeg.pt`, "
              "a ResNet-20 trained here that never saw the search split (`benchmarks/checkpoints/PROVENANCE.md`), "
              f"{sum(r['search_test'] < r['integer_program_test'] for r in unseen)} of {len(unseen)} runs fall below "
              "their seed too. The cause is resolution: the plans the search prefers differ from the seed "
              "on a few percent of images, and the search split cannot tell them apart. The search's plan minus the "
              "seed, image by image, with one standard error of the paired difference: " + paired + ". The gain on "
              "the scored images is mostly the luck of being the best of 100 noisy scores; it shrinks on the whole "
              f"split, and on test every difference is within {noise:.1f} standard errors of zero (also "
              "`benchmarks/results/score_proxies_resnet20_3bits.md`)." + kept + overruled + " Sources: "
              + "; ".join(f"{source(data)} (`{stem}`)" for stem, data in zip(stems, found)) + "."]
    efficiency = load("search_efficiency_resnet20")
    if efficiency:
        rows = efficiency["rows"]
        matched = {label: [r["trials_to_match"].get(label) for r in rows] for label in ("seeded", "seeded_tpe", "random")}
        median = median_trials_to_match(rows)
        scoring = f"{rows[0]['eval_images']} search-split images per trial, screened on {rows[0]['screen_images']} first"
        lines += ["", f"Trials needed to match the best search-split accuracy of unseeded TPE in 100 trials ({scoring}), "
                      f"per sampler seed: seeded search with local search {matched['seeded']}, seeded TPE alone "
                      f"{matched['seeded_tpe']}, random search {matched['random']} (None = not matched in 100; "
                      f"medians {median['seeded']:g}, {median['seeded_tpe']:g} and {median['random']:g}, "
                      f"{len(rows[0]['curves']['tpe']) + 1} meaning not matched). The target is the best of 100 noisy scores, so the counts also measure luck. "
                      f"Source: {source(efficiency)}."]
    return lines


def latency_section() -> list[str]:
    found = {path.stem: load(path.stem) for path in sorted(RESULTS.glob("latency_search_*.json"))}
    if not found:
        return []
    lines = ["### Hardware-aware search under a latency budget: weight and input bits together", "",
             "| model | target | latency budget | plan | test accuracy | change vs FP | integer-program seed | latency | "
             "weights |", "|---|---|---|---|---|---|---|---|---|"]
    for stem, data in sorted(found.items(), key=lambda item: float(item[0].rsplit("_", 1)[1].removesuffix("us"))):
        _, _, model, target, budget = stem.split("_")  # latency_search_<model>_<target>_<budget>us
        for r in data["rows"]:
            seed = f"{r['integer_program_test']:.2f} %" if "integer_program_test" in r else ""
            lines.append(f"| {model} | {target} | {budget.removesuffix('us')} us | {r['plan']} | {r['test']:.2f} % | "
                         f"{r['test'] - r['fp_test']:+.2f} | {seed} | {r['latency_us']:.1f} us | {r['weight_kib']:.1f} KiB |")
    lines += ["", "Post-training, test split; first and last layers at 8 bits, counted; every uniform plan that fits "
                  "the budget is listed. Weights searched: inputs at 4 bits. Sources: "
                  + "; ".join(source(data) for data in found.values()) + "."]
    return lines


def finetune_section() -> list[str]:
    parts = [load(name) for name in ("finetune_scale_resnet20", "finetune_scale_resnet20_w4a4", "finetune_qat_resnet20_w2",
                                     "finetune_qat_resnet20_w43", "finetune_qat_resnet20_w4a4",
                                     "finetune_scale_resnet20_w4a4_train_all",
                                     "finetune_scale_resnet20_w4a8_w4a4_per_channel")]
    parts = [part for part in parts if part]
    if not parts:
        return []
    lines = ["### Fine-tuning, ResNet-20 (the paper's Tables 3 and 4, test split)", "",
             "| setting | method | fine-tune | post-training | fine-tuned | paper (before -> after) | time |",
             "|---|---|---|---|---|---|---|"]
    for data in parts:
        for r in data["rows"]:
            paper = "n/a" if r["paper_finetuned_change"] is None else \
                ("" if r["paper_ptq_change"] is None else f"{r['paper_ptq_change']:+.2f} -> ") + \
                f"{r['paper_finetuned_change']:+.2f}"
            trained_on = "" if r.get("train_split", "finetune") == "finetune" else ", fine-tune + search splits"
            setting = r["setting"] + (" per channel" if r.get("per_channel") else "")
            lines.append(f"| {setting} | {r['method']} | {r['mode']}, {r['epochs']} epoch(s){trained_on} | "
                         f"{r['ptq_change']:+.2f} | {r['finetuned_change']:+.2f} | {paper} | "
                         f"{r['finetune_s'] / 60:.0f} min |")
    lines += ["", f"Change in points against full precision ({parts[0]['rows'][0]['fp_accuracy']:.2f} %). Scale "
              "fine-tuning learns s, activation ranges and BatchNorm's affine, with distillation; QAT trains "
              "the weights too. Times are on the machine below, with other jobs sharing its two cores. The "
              "second W4A4 scale row (2026-12-03) starts from ranges and BatchNorm correction fitted in one "
              "pass; the rows before it fitted the ranges in a pass of their own. Sources: "
              + "; ".join(source(data) for data in parts) + "."]
    sweep = load("finetune_scale_sweep_resnet20_w4a4")
    if sweep:
        changes = sorted(r["finetuned_change"] for r in sweep["rows"])
        machines = sorted({r["machine"]["gpu"] or r["machine"]["cpu"] for r in sweep["rows"]})
        lines += ["", f"W4A4 scale fine-tuning over {len(changes)} settings (learning rates, batch size, distillation, "
                  f"learned ranges, training split, a second seed; 3 epochs each): from {changes[0]:+.2f} to "
                  f"{changes[-1]:+.2f}, median {statistics.median(changes):+.2f}; none reaches -0.30. Run on "
                  f"{', '.join(machines)}, {sweep['date']}; table: `benchmarks/results/finetune_scale_sweep_resnet20_w4a4.md`. "
                  "Reproduce: `python benchmarks/finetune_sweep.py --jobs 12 --device cuda`."]
    return lines


def reference_section() -> list[str]:
    found = sorted(RESULTS.glob("reference_*.json"))
    if not found:
        return []
    lines = ["### Reference checkpoints trained here", "",
             "| model | checkpoint | epochs | test accuracy (FP32) | training time | machine |", "|---|---|---|---|---|---|"]
    sources = []
    for path in found:
        data = json.loads(path.read_text())
        machine = data["machine"]["gpu"] or data["machine"]["cpu"]
        model = data["recipe"].get("model") or f"{data['recipe']['factory']} (examples/own_model)"
        lines.append(f"| {model} | `{data['checkpoint']}` | {data['recipe']['epochs']} | "
                     f"{data['test_accuracy']:.2f} % | {data['epochs_seconds'] / 60:.1f} min | {machine} |")
        sources.append(source(data))
    lines += ["", "Trained from scratch on the fine-tuning split (the first 45,000 training images), the last epoch "
              "kept; recipe and provenance: `benchmarks/checkpoints/PROVENANCE.md`. Sources: " + "; ".join(sources) + "."]
    return lines


BASE3 = (" with 2-bit layers' ternary codes five to a byte (1.6 bits a weight), which leaves more of the budget "
         "for wider layers; packing changes bytes, not accuracy.")


def headline_section() -> list[str]:
    """The scale fine-tune run as its own table, then every QAT run as one curve over epochs."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("headline_*.json"))]
    if not runs:
        return []
    lines = ["### Headline: accuracy against weight memory, before -> after the same fine-tune", "",
             "`benchmarks/headline.py --stage plans --folder F` runs the searches and keeps every candidate plan; "
             "`--stage finetune --folder F` then fine-tunes each distinct plan once (`--jobs 2`, or on a GPU) and "
             "resumes where it stopped. At 3 bits and below a plan's accuracy moves by a few tenths of a point "
             "with torch's thread count (sums taken in another order round some activations to a neighbouring "
             "code), so compare rows of one run; `--jobs 2` gives each fine-tune one thread. Runs dated before "
             "2026-12-03 fitted activation ranges in a pass of their own, before BatchNorm correction, and a "
             "search trial's ranges then depended on the plan scored before it.", ""]
    for data in runs:
        if data["finetune"]["mode"] != "qat":
            lines += headline_table(data) + [""]
    qat = sorted((data for data in runs if data["finetune"]["mode"] == "qat"), key=lambda d: d["finetune"]["epochs"])
    if qat:
        lines += qat_curve(qat)
    return lines[:-1]


def qat_curve(runs: list[dict]) -> list[str]:
    """Fine-tuned change per plan against QAT epochs: the fine-tune budget as a cost curve, every run shown.

    A row is one plan, told apart by its post-training change (within 0.1 points: machines round differently),
    since another plans-stage run may have found another plan for the same budget and method."""
    epochs = sorted({data["finetune"]["epochs"] for data in runs})  # runs of one length fill one column
    plans: list[dict] = []
    for data in runs:
        packed = "" if data.get("cost_model", "memory") == "memory" else f" ({data['cost_model']})"
        for r in data["rows"]:
            same = (r["model"], r["average_bits"], r["method"] + packed)
            plan = next((p for p in plans if p["same"] == same and abs(p["ptq"] - r["ptq_change"]) <= 0.1), None)
            if plan is None:
                plan = {"same": same, "kib": r["budget_kib"], "ptq": r["ptq_change"], "cells": {}}
                plans.append(plan)
            plan["cells"][data["finetune"]["epochs"]] = f"{r['finetuned_change']:+.2f}"
    order = {method: i for i, method in enumerate(dict.fromkeys(p["same"][2] for p in plans))}
    plans.sort(key=lambda p: (p["same"][0], -p["same"][1], order[p["same"][2]]))  # a method's runs side by side
    lines = ["| model | avg bits (budget) | plan | post-training | " + " | ".join(f"{e} epoch(s)" for e in epochs) + " |",
             "|---|---|---|---|" + "---|" * len(epochs)]
    for p in plans:
        model, bits, method = p["same"]
        lines.append(f"| {model} | {bits:g} ({p['kib']:.0f} KiB) | {method} | {p['ptq']:+.2f} | "
                     + " | ".join(p["cells"].get(e, "") for e in epochs) + " |")
    lines += ["", "Test-split change in points against full precision after quantization-aware training with "
              "distillation over the whole fine-tuning split, by epochs; activations at "
              f"{runs[0]['rows'][0]['activation_bits']} bits. Every epoch count is reported, not the best: it is a "
              "fine-tune budget, not tuned on test. Two rows of one method at one budget are two plans-stage runs "
              "that found different plans. "
              + ("Plans marked memory-base3 were searched" + BASE3 + " "
                 if any(data.get("cost_model", "memory") != "memory" for data in runs) else "")
              + "Sources: "
              + "; ".join(f"{data['finetune']['epochs']} epoch(s) on {data['machine']['gpu'] or data['machine']['cpu']}: "
                          f"{source(data)}" for data in runs) + ".", ""]
    return lines


def headline_table(data: dict) -> list[str]:
    methods = list(dict.fromkeys(r["method"].split(" W")[0] for r in data["rows"]))
    lines = ["| model | avg bits (budget) | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    cells: dict[tuple, dict[str, str]] = {}
    for r in data["rows"]:
        cell = f"{r['ptq_change']:+.2f} -> {r['finetuned_change']:+.2f}"
        if r["method"].startswith("uniform"):
            cell += f" (W{r['method'].split(' W')[1]})"
        cells.setdefault((r["model"], r["average_bits"], r["budget_kib"]), {})[r["method"].split(" W")[0]] = cell
    for (model, bits, kib), row in cells.items():
        lines.append(f"| {model} | {bits:g} ({kib:.0f} KiB) | " + " | ".join(row.get(m, "n/a") for m in methods) + " |")
    finetune = data["finetune"]
    images = finetune["images_per_epoch"] or "all fine-tuning-split"
    lines += ["", f"Test-split change in points against full precision; activations at "
              f"{data['rows'][0]['activation_bits']} bits. Fine-tune: {finetune['mode']}, {finetune['epochs']} epoch(s) "
              f"of {images} images for every plan; search: {data['trials']} trials. Uniform "
              f"plans use the largest bit-width that fits. {search_minus_uniform(data)} "
              + (f"Run on {data['machine']['gpu']}. " if data["machine"]["gpu"] else "")
              + (f"Plans searched and sized by cost model {data['cost_model']}" + BASE3 + " "
                 if data.get("cost_model", "memory") != "memory" else "")
              + f"Source: {source(data)}."]
    return lines


def search_minus_uniform(data: dict) -> str:
    """What mixed precision buys after the fine-tune: the search's change minus uniform OAQ's, per budget."""
    changes: dict[float, dict[str, float]] = {}
    for r in data["rows"]:
        changes.setdefault(r["average_bits"], {})[r["method"].split(" W")[0]] = r["finetuned_change"]
    return ("After the fine-tune, search minus uniform OAQ: "
            + ", ".join(f"{bits:g} bits {c['search'] - c['uniform OAQ']:+.2f}" for bits, c in changes.items()
                        if {"search", "uniform OAQ"} <= c.keys()) + ".")


def systems_section() -> list[str]:
    lines = ["### Speed and cost models", ""]
    speed, cost, latency = load("quantize_speed"), load("cost_model_speed"), load("local_cpu_latency")
    sensitivity, training, inference = load("sensitivity_speed"), load("finetune_speed"), load("inference_speed")
    if training:
        def speeds(layout):
            return ", ".join(f"{r['mode']} {r['images_per_second']:.0f}" if r["images_per_second"] else
                             f"{r['mode']} fails ({r['error'].split(':')[0]})"
                             for r in training["rows"] if r["layout"] == layout and r["threads"] == 2)
        lines.append(f"- Fine-tuning throughput, ResNet-20 W4A4, batch 128, 2 threads, images/s: NCHW {speeds('nchw')}; "
                     f"channels_last {speeds('channels_last')} (the default); channels_last + torch.compile "
                     f"{speeds('channels_last+compile')} ({source(training)}; 1 thread and the compile failures: "
                     f"`benchmarks/results/finetune_speed.md`).")
    if sensitivity:
        r56 = {r["metrics"]: r["seconds"] for r in sensitivity["rows"] if r["model"] == "resnet56"}
        lines.append(f"- Full sensitivity table for ResNet-56 (bits 2..8, vanilla and OAQ): SSIM metrics "
                     f"{r56['ssim_weight+ssim_distribution']:.2f} s, Hessian trace {r56['hessian']:.0f} s "
                     f"({source(sensitivity)}, 2 threads).")
    if inference:
        def images_per_second(model, layout, batch_size):
            return next(r["images_per_second"] for r in inference["rows"] if r["part"] == "layout" and
                        r["model"] == model and r["layout"] == layout and r["batch_size"] == batch_size)
        trial = next(r for r in inference["rows"] if r["part"] == "trial")
        lines.append("- Quantized inference, 1 thread, images/s in channels_last at batch 100 (the default) against "
                     "NCHW at batch 500: " + ", ".join(
                         f"{model} {images_per_second(model, 'channels_last', 100):.0f} vs "
                         f"{images_per_second(model, 'NCHW', 500):.0f}" for model in ("resnet20", "resnet56"))
                     + f"; one quickstart trial {trial['apply_s'] + trial['score_s']:.2f} s, its measured "
                     f"sensitivity {trial['measured_sensitivity_s']:.0f} s ({source(inference)}; every layout and "
                     f"batch size: `benchmarks/results/inference_speed.md`).")
    if speed:
        r20 = [r for r in speed["rows"] if r["model"] == "resnet20"]
        lines.append("- Re-quantizing all ResNet-20 weights for one trial: "
                     + ", ".join(f"{r['median_ms']:.1f} ms ({r['grid']})" for r in r20) + f" ({source(speed)}).")
    if cost:
        r56 = next(r for r in cost["rows"] if r["model"] == "resnet56")
        lines.append(f"- Vectorized memory + BOPs cost model: {r56['plans_per_s']:,.0f} ResNet-56 plans/s ({source(cost)}).")
    if latency:
        lines.append(f"- local-cpu latency table vs measured end-to-end ResNet-20 latency over {len(latency['rows'])} "
                     f"plans: Spearman rho {latency['spearman_rho']:.3f}, MAPE {latency['mape_percent']:.1f} % "
                     f"({source(latency)}).")
    return lines


def own_model_section() -> list[str]:
    data = load("own_model")
    if not data:
        return []
    return ["### Your own model: the MobileNetV2-style example (examples/own_model)", "",
            "Through a study file with `[model] factory` and `[data] kind = \"imagefolder\"`. "
            f"Source: {source(data)}.", "",
            *(RESULTS / "own_model.md").read_text().split("\n\n", 1)[1].strip().splitlines()]  # past its header


def results_files_section(title: str, intro: str, pattern: str) -> list[str]:
    """Every results file matching `pattern` (one per run of its benchmark), each table as it wrote it."""
    runs = sorted(RESULTS.glob(f"{pattern}.json"))
    if not runs:
        return []
    lines = [f"## {title}", "", intro, ""]
    for path in runs:
        lines += [f"Source: {source(load(path.stem))}.", "",
                  *path.with_suffix(".md").read_text().split("\n\n", 1)[1].strip().splitlines(), ""]
    return lines


def deploy_section() -> list[str]:
    return results_files_section(
        "Deployed in ONNX Runtime", "Each plan post-training quantized, exported by `oaq-search deploy` (QDQ ONNX; "
        "`--weights` int8 containers, or packed int2/int4/int8 codes run dequantized; `quantized skips`: "
        "`--quantize-skips`), and run in ONNX Runtime's CPU provider on the whole test split; latency against the float "
        "ONNX model of the same network, the two timed in alternation (see [how-it-works.md](how-it-works.md"
        "#deploying-to-onnx-runtime)).", "deploy_onnx_*")


def ort_latency_section() -> list[str]:
    return results_files_section(
        "ONNX Runtime latency table", "`oaq-search hw measure --runtime onnxruntime`: each layer shape exported as "
        "`deploy` writes it and timed in ONNX Runtime with an 8-bit and a float input; its prediction for whole plans "
        "(which layers get integer kernels) against their deployed latency, measured in the same run.",
        "ort_latency_table_*")


def reconstruction_section() -> list[str]:
    return results_files_section(
        "Reconstruction", "Post-training quantization rounded to nearest against block reconstruction (`--reconstruct`, "
        "`[ptq]`: AdaRound's learned rounding inside OAQ's quantizer, a residual block at a time, QDrop's dropping; "
        "see [how-it-works.md](how-it-works.md#reconstruction)). `_w4a4_finetune`, `_w4a4_3000steps`, "
        "`_w4a4_3000steps_qat` and `_w4a4_qat_seed1`/`2` ran before reconstruction passed the int8 output rounding "
        "by (24150d5) and have not been re-run.", "reconstruction_*")


def reconstructed_finalists_section() -> list[str]:
    return results_files_section(
        "Reconstructing the finalists", "A search's finalists ranked rounded to nearest and reconstructed, and what "
        "each pick scores on test (`[ptq] finalists = true` picks by the reconstructed held-out score; see "
        "[how-it-works.md](how-it-works.md#reconstruction)). Ran before reconstruction passed the int8 output rounding "
        "by (24150d5).", "reconstruct_finalists_*")


def search_cost_section() -> list[str]:
    return results_files_section(
        "What a search costs", "`oaq-search run` per stage, from a cold cache and warm, each run a fresh process; "
        "`before` is the code before the change the table measured and `today` the code before issue 34's changes, "
        "each run in the same session (the machine's speed varies by up to 2x from minute to minute, so compare rows "
        "of one table).", "search_cost_*")


def speed_table() -> list[str]:
    """What a search costs per model, cold and warm, with the current code (the `now` rows of README_SPEED)."""
    from deploy_onnx import _model

    from oaq_search.graph import build_layer_graph

    runs: dict[str, dict[str, dict]] = {}
    for name in README_SPEED:
        for row in (load(name) or {}).get("rows", []):
            if row["code"] == "now":
                runs.setdefault(row["model"], {})[row["cache"]] = row
    lines = ["| model | layers | cold: wall (measured KL) | warm: wall (trials, finalists, test) |",
             "|---|---:|---:|---:|"]
    for model, run in runs.items():
        cold, warm = run["cold"], run["warm"]
        layers = len(build_layer_graph(_model(model), (3, 32, 32)).names)
        lines.append(f"| {model} | {layers} | {cold['wall_s']:.0f} s ({cold['measured sensitivity']:.0f} s) | "
                     f"{warm['wall_s']:.0f} s ({warm['search']:.0f}, {warm['finalists']:.0f}, {warm['test']:.0f} s) |")
    return lines


def readme_headline() -> list[str]:
    """The README's tables: ResNet-20 at four weight budgets, before -> after the same short fine-tune;
    what a search costs per model."""
    data = load(README_HEADLINE)
    return ["ResNet-20 on CIFAR-10 (JPEG-rebuilt copy; full precision 88.20 %), 4-bit activations, "
            "post-training -> after one epoch of scale fine-tuning, in points against full precision:", "",
            *headline_table(data), "",
            "What a search costs (`oaq-search run`, 3 average bits, 32 trials, no fine-tune, 2 cores; cold: the "
            "first run on a model, warm: its measurements cached; tiny_mobilenet: the depthwise example):", "",
            *speed_table(), "",
            "Every other table (post-training quantization, sensitivity, the search against its baselines, latency, "
            "reconstruction, fine-tuning, ResNet-56, DenseNet, your own model, deployment): "
            "[docs/results.md](docs/results.md)."]


def main() -> None:
    body = [INTRO]
    for section in (ptq_section, sensitivity_section, search_section, latency_section, reconstruction_section,
                    reconstructed_finalists_section, finetune_section, headline_section, own_model_section, deploy_section, ort_latency_section,
                    search_cost_section, reference_section, systems_section):
        body += section() + [""]
    RESULTS_PAGE.parent.mkdir(exist_ok=True)
    RESULTS_PAGE.write_text("\n".join(body).rstrip() + "\n")
    readme = ROOT / "README.md"
    new = f"{START}\n" + "\n".join(readme_headline()) + f"\n{END}"
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, readme.read_text(), flags=re.S))
    print(f"wrote {RESULTS_PAGE.relative_to(ROOT)} and the README's headline table")


if __name__ == "__main__":
    main()
