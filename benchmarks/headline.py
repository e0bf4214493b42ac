"""The headline: test accuracy against weight-memory budget, before and after the same fine-tune.

For each model and average weight bits (first and last layer at 8 bits, counted in the budget),
with every layer's input at --activation-bits: uniform vanilla and uniform OAQ (the largest
uniform bit-width that fits), the integer program on sensitivity alone, and the full search.
Each plan is scored on the test split after post-training quantization and again after the same
fine-tune (--mode, --epochs x --finetune-images). Changes are against the checkpoint's own FP
accuracy; the wall time of every stage is recorded.

Two stages, so the fine-tunes can run elsewhere (a GPU) or in parallel, and either resumes:
`plans` runs the searches and writes every candidate plan under --folder; `finetune` fine-tunes
and tests each of them (--jobs at once, one torch thread each). `all` does both.

    python benchmarks/headline.py --models resnet20 --bits 4 3 2.5 2 --trials 40 --finetune-images 10000
    python benchmarks/headline.py --stage plans --folder F --models resnet20 --bits 3 2.4 2 --trials 40
    python benchmarks/headline.py --stage finetune --folder F --mode qat --epochs 1 --jobs 2
    python benchmarks/headline.py --stage finetune --folder F --mode qat --epochs 3 --jobs 2 --bits 2.4 2 --methods search 'uniform OAQ'
    python benchmarks/headline.py --stage plans --folder G --models resnet20 --bits 2 --trials 40 --cost-model memory-base3
    python benchmarks/headline.py --stage finetune --folder G --mode qat --epochs 16 --methods search --tag 2bits

With a `--cost-model` other than memory (memory-base3: 2-bit layers' ternary codes five to a byte),
budgets stay the same bytes and the results' name says the cost model.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED, checkpoint, invocation, write_results
from search_quality import budget_bytes, run, with_budget

from oaq_search.config import FinetuneConfig
from oaq_search.data import Splits, load_cifar10
from oaq_search.files import write_text_atomically
from oaq_search.pipeline import finetune_and_test, finish_study, load_model
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory
from oaq_search.schema import to_dict

INDEX = "plans.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "plans", "finetune"), default="all")
    parser.add_argument("--folder", type=Path, help="where plans, studies and fine-tunes go (default: a new temp folder)")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--bits", type=float, nargs="+", help="average weight bits (plans: default 4 3 2.5 2; "
                        "finetune: only the plans at these)")
    parser.add_argument("--methods", nargs="+", help="finetune only these methods' plans: search, 'integer program', "
                        "'uniform vanilla', 'uniform OAQ'")
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--eval-images", type=int, default=1000, help="search-split images scored per trial")
    parser.add_argument("--cost-model", default="memory", help="plans: the cost model the budgets are in")
    parser.add_argument("--mode", choices=("scale", "qat"), default="scale", help="the fine-tune every plan gets")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--finetune-images", type=int, default=None,
                        help="fine-tuning images per epoch (default: the whole fine-tuning split)")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes at once (two cores: at most 2)")
    parser.add_argument("--tag", default="", help="finetune: appended to the results' name, so a run on other "
                        "budgets does not replace an earlier run's file")
    args = parser.parse_args()
    if args.stage == "finetune" and not (args.folder and (args.folder / INDEX).is_file()):
        parser.error(f"--stage finetune needs --folder holding the {INDEX} of a finished `--stage plans`")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="oaq-headline-"))
    print(f"headline folder: {folder}", flush=True)
    if args.stage in ("all", "plans"):
        make_plans(folder, args.models, args.bits or [4.0, 3.0, 2.5, 2.0], args.activation_bits, args.trials,
                   args.eval_images, args.cost_model)
    if args.stage in ("all", "finetune"):
        config = FinetuneConfig(mode=args.mode, epochs=args.epochs, images_per_epoch=args.finetune_images)
        finetune_plans(folder, config, args.jobs, args.bits, args.methods, args.tag)


def make_plans(folder: Path, models: list[str], bits_list: list[float], activation_bits: int, trials: int,
               eval_images: int, cost_model_name: str) -> None:
    """Search each (model, bits) and write its candidate plans and their costs to folder/plans.json."""
    index_path = folder / INDEX
    settings = {"trials": trials, "eval_images": eval_images, "activation_bits": activation_bits,
                "cost_model": cost_model_name}
    index = json.loads(index_path.read_text()) if index_path.is_file() else {**settings, "entries": []}
    index.setdefault("cost_model", "memory")  # indexes written before the option
    changed = [key for key in settings if index[key] != settings[key]]
    if changed:  # every row of the results table is labelled with the index's one set of settings
        raise SystemExit(f"{index_path} holds plans made with other {', '.join(changed)}: use the same settings "
                         f"or another --folder")
    for model in models:
        for bits in bits_list:
            config = with_budget("headline", model, bits, trials, folder, eval_images=eval_images,
                                 activation_bits=activation_bits, cost_model=cost_model_name)
            prepared, study = run(config)  # resumes a study left in folder
            candidates = {"search": finish_study(config, prepared, study).plan, "integer program": Plan.from_dict(
                next(t for t in study.trials if t.user_attrs.get("seed") == "integer_program").user_attrs["plan"])}
            factory, budget, cost_model = prepared.objective.factory, budget_bytes(model, bits), prepared.objective.cost_model
            fitting = [b for b in config.search.weight_bits
                       if cost_model.evaluate(prepared.graph, factory.uniform(b)).totals["weight_bytes"] <= budget]
            if fitting:  # vanilla has no (s, T) to choose, so its factory needs no calibration images
                vanilla = PlanFactory(model, prepared.model, prepared.graph, "vanilla",
                                      code_packing=cost_model.code_packing)
                candidates[f"uniform vanilla W{max(fitting)}"] = vanilla.uniform(max(fitting), activation_bits)
                candidates[f"uniform OAQ W{max(fitting)}"] = factory.uniform(max(fitting), activation_bits)
            index["entries"] = [e for e in index["entries"] if (e["model"], e["average_bits"]) != (model, bits)]
            for method, plan in candidates.items():
                name = f"{model}-{bits:g}-{method.replace(' ', '_')}"
                plan.save(folder / "plans" / f"{name}.json")
                index["entries"].append({
                    "name": name, "model": model, "average_bits": bits, "budget_kib": budget / 1024, "method": method,
                    "plan_kib": cost_model.evaluate(prepared.graph, plan).totals["weight_bytes"] / 1024,
                    "seconds": prepared.seconds if method in ("search", "integer program") else {},
                    "trials": len(study.trials) if method == "search" else None})
            index["plans_command"] = invocation()
            write_text_atomically(index_path, json.dumps(index, indent=2) + "\n")
            print(f"plans for {model} at {bits:g} bits: {', '.join(candidates)}", flush=True)


def finetune_plans(folder: Path, config: FinetuneConfig, jobs: int, bits: list[float] | None = None,
                   methods: list[str] | None = None, tag: str = "") -> None:
    """Fine-tune and test every distinct plan in folder/plans.json once (only those at `bits` and of
    `methods` when given); write the results table."""
    index = json.loads((folder / INDEX).read_text())
    entries = [e for e in index["entries"] if (bits is None or e["average_bits"] in bits)
               and (methods is None or e["method"].split(" W")[0] in methods)]
    if not entries:
        raise SystemExit(f"no plan in {folder / INDEX} matches --bits {bits} --methods {methods}")
    distinct: dict[str, dict] = {}  # plan key -> the first entry with that plan (at 2 bits every method is W2)
    keys = {}
    for entry in entries:
        keys[entry["name"]] = Plan.load(folder / "plans" / f"{entry['name']}.json").key()
        distinct.setdefault(keys[entry["name"]], entry)
    tasks = [(folder, entry, config) for entry in distinct.values()]
    if jobs == 1:
        measured = [finetune_entry(*task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            measured = pool.starmap(finetune_entry, tasks, chunksize=1)
    by_key = dict(zip(distinct, measured))
    rows = []
    for entry in entries:
        result = by_key[keys[entry["name"]]]
        row = {key: entry[key] for key in ("model", "average_bits", "budget_kib", "method", "plan_kib", "trials")}
        row.update({key: value for key, value in result.items() if key != "seconds"})
        row["activation_bits"] = index["activation_bits"]
        row["seconds"] = {**entry["seconds"], **result["seconds"]}
        row["finetuned_as"] = distinct[keys[entry["name"]]]["name"]
        rows.append(row)
    models = list(dict.fromkeys(row["model"] for row in rows))
    cost_model = index.get("cost_model", "memory")
    suffix = ("" if cost_model == "memory" else f"_{cost_model}") + \
        ("" if config.mode == "scale" else f"_{config.mode}_e{config.epochs}") + (f"_{tag}" if tag else "")
    command = invocation()
    if "plans_command" in index and index["plans_command"] != command:  # the table depends on both stages
        command = f"{index['plans_command']} && {command}"
    write_results(f"headline_{'_'.join(models)}{suffix}", rows, markdown(rows, cost_model),
                  {"finetune": {"mode": config.mode, "epochs": config.epochs, "images_per_epoch": config.images_per_epoch},
                   "trials": index["trials"], "eval_images": index["eval_images"],
                   "cost_model": cost_model}, command)


def finetune_entry(folder: Path, entry: dict, config: FinetuneConfig) -> dict:
    """One plan fine-tuned (resuming a fine-tune left in its folder) and tested: what was measured."""
    model = load_model(entry["model"], checkpoint(entry["model"]))
    splits = _splits()
    run_name = f"finetune-{config.mode}-{config.epochs}x{config.images_per_epoch or 'all'}"
    started = time.perf_counter()
    tuned = finetune_and_test(model, Plan.load(folder / "plans" / f"{entry['name']}.json"), splits, config,
                              folder / run_name / entry["name"], progress=False)
    scores = tuned.scores
    measured = {
        "fp_test": scores["fp_test_accuracy"], "ptq_test": scores["ptq_test_accuracy"],
        "finetuned_test": scores["test_accuracy"],
        "ptq_change": scores["ptq_test_accuracy"] - scores["fp_test_accuracy"],
        "finetuned_change": scores["test_accuracy"] - scores["fp_test_accuracy"],
        "history": tuned.history, "finetune_config": to_dict(config),
        "seconds": {"finetune": round(tuned.seconds, 1), "finetune_and_test": round(time.perf_counter() - started, 1)},
    }
    print(entry["name"], {k: v for k, v in measured.items() if k.endswith(("test", "change"))}, flush=True)
    return measured


@functools.cache
def _splits() -> Splits:
    """CIFAR-10, read once per process rather than once per plan."""
    return load_cifar10(SHARED / "data/cifar10")


def markdown(rows: list[dict], cost_model: str = "memory") -> str:
    lines = [("| model | avg bits (budget KiB) | method | plan KiB | post-training change | fine-tuned change | "
              "fine-tune s |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['average_bits']:g} ({r['budget_kib']:.1f}) | {r['method']} | "
                     f"{r['plan_kib']:.1f} | {r['ptq_change']:+.2f} ({r['ptq_test']:.2f}) | "
                     f"{r['finetuned_change']:+.2f} ({r['finetuned_test']:.2f}) | {r['seconds']['finetune']:.0f} |")
    lines.append("")
    lines.append(f"Changes are test-split points against full precision ({rows[0]['fp_test']:.2f} % for "
                 f"{rows[0]['model']}); activations at {rows[0]['activation_bits']} bits (first and last layer inputs "
                 f"at 8). Identical plans are fine-tuned once (under cost model memory every method's 2-bit plan is "
                 f"uniform W2).")
    if cost_model != "memory":
        lines.append(f"Plan sizes by cost model {cost_model}" + (": 2-bit layers' ternary codes packed five to a byte."
                                                                  if cost_model == "memory-base3" else "."))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
