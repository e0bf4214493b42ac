"""Images in class folders (torchvision's ImageFolder layout) read into `Splits`, of any size.

    root/train/<class>/<image>   root/test/<class>/<image> (or val/; without either, the last
                                 test_fraction of each class of train)

Every image is decoded once (Pillow), optionally resized (shorter side) and centre-cropped, and held
as uint8; the model sees it normalised with the configured mean and std. Training images are put in a
fixed shuffled order before the last `search_size` become the search split, so every class is in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .data import ImageSplit, Splits, split_training_tail
from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SHUFFLE_SEED = 0


def load_imagefolder(config: DataConfig) -> Splits:
    """The search, fine-tuning and test splits of an ImageFolder tree, as `config` describes it."""
    root = Path(config.root).expanduser()
    train_folder = root / config.train
    classes = _classes(train_folder)
    train_files = {name: _images(train_folder / name) for name in classes}
    test_folder = _test_folder(root, config.test)
    if test_folder is not None:
        if _classes(test_folder) != classes:
            raise UserError(f"image folder {test_folder} has other class folders than {train_folder}: "
                            f"give both the same classes")
        test_files = {name: _images(test_folder / name) for name in classes}
    else:  # the last share of each class
        test_files = {}
        for name, files in train_files.items():
            if len(files) < 2:
                raise UserError(f"class folder {train_folder / name} holds one image: with no test folder, each class "
                                f"needs two or more (some go to the test split)")
            keep = len(files) - max(1, round(len(files) * config.test_fraction))
            train_files[name], test_files[name] = files[:keep], files[keep:]
    train = _read_split("train", train_files, classes, config, shuffle=True)
    test = _read_split("test", test_files, classes, config, shuffle=False)
    return split_training_tail(train, test, config.search_size)


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist: point [data] root at the folder holding train/")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {folder} has no class folders: put each class's images in {folder}/<class>/")
    return classes


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _test_folder(root: Path, name: str | None) -> Path | None:
    if name is not None:
        if not (root / name).is_dir():
            raise UserError(f"test folder {root / name} does not exist")
        return root / name
    return next((root / n for n in ("test", "val") if (root / n).is_dir()), None)


def _read_split(name: str, files: dict[str, list[Path]], classes: list[str], config: DataConfig,
                shuffle: bool) -> ImageSplit:
    paths = [path for label in classes for path in files[label]]
    labels = [index for index, label in enumerate(classes) for _ in files[label]]
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(paths)) if shuffle else np.arange(len(paths))
    images = [_decode(paths[i], config) for i in order]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise UserError(f"images in {config.root} come in {len(shapes)} sizes (e.g. {sorted(shapes)[:2]}, as HxWxC): "
                        f"set [data] resize and crop so every image ends at one size")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if stacked.shape[1] != len(config.mean):
        raise UserError(f"images have {stacked.shape[1]} channels but [data] mean and std give {len(config.mean)}")
    return ImageSplit(name, stacked, torch.tensor(labels)[torch.from_numpy(order)], tuple(config.mean),
                      tuple(config.std))


def _decode(path: Path, config: DataConfig) -> np.ndarray:
    """One image as uint8 (H, W, 3): RGB, the shorter side resized and the centre cropped as configured."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"image {path} cannot be read ({type(error).__name__}): remove or replace it") from None
    if config.resize is not None:
        width, height = image.size
        scale = config.resize / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    if config.crop is not None:
        width, height = image.size
        if min(width, height) < config.crop:
            raise UserError(f"image {path} is {width}x{height}, smaller than crop = {config.crop}: set resize too")
        left, top = (width - config.crop) // 2, (height - config.crop) // 2
        image = image.crop((left, top, left + config.crop, top + config.crop))
    return np.asarray(image, dtype=np.uint8)
