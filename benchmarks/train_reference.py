"""Train a registered CIFAR model from scratch on ../shared's JPEG-rebuilt CIFAR-10: a reference checkpoint.

The recipe of the shipped ResNet checkpoints, from scratch: the first 45,000 train images (the
fine-tuning split; the last 5,000, the search split, only monitor), pad-4 crops and flips, SGD
with Nesterov momentum, a linear warm-up then cosine decay, the last epoch kept (no selection).
On CUDA the steps run in bfloat16 autocast with channels_last. State is saved after every epoch
and a re-run resumes; `--max-minutes` pauses after the epoch that passes it (re-run to go on).

    python benchmarks/train_reference.py --model densenet100 --epochs 100 --device cuda
    python benchmarks/train_reference.py --model resnet20 --name resnet20_scratch --epochs 40 --weight-decay 5e-4
    python benchmarks/train_reference.py --factory model:build --factory-folder examples/own_model \
        --name tiny_mobilenet --epochs 8 --weight-decay 4e-5
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import CHECKPOINTS, SHARED, write_results

from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.files import save_atomically
from oaq_search.devices import training_device
from oaq_search.config import ModelConfig
from oaq_search.pipeline import load_study_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet100")
    parser.add_argument("--factory", help="a user's model instead: package.module:function, as a study file's [model]")
    parser.add_argument("--factory-folder", default=".", help="where --factory's module is found first")
    parser.add_argument("--name", default=None, help="the checkpoint is <name>_cifar10jpeg.pt (default: the model's)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.1, help="peak, after the warm-up")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="pause after the epoch that passes this")
    parser.add_argument("--data-root", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--state", default=None, help="resume file (default runs/reference/<model>.pt)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = training_device(args.device)
    torch.manual_seed(args.seed)
    splits = load_cifar10(args.data_root)
    train = splits.finetune.to(device)
    model = load_study_model(ModelConfig(name=None if args.factory else args.model, factory=args.factory),
                             Path(args.factory_folder)).train().to(device, memory_format=torch.channels_last)
    steps_per_epoch = len(train) // args.batch_size  # the last partial batch is dropped
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / max(warmup, 1), 1.0) * 0.5 * (
        1 + math.cos(math.pi * min(max(step - warmup, 0) / max(total - warmup, 1), 1.0))))
    state_path = Path(args.state or f"runs/reference/{args.name or args.factory or args.model}.pt")
    history = resume(state_path, training_recipe(args), model, optimizer, schedule)
    for epoch in range(len(history), args.epochs):
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            print(f"paused after epoch {epoch} ({args.max_minutes} min): re-run the same command to go on")
            return
        epoch_started = time.perf_counter()
        model.train()
        total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        batches = train.batches(args.batch_size, shuffle=True, augment=True, seed=args.seed * 100_003 + epoch)
        for _, (images, labels) in zip(range(steps_per_epoch), batches):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        history.append({"epoch": epoch + 1, "loss": float(total_loss) / seen, "train_accuracy": 100 * float(correct) / seen,
                        "search_accuracy": accuracy(model, splits.search, progress=False),
                        "seconds": time.perf_counter() - epoch_started})
        print({k: round(v, 3) for k, v in history[-1].items()}, flush=True)
        save_state(state_path, training_recipe(args), model, optimizer, schedule, history)
    finish(args, model, splits, history)


def finish(args: argparse.Namespace, model: torch.nn.Module, splits, history: list[dict]) -> None:
    """The plain state_dict under benchmarks/checkpoints/, and the recipe with its results."""
    model = model.float().to("cpu", memory_format=torch.contiguous_format).eval()
    CHECKPOINTS.mkdir(exist_ok=True)
    name = args.name or args.factory or args.model
    path = CHECKPOINTS / f"{name}_cifar10jpeg.pt"
    torch.save(model.state_dict(), path)
    test = accuracy(model, splits.test, progress=False)
    extra = {"checkpoint": str(path.relative_to(CHECKPOINTS.parent.parent)), "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "test_accuracy": test,
             "epochs_seconds": round(sum(h["seconds"] for h in history), 1), "recipe": training_recipe(args)}
    last = history[-1]
    markdown = (f"| model | epochs | test accuracy (FP32) | search split (held out) | training time |\n"
                f"|---|---|---|---|---|\n| {args.factory or args.model} | {len(history)} | {test:.2f} % | "
                f"{last['search_accuracy']:.2f} % | {extra['epochs_seconds'] / 60:.1f} min |\n\n"
                f"Checkpoint `{extra['checkpoint']}` ({extra['bytes']} bytes, sha256 {extra['sha256']}). Recipe: "
                + ", ".join(f"{key} {value}" for key, value in extra["recipe"].items()) + ".")
    write_results(f"reference_{name}", history, markdown, extra)
    print(markdown)


def training_recipe(args: argparse.Namespace) -> dict:
    """What makes two runs the same training: a saved state resumes only under the same recipe."""
    return {key: getattr(args, key) for key in ("factory" if args.factory else "model", "epochs", "batch_size", "learning_rate", "warmup_epochs",
                                                "weight_decay", "seed")}


def save_state(path: Path, recipe: dict, model, optimizer, schedule, history) -> None:
    save_atomically({"recipe": recipe, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "history": history}, path)


def resume(path: Path, recipe: dict, model, optimizer, schedule) -> list[dict]:
    if not path.is_file():
        return []
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if state.get("recipe") != recipe:
        raise SystemExit(f"error: {path} holds a run with another recipe ({state.get('recipe')}): delete it to start "
                         f"over, or pass --state with another file")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    print(f"resuming after epoch {len(state['history'])} from {path}")
    return state["history"]


if __name__ == "__main__":
    main()
