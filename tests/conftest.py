"""Shared fixtures: a tiny synthetic CIFAR-10 folder, and ../shared (models, real data) when present."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oaq_search.data import BATCH_FOLDER, TEST_FILE, TRAIN_FILES, write_cifar10_batches

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: more threads would make torch 4-5x slower


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same random state, so a failure seen once reproduces."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Sensitivity tables go to a throwaway cache, never the user's ~/.cache."""
    os.environ["OAQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared beside the checkout: skipped locally when absent, a failure under CI."""
    if not (SHARED / "models").is_dir() or not (SHARED / "data" / "cifar10" / BATCH_FOLDER).is_dir():
        message = f"{SHARED} with models/ and data/cifar10/ is needed"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is an error, not a skip)")
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def cifar_root(shared) -> Path:
    return shared / "data" / "cifar10"


@pytest.fixture(scope="session")
def synthetic_cifar(tmp_path_factory) -> Path:
    """A CIFAR-10 folder in torchvision layout: 5 x 40 train and 30 test random images."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name, count in [*((n, 40) for n in TRAIN_FILES), (TEST_FILE, 30)]:
        images = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        write_cifar10_batches(root / BATCH_FOLDER, images, rng.integers(0, 10, size=count), name)
    return root


@pytest.fixture
def quick_study(shared, tmp_path):
    """The quickstart study on the real ResNet-20 and CIFAR-10, shrunk to seconds, in tmp_path."""
    from oaq_search.config import load_study_config

    config = load_study_config(REPO / "studies" / "quickstart.toml")
    config.model.checkpoint = str(shared / "models" / "resnet20_cifar10jpeg.pt")
    config.data.root = str(shared / "data" / "cifar10")
    config.output_dir = str(tmp_path / "run")
    config.search.n_trials = 3
    config.search.eval_images = 200
    config.search.finalists = 1  # re-scoring on the whole search split has its own test
    config.search.measured_sensitivity_images = 0  # minutes on ResNet-20; measured sensitivity has its own test
    config.search.sensitivity_metric = "ssim_weight"  # a second; the Hessian table takes a minute (tested alone)
    config.data.test_images = 1000
    config.finetune.mode = "none"  # tests that fine-tune turn it back on, shrunk
    return config


@pytest.fixture
def second_epoch_interrupted(monkeypatch):
    """A context: a fine-tune run inside it stops with KeyboardInterrupt as its second epoch starts."""
    from oaq_search import finetuning

    real_epoch = finetuning._train_epoch

    def epoch(*args, **kwargs):
        if args[6] == 1:  # the epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    @contextlib.contextmanager
    def interrupted():
        monkeypatch.setattr(finetuning, "_train_epoch", epoch)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(finetuning, "_train_epoch", real_epoch)

    return interrupted
