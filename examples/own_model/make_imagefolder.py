"""Write part of ../shared's CIFAR-10 as class folders of PNG files: the layout a user's own images come in.

    python examples/own_model/make_imagefolder.py --out runs/cifar10-folders --train 5000 --test 1000

PNG is lossless, so the folders hold the same pixels as the batch files. The training images are the
last `--train` of CIFAR-10's training set (up to 5,000: images the example's reference checkpoint was
never trained on); the test images are the first `--test` of its test set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from oaq_search.data import load_cifar10

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_folders(out: Path, data_root: Path, train: int, test: int) -> None:
    splits = load_cifar10(data_root)
    train_images = torch.cat([splits.finetune.images, splits.search.images])[-train:]
    train_labels = torch.cat([splits.finetune.labels, splits.search.labels])[-train:]
    for name, images, labels in (("train", train_images, train_labels),
                                 ("test", splits.test.images[:test], splits.test.labels[:test])):
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = out / name / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cifar10-folders", help="folder to write train/ and test/ into")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--train", type=int, default=5000, help="training images (the last ones of CIFAR-10's)")
    parser.add_argument("--test", type=int, default=1000, help="test images (the first ones)")
    args = parser.parse_args()
    write_folders(Path(args.out), Path(args.data_root), args.train, args.test)
    print(f"wrote {args.train} training and {args.test} test images to {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    main()
