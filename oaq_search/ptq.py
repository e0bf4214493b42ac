"""Post-training quantization of a model under a plan: weights, activation ranges, BN correction."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from .bn_correction import BatchNormCorrector
from .config import PtqConfig
from .data import ImageSplit
from .errors import UserError
from .evaluate import accuracy
from .fake_quant import (QuantizedLayer, activation_quantizers, calibrate_activations, learned_plan, needs_calibration,
                         quantize_, quantized_layers)
from .kernel_rounding import outputs_unrounded, round_like_kernels_
from .plan import Plan
from .reconstruction import reconstruct
from .schema import to_dict

CALIBRATION_IMAGES = 500


def post_training_quantize(model: nn.Module, plan: Plan, calibration: ImageSplit | None = None,
                           bn_correction: bool = True, calibration_images: int = CALIBRATION_IMAGES,
                           reconstruction: PtqConfig | None = None, progress: bool | None = None) -> nn.Module:
    """A quantized copy of `model`. Calibration data (the search split) fixes activation ranges and,
    with `bn_correction`, matches BatchNorm statistics to full precision; the model then rounds biases and
    outputs as a deployment's integer kernels do (`kernel_rounding.py`). Without it the weights are
    quantized data-free. With `reconstruction` (its `reconstruct` set) the rounding and ranges are then
    learned block by block (`reconstruct_plan`, which also gives the plan the result follows)."""
    quantized = quantize_(copy.deepcopy(model), plan)
    reconstructing = reconstruction is not None and reconstruction.reconstruct
    if calibration is None:
        if needs_calibration(quantized) or reconstructing:
            raise UserError("a plan with activation bits, and reconstruction, need calibration data: pass the search split")
        return quantized
    images = next(calibration.batches(calibration_images))[0]
    corrector = BatchNormCorrector(model, images) if bn_correction else None
    calibrate_and_correct(quantized, images, corrector, ranges_from_data=needs_calibration(quantized))
    round_like_kernels_(quantized, images)
    if reconstructing:
        reconstruct_plan(quantized, model, plan, calibration, reconstruction, progress)
    return quantized


def reconstruct_plan(quantized: nn.Module, model: nn.Module, plan: Plan, calibration: ImageSplit,
                     reconstruction: PtqConfig, progress: bool | None = None) -> Plan:
    """Reconstruct `quantized` (`model` post-training quantized by `plan`) in place on the first
    `reconstruction.images` images of `calibration`; returns the plan it now follows: the learned ranges,
    and the settings in the metadata (the rounding is in the model's codes, not in the plan). With
    `restarts` above 1, one reconstruction per seed from `seed` on, and the one most accurate on the
    calibration images past those it fits on is kept: a single run's result moves with its seed."""
    images = next(calibration.batches(reconstruction.images))[0]
    held_out = calibration.last(len(calibration) - reconstruction.images)
    if reconstruction.restarts > 1 and not len(held_out):
        raise UserError(f"ptq restarts are compared on search images past the {reconstruction.images} reconstruction "
                        f"fits on, and the search split has {len(calibration)}: lower ptq images or raise the search size")
    rounding_images = next(calibration.batches(CALIBRATION_IMAGES))[0]
    start = copy.deepcopy(quantized) if reconstruction.restarts > 1 else None
    best, scores = quantized, []
    for restart in range(reconstruction.restarts):
        candidate = quantized if restart == 0 else copy.deepcopy(start)
        with outputs_unrounded(candidate):
            reconstruct(candidate, model, images, replace(reconstruction, seed=reconstruction.seed + restart), progress)
        round_like_kernels_(candidate, rounding_images)
        if start is not None:
            scores.append(accuracy(candidate, held_out, progress=False))
            best = candidate if scores[-1] > max(scores[:-1], default=-1.0) else best
    if best is not quantized:
        _adopt_reconstruction(quantized, best)
    result = learned_plan(quantized, plan)
    result.metadata = {**plan.metadata, "reconstruction": to_dict(reconstruction)}
    if scores:
        result.metadata["reconstruction"]["held_out_accuracies"] = scores  # one per restart, seed order
    return result


def _adopt_reconstruction(target: nn.Module, source: nn.Module) -> None:
    """`source`'s learned roundings, ranges and BatchNorm statistics into `target`, both copies of one model."""
    for name, layer in target.named_modules():
        if isinstance(layer, QuantizedLayer):  # None (rounded to nearest) or 0/1 per weight, in either
            layer.round_up = source.get_submodule(name).round_up
    target.load_state_dict(source.state_dict())
    for layer in quantized_layers(target):
        layer.refresh()


def requantize(wrapped: nn.Module, plan: Plan, images: torch.Tensor | None,
               corrector: BatchNormCorrector | None = None) -> nn.Module:
    """`wrapped` (a model `quantize_` has wrapped before) quantized in place by `plan`, its activation
    ranges calibrated on `images` and BatchNorm corrected: one search trial's model, no copy made."""
    quantize_(wrapped, plan)
    return calibrate_and_correct(wrapped, images, corrector)


def calibrate_and_correct(quantized: nn.Module, images: torch.Tensor | None, corrector: BatchNormCorrector | None = None,
                          ranges_from_data: bool = True) -> nn.Module:
    """Fit activation ranges on `images` and correct BatchNorm statistics, in one pass in execution
    order: each range is fitted on the inputs the quantized model gives it (upstream inputs quantized,
    BNs corrected) and each BN corrected on quantized inputs, so the result depends on the plan alone,
    never on what the model computed before (a search trial re-quantizes one model in place).

    With a corrector, ranges are fitted on its images (the same calibration images throughout);
    without one, on `images` with upstream inputs left unquantized (`calibrate_activations`).
    `ranges_from_data=False` keeps ranges the plan fixed (a fine-tuned plan)."""
    calibrate = ranges_from_data and images is not None and bool(activation_quantizers(quantized))
    if corrector is None:
        if calibrate:
            calibrate_activations(quantized, [images])
        return quantized
    if calibrate:
        for quantizer in activation_quantizers(quantized):
            quantizer.start_observing(fit_on_first_batch=True)
    return corrector.apply(quantized)
