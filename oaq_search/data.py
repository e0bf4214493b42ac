"""CIFAR-10 from a torchvision-layout folder, held in memory, with deterministic splits.

Splits follow the benchmark protocol: a *search split* carved from the tail of the training set
(calibration, sensitivity validation, the search objective), the rest of the training set for
fine-tuning, and the test set only for the final reported accuracy.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
    """uint8 images (N, 3, 32, 32) and int64 labels (N,), batched into normalised float tensors."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> "ImageSplit":
        """The first `count` images (all when count >= len): a fixed, cheap-to-evaluate subset."""
        return ImageSplit(f"{self.name}[:{count}]", self.images[:count], self.labels[:count])

    def last(self, count: int) -> "ImageSplit":
        """The last `count` images: apart from `subset` and calibration, which take the first."""
        start = max(len(self) - count, 0)
        return ImageSplit(f"{self.name}[{start}:]", self.images[start:], self.labels[start:])

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
            yield normalize(images), self.labels[index]

    def to(self, device: str | torch.device) -> "ImageSplit":
        """The same split with its tensors on `device` (batches, crops and flips then run there)."""
        return ImageSplit(self.name, self.images.to(device), self.labels.to(device))

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels, so studies can tell when their data changed."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CifarSplits:
    search: ImageSplit
    finetune: ImageSplit
    test: ImageSplit


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the checkpoints' mean and std."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def resolve_data_root(root: str | Path | None) -> Path:
    """The data root given, else $OAQ_DATA_ROOT; the folder that holds `cifar-10-batches-py/`."""
    chosen = root if root not in (None, "") else os.environ.get(DATA_ROOT_ENV)
    if not chosen:
        raise UserError(f"no CIFAR-10 data root: pass --data-root or set {DATA_ROOT_ENV}")
    return Path(chosen).expanduser()


def load_cifar10(root: str | Path | None = None, search_size: int = 5000, download: bool = False) -> CifarSplits:
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
    if not 0 < search_size < len(train_labels):
        raise UserError(f"search_size must be between 1 and {len(train_labels) - 1}, got {search_size}")
    cut = len(train_labels) - search_size
    return CifarSplits(
        search=ImageSplit("search", train_images[cut:], train_labels[cut:]),
        finetune=ImageSplit("finetune", train_images[:cut], train_labels[:cut]),
        test=ImageSplit("test", test_images, test_labels),
    )


def write_cifar10_batches(folder: str | Path, images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Write one batch file in the original pickle layout (used to make small synthetic data sets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": name, "labels": [int(x) for x in labels], "data": images.reshape(len(images), -1)}
    with open(folder / name, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="latin1")
            data, batch_labels = batch["data"], batch["labels"]
        except FileNotFoundError:
            raise UserError(f"CIFAR-10 batch {path} is missing: the folder is incomplete") from None
        except Exception as error:
            raise UserError(f"CIFAR-10 batch {path} cannot be read ({type(error).__name__}): re-copy the file") from error
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the zero-padded (4 px) images and random horizontal flips.

    The draws come from `generator` (on the CPU), so a seed gives the same crops on any device.
    """
    count, _, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    rows = torch.randint(0, 9, (count,), generator=generator).to(device)
    cols = torch.randint(0, 9, (count,), generator=generator).to(device)
    row_index = (rows[:, None] + torch.arange(height, device=device))[:, None, :, None]
    col_index = (cols[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(count, device=device)[:, None, None, None]
    channel_index = torch.arange(3, device=device)[None, :, None, None]
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
