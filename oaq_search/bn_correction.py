"""BatchNorm statistics correction after weight quantization, from one calibration batch.

Quantizing weights shifts and rescales each conv's output per channel. The correction keeps the
checkpoint's BatchNorm statistics and adjusts them so that, on the calibration images, every BN
normalises its quantized input to the same per-channel mean and variance as in full precision:
    running_var' = running_var * var_q / var_fp
    running_mean' = mean_q - (mean_fp - running_mean) * sqrt(var_q / var_fp)
It runs as one forward pass with pre-hooks, so every BN sees upstream layers already corrected.
Re-estimating the statistics outright was measured worse: the checkpoint's statistics come from
augmented training batches, and replacing them cost the full-precision ResNet-20 3.8 points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .observe import observe_inputs

_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


class BatchNormCorrector:
    """Remembers full-precision BN input statistics on `images`; `apply` corrects a quantized copy."""

    def __init__(self, fp_model: nn.Module, images: torch.Tensor):
        self.images = images
        self.outputs: torch.Tensor | None = None  # the last corrected model's outputs on `images` (its logits)
        self.reference = {}
        observe_inputs(fp_model, _batchnorms(fp_model), images,
                       lambda name, module, x: self.reference.__setitem__(name, _channel_statistics(x)))
        self.original = {name: (module.running_mean.clone(), module.running_var.clone())
                         for name, module in _batchnorms(fp_model).items()}

    def apply(self, model: nn.Module) -> nn.Module:
        """Set every BN's running statistics of `model` (same architecture) to corrected values. Each BN
        is corrected before it runs, so the pass computes the corrected model's outputs on `images`:
        kept in `outputs`, for scoring on the same images not to compute them again (`evaluate.reusing`)."""
        def correct(name, module, x):
            mean_q, var_q = _channel_statistics(x)
            mean_fp, var_fp = self.reference[name]
            mean, var = self.original[name]
            ratio = var_q / var_fp.clamp(min=1e-12)
            module.running_var.copy_(var * ratio)
            module.running_mean.copy_(mean_q - (mean_fp - mean) * ratio.sqrt())

        self.outputs = observe_inputs(model, _batchnorms(model), self.images, correct).float().cpu()
        return model


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, _BATCHNORMS)}


def _channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance, from BatchNorm's own kernel: on CPU 3-4x faster than
    `Tensor.var` over the other dims, which took a third of a search trial's time on ResNet-20."""
    mean, var = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
    F.batch_norm(x, mean, var, training=True, momentum=1.0)  # momentum 1: the running stats become the batch's
    return mean, var
