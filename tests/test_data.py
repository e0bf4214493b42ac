import pytest
import torch

from oaq_search.data import DATA_ROOT_ENV, load_cifar10
from oaq_search.errors import UserError


def test_splits_carve_the_search_split_from_the_training_tail(synthetic_cifar):
    splits = load_cifar10(synthetic_cifar, search_size=50)
    assert (len(splits.search), len(splits.finetune), len(splits.test)) == (50, 150, 30)
    again = load_cifar10(synthetic_cifar, search_size=50)
    assert torch.equal(splits.search.images, again.search.images)
    assert splits.search.fingerprint() == again.search.fingerprint() != splits.test.fingerprint()


def test_data_root_comes_from_the_environment(synthetic_cifar, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(synthetic_cifar))
    assert len(load_cifar10(None, search_size=10).test) == 30


def test_missing_root_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(UserError, match="--data-root"):
        load_cifar10(None)
    with pytest.raises(UserError, match="does not exist"):
        load_cifar10(tmp_path / "elsewhere")


def test_batches_are_normalised_and_augmentation_keeps_shapes(synthetic_cifar):
    split = load_cifar10(synthetic_cifar, search_size=50).finetune
    plain = next(split.batches(64))[0]
    augmented, labels = next(split.batches(64, shuffle=True, augment=True, seed=1))
    assert plain.shape == augmented.shape == (64, 3, 32, 32) and labels.shape == (64,)
    assert plain.dtype == torch.float32 and -3 < float(plain.mean()) < 3
    assert not torch.equal(plain, augmented)


def test_corrupt_batch_file_is_named(synthetic_cifar, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_cifar, copy)
    (copy / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 cannot be read"):
        load_cifar10(copy)
