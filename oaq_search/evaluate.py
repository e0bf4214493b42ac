"""Top-1 accuracy of a model on an image split, batched, under inference mode."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSplit


def accuracy(model: nn.Module, split: ImageSplit, batch_size: int = 500, progress: bool | None = None) -> float:
    """Top-1 accuracy in percent, on the model's device. The progress bar shows only on a terminal unless forced."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        batches = split.batches(batch_size)
        total_batches = -(-len(split) // batch_size)
        for images, labels in tqdm(batches, total=total_batches, desc=f"eval {split.name}", leave=False,
                                   disable=None if progress is None else not progress):
            correct += int((model(images.to(device)).argmax(1) == labels.to(device)).sum())
    model.train(was_training)
    return 100.0 * correct / len(split)
