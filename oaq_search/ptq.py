"""Post-training quantization of a model under a plan: weights, activation ranges, BN correction."""

from __future__ import annotations

import copy

from torch import nn

from .bn_correction import BatchNormCorrector
from .data import ImageSplit
from .errors import UserError
from .fake_quant import activation_quantizers, calibrate_activations, needs_calibration, quantize_
from .plan import Plan

CALIBRATION_IMAGES = 500


def post_training_quantize(model: nn.Module, plan: Plan, calibration: ImageSplit | None = None,
                           bn_correction: bool = True, calibration_images: int = CALIBRATION_IMAGES) -> nn.Module:
    """A quantized copy of `model`. Calibration data (the search split) fixes activation ranges and,
    with `bn_correction`, matches BatchNorm statistics to full precision; without it the weights are
    quantized data-free."""
    quantized = quantize_(copy.deepcopy(model), plan)
    if calibration is None:
        if needs_calibration(quantized):
            raise UserError("a plan with activation bits needs calibration data: pass the search split")
        return quantized
    images = next(calibration.batches(calibration_images))[0]
    if needs_calibration(quantized):
        calibrate_activations(quantized, [images])
    if bn_correction:
        BatchNormCorrector(model, images).apply(quantized)
        if activation_quantizers(quantized):
            calibrate_activations(quantized, [images])  # ranges for the corrected distributions
    return quantized
