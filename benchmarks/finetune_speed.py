"""Fine-tuning throughput on this CPU: images per second of one training step, per layout and threads.

ResNet-20 at W4A4 (OAQ), batch 128, the step `oaq_search.finetune` runs (fake-quantized forward,
backward, optimizer step), for scale fine-tuning and QAT; NCHW vs channels_last, 1 and 2 threads,
and torch.compile where it compiles. Median of timed steps after warm-up. The fastest choice here
is the FinetuneConfig default (channels_last).

    python benchmarks/finetune_speed.py [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import SHARED, checkpoint, write_results

from oaq_search.config import FinetuneConfig
from oaq_search.data import load_cifar10
from oaq_search.finetuning import _optimizers
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize

BATCH = 128


def images_per_second(model, images, labels, optimizers, steps: int) -> float:
    times = []
    for step in range(steps + 3):
        started = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        if step >= 3:  # warm-up (and compilation) excluded
            times.append(time.perf_counter() - started)
    return BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    fp = load_model("resnet20", checkpoint("resnet20"))
    splits = load_cifar10(SHARED / "data/cifar10")
    plan = PlanFactory("resnet20", fp, layer_graph("resnet20", fp)).uniform(4, 4)
    images, labels = next(splits.finetune.batches(BATCH, shuffle=True, augment=True))
    rows = []
    for mode in ("scale", "qat"):
        for threads in (1, 2):
            for layout in ("nchw", "channels_last", "channels_last+compile"):
                torch.set_num_threads(threads)
                model = post_training_quantize(fp, plan, splits.search)
                model.requires_grad_(False)
                optimizers = _optimizers(model, FinetuneConfig(mode=mode, learn_batchnorm=True))
                model.train(mode == "qat")
                batch = images
                if layout != "nchw":
                    model.to(memory_format=torch.channels_last)
                    batch = images.contiguous(memory_format=torch.channels_last)
                row = {"mode": mode, "threads": threads, "layout": layout, "images_per_second": None, "error": None}
                try:
                    runnable = torch.compile(model) if layout.endswith("compile") else model
                    row["images_per_second"] = round(images_per_second(runnable, batch, labels, optimizers,
                                                                       args.steps), 1)
                except Exception as error:  # noqa: BLE001 -- torch.compile failing is a result worth recording
                    row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
                rows.append(row)
                print(row, flush=True)
    write_results("finetune_speed", rows, markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | threads | layout | images/s |", "|---|---|---|---|"]
    for r in rows:
        value = f"{r['images_per_second']:.0f}" if r["images_per_second"] else f"fails ({r['error']})"
        lines.append(f"| {r['mode']} | {r['threads']} | {r['layout']} | {value} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
