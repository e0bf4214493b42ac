"""Accuracy of the shared checkpoints on the shared (JPEG-rebuilt) test set, as PROVENANCE.md states."""

from pathlib import Path

import pytest

from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.pipeline import load_model

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def test_split(cifar_root):
    return load_cifar10(cifar_root).test


@pytest.mark.parametrize("name, checkpoint, expected", [
    ("resnet20", "resnet20_cifar10jpeg.pt", 88.20),
    ("resnet20", "resnet20-12fca82f.th", 81.03),
    ("resnet56", "resnet56_cifar10jpeg.pt", 90.13),
])
def test_checkpoint_accuracy_matches_provenance(shared, test_split, name, checkpoint, expected):
    model = load_model(name, shared / "models" / checkpoint)
    assert accuracy(model, test_split) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("name, file", [("densenet100", "densenet100_cifar10jpeg.pt"),
                                        ("resnet20", "resnet20_scratch_cifar10jpeg.pt")])
def test_reference_checkpoint_loads_safely_and_classifies(test_split, name, file):
    """benchmarks/checkpoints/: trained here (PROVENANCE.md there); strict load, weights_only."""
    model = load_model(name, Path(__file__).resolve().parents[1] / "benchmarks/checkpoints" / file)
    assert accuracy(model, test_split.subset(200)) > 80.0
