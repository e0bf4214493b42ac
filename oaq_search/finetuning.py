"""The final fine-tune of a plan: OAQ scale fine-tuning (the paper's Algorithm 1) or QAT.

`scale` freezes the weights and BatchNorm (eval mode) and trains only each layer's OAQ scaling
factor s, through the straight-through estimator, and optionally the activation ranges: cheap,
the paper's "w/ FT". `qat` trains the weights too (BatchNorm in training mode, the OAQ reshaping
kept inside the quantizer), optionally distilling from the full-precision model. Both start from
the post-training-quantized model, train on the fine-tuning split with crops and flips, save their
state after every epoch and resume from the last saved epoch. The result is an updated plan (the
learned s and activation ranges), the fine-tuned weights as an ordinary checkpoint and the packed
model: `apply` with that plan and checkpoint rebuilds exactly the fine-tuned model.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import FinetuneConfig, PtqConfig
from .data import ImageSplit, Splits
from .devices import training_device
from .errors import UserError
from .evaluate import accuracy
from .fake_quant import learned_plan, quantize_, quantized_layers, unwrap
from .files import save_atomically
from .kernel_rounding import round_like_kernels_
from .layout import channels_last_works
from .packing import pack_model
from .plan import Plan
from .progress import bar, note
from .ptq import CALIBRATION_IMAGES, post_training_quantize
from .schema import to_dict

DEFAULT_LEARNING_RATES = {"qat": 0.005, "scale": 0.001}  # weights (SGD + momentum) / BN affine (Adam); cosine
WEIGHT_DECAY = 5e-4
STATE_FILE = "finetune-state.pt"


@dataclass
class FinetuneResult:
    """The fine-tuned quantized model (eval mode), its plan, and per-epoch history and files."""

    model: nn.Module
    plan: Plan
    history: list[dict[str, float]]
    files: dict[str, Path] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # test accuracies, filled by the caller
    start_scores: dict[str, float] | None = None  # `score_start` of the post-training model, measured once, saved

    @property
    def seconds(self) -> float:
        return sum(epoch["seconds"] for epoch in self.history)


def finetune(model: nn.Module, plan: Plan, splits: Splits, config: FinetuneConfig, output_dir: str | Path,
             progress: bool | None = None, reconstruction: PtqConfig | None = None,
             quantized: nn.Module | None = None,
             score_start: Callable[[nn.Module], dict[str, float]] | None = None) -> FinetuneResult:
    """Fine-tune `model` (full precision) quantized by `plan`; files go to `output_dir`.

    Starts from post-training quantization, reconstructed when `reconstruction` says so (`quantized`, when
    given, is that start already made). Resumes from `output_dir`'s saved state when it was made with the
    same plan and settings. `score_start`, when given, scores the start before training; its score is
    saved with the state, so a resumed fine-tune needs neither the start model nor its reconstruction.
    """
    if config.mode == "none":
        raise UserError("finetune mode is 'none': choose 'scale' (learn OAQ's s) or 'qat' (train the weights too)")
    output_dir = Path(output_dir)
    state_path = output_dir / STATE_FILE
    settings = {key: value for key, value in to_dict(config).items() if key != "device"}  # resumable anywhere
    identity = {"plan": plan.key(), "model": plan.model, "finetune": settings}
    reconstructed = reconstruction is not None and reconstruction.reconstruct
    if reconstructed:
        identity["reconstruction"] = reconstruction.settings()
    fingerprint = json.dumps(identity, sort_keys=True)
    saved = _saved_state(state_path, fingerprint)
    if quantized is None:  # a saved state holds the reconstructed rounding: no need to learn it again
        quantized = post_training_quantize(model, plan, splits.search, reconstruction=None if saved else reconstruction,
                                           progress=progress)
    else:
        quantized = copy.deepcopy(quantized)
    if saved:  # `quantized` is not the start yet: its learned rounding comes with the saved state
        start_scores = saved.get("start_scores")
    else:
        start_scores = score_start(quantized) if score_start else None
    torch.manual_seed(config.seed)
    quantized.requires_grad_(False)
    optimizers = _optimizers(quantized, config)
    device = training_device(config.device)
    quantized.to(device)  # before resuming, so the optimizers' saved state lands on the same device
    train = training_images(splits, config.train_split).to(device)
    steps_per_epoch = math.ceil(min(config.images_per_epoch or len(train), len(train)) / config.batch_size)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
                  for optimizer in optimizers]
    history = _resume(saved, state_path, quantized, optimizers, schedulers)
    memory_format = torch.channels_last if config.channels_last and channels_last_works(model) else torch.contiguous_format
    quantized.to(memory_format=memory_format)
    teacher = copy.deepcopy(model).eval().to(device, memory_format=memory_format) if config.distill else None
    for epoch in range(len(history), config.epochs):
        started = time.perf_counter()
        loss, train_accuracy = _train_epoch(quantized, teacher, train, config, optimizers, schedulers,
                                            epoch, steps_per_epoch, memory_format, progress)
        seconds = time.perf_counter() - started
        _refresh(quantized)
        history.append({"epoch": epoch + 1, "loss": loss, "train_accuracy": train_accuracy,
                        "search_accuracy": accuracy(quantized, splits.search, progress=False), "seconds": seconds,
                        "images_per_second": steps_per_epoch * config.batch_size / seconds})
        note(f"finetune epoch {epoch + 1}/{config.epochs}: loss {loss:.4f}, train {train_accuracy:.2f} %, "
             f"search split {history[-1]['search_accuracy']:.2f} %, {seconds:.0f} s "
             f"({history[-1]['images_per_second']:.0f} images/s)", progress)
        _save_state(state_path, fingerprint, quantized, optimizers, schedulers, history, start_scores)
    quantized.to("cpu", memory_format=torch.contiguous_format)
    tuned = learned_plan(quantized, plan)
    tuned.metadata = {**plan.metadata, "finetune": {**to_dict(config), "history": history}}
    if reconstructed:
        tuned.metadata["reconstruction"] = to_dict(reconstruction)
    quantize_(quantized, tuned)  # s and ranges become plain plan values; the model equals `apply(tuned)`
    round_like_kernels_(quantized, next(splits.search.batches(CALIBRATION_IMAGES))[0])  # as `apply` would
    quantized.eval()
    files = {"plan": output_dir / "plan.json", "checkpoint": output_dir / "finetuned.pt",
             "packed": output_dir / "model.packed.pt"}
    save_atomically(unwrap(quantized).state_dict(), files["checkpoint"])
    tuned.metadata["finetune"]["checkpoint"] = str(files["checkpoint"])
    pack_model(quantized, tuned, files["packed"], splits.input_shape)
    tuned.save(files["plan"])
    return FinetuneResult(quantized, tuned, history, files, start_scores=start_scores)


def training_images(splits: Splits, train_split: str) -> ImageSplit:
    """The fine-tuning split, or (`all`) it and the search split, whose images the checkpoint never saw."""
    if train_split == "finetune":
        return splits.finetune
    return replace(splits.finetune, name="finetune+search", images=torch.cat([splits.finetune.images, splits.search.images]),
                   labels=torch.cat([splits.finetune.labels, splits.search.labels]))


def _optimizers(quantized: nn.Module, config: FinetuneConfig) -> list[torch.optim.Optimizer]:
    """Adam for the quantizer parameters (s logits, ranges); SGD for weights and BatchNorm under qat."""
    quantizer_parameters = []
    for layer in quantized_layers(quantized):
        scale_logit = layer.learn_scale_factor()
        if scale_logit is not None:
            quantizer_parameters.append(scale_logit)
        if config.learn_activation_ranges and layer.input_quantizer is not None:
            quantizer_parameters.append(layer.input_quantizer.clip)
    groups = [{"params": quantizer_parameters}] if quantizer_parameters else []
    learned = list(quantizer_parameters)
    if config.learn_batchnorm and config.mode == "scale":
        affine = [p for m in quantized.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        groups.append({"params": affine, "lr": config.learning_rate or DEFAULT_LEARNING_RATES["scale"]})
        learned += affine
    optimizers = [torch.optim.Adam(groups, lr=config.quantizer_learning_rate)] if groups else []
    if config.mode == "qat":  # every weight, bias and BN affine; not the quantizers' own s logits and ranges
        weights = [p for name, p in quantized.named_parameters() if not name.endswith(("scale_logit", ".clip"))]
        optimizers.append(torch.optim.SGD(weights, lr=config.learning_rate or DEFAULT_LEARNING_RATES["qat"], momentum=0.9,
                                          nesterov=True, weight_decay=WEIGHT_DECAY))
        learned = learned + weights
    for parameter in learned:
        parameter.requires_grad_(True)
    if not optimizers:
        raise UserError("nothing to fine-tune: a vanilla plan without activation bits has no scale factors or "
                        "ranges; use mode = 'qat'")
    return optimizers


def _train_epoch(model, teacher, split: ImageSplit, config: FinetuneConfig, optimizers, schedulers, epoch: int,
                 steps: int, memory_format, progress) -> tuple[float, float]:
    """One pass over (part of) the fine-tuning split; returns mean loss and training accuracy."""
    model.train(config.mode == "qat")  # scale fine-tuning keeps BatchNorm frozen
    batches = itertools.islice(split.batches(config.batch_size, shuffle=True, augment=True,
                                             seed=config.seed * 100_003 + epoch), steps)
    total_loss, correct, seen = 0.0, 0, 0
    counter = bar(steps, f"finetune {epoch + 1}/{config.epochs}", progress, iterable=batches)
    for images, labels in counter:
        images = images.contiguous(memory_format=memory_format)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)
            loss = (loss + distillation_loss(logits, target, config.distill_temperature)) / 2
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        total_loss += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        counter.set_postfix(loss=f"{total_loss / seen:.3f}", accuracy=f"{100 * correct / seen:.1f}")
    counter.close()
    return total_loss / seen, 100.0 * correct / seen


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at `temperature`, scaled by its square."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature**2


def _refresh(model: nn.Module) -> None:
    for layer in quantized_layers(model):
        layer.refresh()


def _save_state(path: Path, fingerprint: str, model, optimizers, schedulers, history, start_scores) -> None:
    """Everything needed to resume after the last finished epoch, written atomically."""
    save_atomically({"fingerprint": fingerprint, "model": model.state_dict(), "history": history,
                     "start_scores": start_scores,
                     "optimizers": [o.state_dict() for o in optimizers],
                     "schedulers": [s.state_dict() for s in schedulers]}, path)


def _saved_state(path: Path, fingerprint: str) -> dict | None:
    """The saved state of an unfinished fine-tune with this fingerprint; None when there is none."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, or one holding more than tensors (refused by weights_only)
        raise UserError(f"fine-tune state {path} cannot be read ({type(error).__name__}): delete it to start over") \
            from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise UserError(f"{path} holds a fine-tune of a different plan or with different settings: delete it to "
                        f"start over, or choose another output folder")
    return state


def _resume(state: dict | None, path: Path, model, optimizers, schedulers) -> list[dict[str, float]]:
    """Load a saved state into model and optimizers; returns the finished epochs' history ([] if none)."""
    if state is None:
        return []
    for key, value in state["model"].items():  # learned roundings: buffers a fresh model does not have yet
        if key.endswith(".round_up"):
            model.get_submodule(key.removesuffix(".round_up")).round_up = value
    # a state saved before output rounding (kernel_rounding) lacks output ranges: the start's serve, refitted at the end
    loaded = model.load_state_dict(state["model"], strict=False)
    if loaded.unexpected_keys or any(not key.endswith(".output_quantizer.clip") for key in loaded.missing_keys):
        stray = (loaded.missing_keys + loaded.unexpected_keys)[0]
        raise UserError(f"fine-tune state {path} does not fit the model ({stray}): delete it to start over")
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    _refresh(model)
    note(f"finetune: resuming after epoch {len(state['history'])} from {path}")
    return state["history"]
