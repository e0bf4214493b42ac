"""Image data held in memory as splits: CIFAR-10 from a torchvision-layout folder, or any loader's batches.

Splits follow the benchmark protocol: a *search split* carved from the tail of the training set
(calibration, sensitivity validation, the search objective), the rest of the training set for
fine-tuning, and the test set only for the final reported accuracy. Other sources (ImageFolder,
a user's DataLoader) are read into the same `Splits` by `imagefolder` and `split_from_batches`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import UserError

DATA_ROOT_ENV = "OAQ_DATA_ROOT"
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# The normalisation the akamaster CIFAR checkpoints were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_DOWNLOAD_MD5 = "c58f30108f718f92721af3b95e74349a"


@dataclass(frozen=True)
class ImageSplit:
    """Images (N, C, H, W) and targets (N, ...), batched into float tensors for the model.

    uint8 images are stored compactly and normalised per batch with `mean` and `std`; float images
    (what a user's DataLoader yields) are passed to the model as they are."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> "ImageSplit":
        """The first `count` images (all when count >= len): a fixed, cheap-to-evaluate subset."""
        return replace(self, name=f"{self.name}[:{count}]", images=self.images[:count], labels=self.labels[:count])

    def last(self, count: int) -> "ImageSplit":
        """The last `count` images: apart from `subset` and calibration, which take the first."""
        start = max(len(self) - count, 0)
        return replace(self, name=f"{self.name}[{start}:]", images=self.images[start:], labels=self.labels[start:])

    def batches(
        self, batch_size: int, shuffle: bool = False, augment: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) batches; `augment` adds pad-4 random crops and flips."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            images = self.images[index]
            if augment:
                images = _random_crop_flip(images, generator)
            yield self.normalize(images), self.labels[index]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 normalised with the split's mean and std; float images unchanged."""
        if images.is_floating_point():
            return images
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def to(self, device: str | torch.device) -> "ImageSplit":
        """The same split with its tensors on `device` (batches, crops and flips then run there)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels, so studies can tell when their data changed."""
        digest = hashlib.sha256(self.images.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().tobytes())
        if not self.images.is_floating_point() and (self.mean, self.std) != (MEAN, STD):
            digest.update(repr((self.mean, self.std)).encode())  # what the model sees (CIFAR's kept old digests)
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    """The three splits every stage reads: search (scores, calibration), finetune (training), test (final)."""

    search: ImageSplit
    finetune: ImageSplit
    test: ImageSplit

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input as the model sees it, without the batch dimension (C, H, W)."""
        return tuple(self.search.images.shape[1:])


def split_from_batches(batches: Iterable, name: str) -> ImageSplit:
    """Every `(inputs, targets)` batch of a loader (a DataLoader, any iterable) held in memory as one split.

    Inputs must be (N, C, H, W) tensors of one shape: the first batch fixes the model's input shape."""
    images, labels = [], []
    for index, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise UserError(f"{name} data: batch {index} is a {type(batch).__name__}, not (inputs, targets) tensors: "
                            f"make the loader yield (images, labels) pairs")
        inputs, targets = batch[0], torch.as_tensor(batch[1])
        if inputs.dim() != 4 or (images and inputs.shape[1:] != images[0].shape[1:]):
            expected = f"(N, {', '.join(map(str, images[0].shape[1:]))})" if images else "(N, C, H, W)"
            raise UserError(f"{name} data: batch {index} has inputs of shape {tuple(inputs.shape)}, expected {expected}: "
                            f"resize or crop every image to one size in the loader's transform")
        if len(targets) != len(inputs):
            raise UserError(f"{name} data: batch {index} has {len(inputs)} inputs but {len(targets)} targets")
        images.append(inputs.detach().cpu())
        labels.append(targets.detach().cpu())
    if not images:
        raise UserError(f"{name} data: the loader yielded no batch")
    inputs = torch.cat(images)
    return ImageSplit(name, inputs if inputs.dtype == torch.uint8 else inputs.float(), torch.cat(labels))


def resolve_data_root(root: str | Path | None) -> Path:
    """The data root given, else $OAQ_DATA_ROOT; the folder that holds `cifar-10-batches-py/`."""
    chosen = root if root not in (None, "") else os.environ.get(DATA_ROOT_ENV)
    if not chosen:
        raise UserError(f"no CIFAR-10 data root: pass --data-root or set {DATA_ROOT_ENV}")
    return Path(chosen).expanduser()


def load_cifar10(root: str | Path | None = None, search_size: int = 5000, download: bool = False) -> Splits:
    """Read CIFAR-10 (no md5 check, so rebuilt copies load) and split it deterministically."""
    folder = resolve_data_root(root) / BATCH_FOLDER
    if download and not folder.is_dir():
        _download(folder.parent)
    if not folder.is_dir():
        raise UserError(
            f"CIFAR-10 not found: {folder} does not exist (point --data-root/{DATA_ROOT_ENV} at the folder "
            f"holding {BATCH_FOLDER}/, or pass --download)"
        )
    train_images, train_labels = _read_batches(folder, TRAIN_FILES)
    test_images, test_labels = _read_batches(folder, (TEST_FILE,))
    return split_training_tail(ImageSplit("train", train_images, train_labels), ImageSplit("test", test_images, test_labels),
                               search_size)


def split_training_tail(train: ImageSplit, test: ImageSplit, search_size: int) -> Splits:
    """The last `search_size` training images are the search split, the rest the fine-tuning split."""
    if not 0 < search_size < len(train):
        raise UserError(f"search_size must be between 1 and {len(train) - 1} (the training images less one), "
                        f"got {search_size}")
    cut = len(train) - search_size
    return Splits(search=replace(train.last(search_size), name="search"),
                  finetune=replace(train.subset(cut), name="finetune"), test=test)


def write_cifar10_batches(folder: str | Path, images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Write one batch file in the original pickle layout (used to make small synthetic data sets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": name, "labels": [int(x) for x in labels], "data": images.reshape(len(images), -1)}
    with open(folder / name, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch pickle without running code: only the classes the format holds (a numpy
    array and its dtype; bytes as protocol 2 writes them) can be named, so a planted pickle fails."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = _BatchUnpickler(handle, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64).reshape(-1))
        except FileNotFoundError:
            raise UserError(f"CIFAR-10 batch {path} is missing: the folder is incomplete") from None
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"CIFAR-10 batch {path} cannot be read ({reason}): re-copy the file") from None
        if len(images[-1]) != len(labels[-1]):
            raise UserError(f"CIFAR-10 batch {path} holds {len(images[-1])} images but {len(labels[-1])} labels: "
                            f"re-copy the file")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the zero-padded (4 px) images and random horizontal flips.

    The draws come from `generator` (on the CPU), so a seed gives the same crops on any device.
    """
    count, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    rows = torch.randint(0, 9, (count,), generator=generator).to(device)
    cols = torch.randint(0, 9, (count,), generator=generator).to(device)
    row_index = (rows[:, None] + torch.arange(height, device=device))[:, None, :, None]
    col_index = (cols[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(count, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    cropped = padded[batch_index, channel_index, row_index, col_index]
    flip = (torch.rand(count, generator=generator) < 0.5).to(device)
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def _download(root: Path) -> None:
    """Fetch and unpack the official archive; only ever called when the user asks for it."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    try:
        urllib.request.urlretrieve(_DOWNLOAD_URL, archive)
    except OSError as error:
        raise UserError(f"download of CIFAR-10 from {_DOWNLOAD_URL} failed: {error}") from error
    if hashlib.md5(archive.read_bytes()).hexdigest() != _DOWNLOAD_MD5:
        raise UserError(f"downloaded {archive} has the wrong md5: delete it and try again")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
