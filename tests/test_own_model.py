"""A user's own model and data: the Python verb, study files with a factory and class folders, bad input.

The model is examples/own_model/model.py (not in the registry): a concatenated stem, depthwise convs,
residual adds and a `.view` flatten. Its images are real CIFAR-10 from ../shared.
"""

from __future__ import annotations

import json
import re
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oaq_search as oaq
from oaq_search.cli import main
from oaq_search.config import dump_study_config, load_study_config
from oaq_search.errors import UserError
from oaq_search.models.torchvision_zoo import import_torchvision

from conftest import REPO
from processes import finish, kill_after_trials, oaq_process

EXAMPLE = REPO / "examples" / "own_model"
sys.path.insert(0, str(EXAMPLE))
from model import build  # noqa: E402  (the example's own module, as a user's script imports it)

# a few images and bit-widths: each measured setting re-calibrates on the whole (small) search split
CHEAP = {"measured_sensitivity_images": 32, "sensitivity_metric": "ssim_weight", "eval_images": 100,
         "weight_bits": [2, 4, 8]}


@pytest.fixture(scope="module")
def images(shared):
    """120 search-split CIFAR-10 images and 100 test images, normalised as the checkpoints expect."""
    splits = oaq.load_cifar10(shared / "data" / "cifar10")
    search, test = splits.search.subset(120), splits.test.subset(100)
    return (search.normalize(search.images), search.labels), (test.normalize(test.images), test.labels)


def weighted_layers(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}


def test_search_verb_takes_any_module_and_a_plain_dataloader(images):
    (x, y), (test_x, test_y) = images
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    model = build()
    result = oaq.search(model, loader, budget={"memory": "60KiB"}, n_trials=6, seed=0,
                        test=DataLoader(TensorDataset(test_x, test_y), batch_size=50), **CHEAP)
    assert result.plan.totals["weight_bytes"] <= 60 * 1024
    assert {layer.name for layer in result.plan.layers} | set(result.plan.float_layers) == weighted_layers(model)
    assert result.plan.metadata["finished_trials"] == 6
    assert 0 <= result.test_accuracy <= 100 and result.fp_test_accuracy is not None
    with torch.no_grad():
        assert result.model(x[:4]).shape == (4, 10)
    again = oaq.search(model, loader, budget={"memory": "60KiB"}, n_trials=6, seed=0, **CHEAP)
    assert again.plan.key() == result.plan.key()  # the same seed, the same plan


def test_search_verb_takes_a_score_callable_and_refuses_bad_options(images):
    (x, y), _ = images
    loader = [(x[:60], y[:60]), (x[60:], y[60:])]
    calls = []

    def negative_output_error(quantized: nn.Module) -> float:  # a regression-style score: higher is better
        calls.append(1)
        with torch.no_grad():
            return -float((quantized(x[:20]) - reference).square().mean())

    model = build()
    with torch.no_grad():
        reference = model(x[:20])
    result = oaq.search(model, loader, budget={"memory": "50KiB"}, n_trials=2, score=negative_output_error,
                        **{**CHEAP, "measured_sensitivity_images": 0})
    assert calls and result.plan.metadata["score"] == "custom" and result.plan.metadata["search_score"] <= 0
    with pytest.raises(UserError, match="unknown search option 'n_trails'"):
        oaq.search(model, loader, budget={"memory": "50KiB"}, n_trails=3)
    with pytest.raises(UserError, match=r"batch 1 has inputs of shape \(4, 3, 16, 16\), expected \(N, 3, 32, 32\)"):
        oaq.search(model, [(x[:4], y[:4]), (torch.zeros(4, 3, 16, 16), y[:4])], budget={"memory": "50KiB"})


def write_image_folder(root, images, labels, size=None):
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        (picture.resize((size, size)) if size else picture).save(folder / f"{index:04d}.png")


@pytest.fixture(scope="module")
def image_folder(shared, tmp_path_factory):
    """CIFAR-10 images as class folders: 150 training and 50 test PNGs."""
    root = tmp_path_factory.mktemp("folders")
    splits = oaq.load_cifar10(shared / "data" / "cifar10")
    write_image_folder(root / "train", splits.search.images[:150], splits.search.labels[:150])
    write_image_folder(root / "test", splits.test.images[:50], splits.test.labels[:50])
    return root


def own_study(tmp_path, image_folder, n_trials=4, leaf_modules=()):
    """examples/own_model/study.toml pointed at the test's folders, shrunk, beside a copy of model.py."""
    config = load_study_config(EXAMPLE / "study.toml")
    config.model.checkpoint, config.model.leaf_modules = None, list(leaf_modules)
    config.data.root, config.data.search_size = str(image_folder), 100
    config.output_dir = str(tmp_path / "run")
    config.search.n_trials, config.search.finalists = n_trials, 1
    config.search.heartbeat_seconds, config.search.grace_seconds = 1, 3  # a killed run's trial is retried soon
    for key, value in CHEAP.items():
        setattr(config.search, key, value)
    config.budget = {"memory": "50KiB"}
    (tmp_path / "model.py").write_text((EXAMPLE / "model.py").read_text())
    path = tmp_path / "study.toml"
    path.write_text(dump_study_config(config))
    return path, load_study_config(path)


def test_study_file_with_a_factory_and_class_folders_resumes_after_a_kill_and_exports(tmp_path, image_folder, capsys):
    path, config = own_study(tmp_path, image_folder, n_trials=20, leaf_modules=["stem"])  # its convs stay float
    before = {number: t.value for number, t in
              kill_after_trials(oaq_process("run", str(path)), config.name, config.storage_url, 2).items()}
    resumed = oaq_process("run", str(path))
    output = finish(resumed, timeout=300)
    assert resumed.returncode == 0, output
    after = {t.number: t.value for t in optuna.load_study(study_name=config.name, storage=config.storage_url).trials
             if t.state == TrialState.COMPLETE}
    assert len(after) == 20 and all(after[number] == value for number, value in before.items())
    assert "kept in full precision (not quantizable here): stem.wide.0, stem.point.0" in output
    assert main(["export", str(path), "--out", str(tmp_path / "plan.json")]) == 0
    plan = oaq.Plan.load(tmp_path / "plan.json")
    assert plan.model == "model:build" and plan.float_layers == ["stem.wide.0", "stem.point.0"]
    assert {layer.name for layer in plan.layers} | set(plan.float_layers) == weighted_layers(build())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_structures_search_on_64_pixel_class_folders(name, shared, tmp_path):
    splits = oaq.load_cifar10(shared / "data" / "cifar10")
    write_image_folder(tmp_path / "data" / "train", splits.search.images[:30], splits.search.labels[:30] % 4)
    write_image_folder(tmp_path / "data" / "test", splits.test.images[:12], splits.test.labels[:12] % 4)
    path = tmp_path / "study.toml"
    path.write_text(f'''name = "tv"
output_dir = "{tmp_path / 'run'}"
[model]
factory = "oaq_search.models.torchvision_zoo:imagenet_model"
kwargs = {{ name = "{name}", num_classes = 10 }}
[data]
kind = "imagefolder"
root = "{tmp_path / 'data'}"
search_size = 20
resize = 64
[search]
n_trials = 2
weight_bits = [2, 4, 8]
finalists = 1
eval_images = 20
measured_sensitivity_images = 0
sensitivity_metric = "ssim_weight"
[budget]
memory = "{'4MiB' if name == 'resnet18' else '1MiB'}"
''')
    assert main(["run", str(path)]) == 0
    plan = oaq.Plan.load(tmp_path / "run" / "plan.json")
    model = import_torchvision().models.__dict__[name](num_classes=10)
    assert {layer.name for layer in plan.layers} == weighted_layers(model)
    assert plan.metadata["test_images"] == 12
    assert "torchvision" not in str(torch.fx.symbolic_trace(model).graph)  # no torchvision op (none runs on CPU)


BAD_INPUT_MODULE = """
CHANNELS = 3


def not_a_module():
    return {}


def wrong_shape():
    batch = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    return {"search": [batch, (torch.zeros(2, 3, 8, 8), batch[1])], "test": [batch]}


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.head = Gate(), nn.Linear(3, 10)

    def forward(self, x):
        return self.head(self.gate(x).mean((2, 3)))
"""


@pytest.mark.parametrize("model, data, expected", [
    ({"factory": "no_such_module:build"}, {}, "model factory 'no_such_module:build' cannot be loaded"),
    ({"factory": "model:CHANNELS"}, {}, "is a int, not a function or class"),
    ({"factory": "model:not_a_module"}, {}, "returned a dict, not a torch.nn.Module"),
    ({"checkpoint": "wrong.pt"}, {}, r"does not match the model \(missing keys \[blocks.0.depthwise.0.weight"),
    ({}, {"root": "empty"}, "has no class folders"),
    ({}, {"root": "broken"}, "broken/train/cat/0.png cannot be read"),
    ({}, {"kind": "python", "loader": "model:wrong_shape"}, r"batch 1 has inputs of shape \(2, 3, 8, 8\)"),
    ({"factory": "model:Untraceable"}, {}, r"cannot be traced by torch.fx at .*\.py:\d+ .* list 'gate' in leaf_modules"),
])
def test_bad_own_model_or_data_is_one_line_and_exit_2(model, data, expected, tmp_path, image_folder, capsys):
    module = f"user_model_{tmp_path.name}"  # a name of its own: each case imports its own file
    (tmp_path / f"{module}.py").write_text((EXAMPLE / "model.py").read_text() + BAD_INPUT_MODULE)
    model = {key: value.replace("model:", f"{module}:") for key, value in model.items()}
    data = {key: value.replace("model:", f"{module}:") for key, value in data.items()}
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "broken" / "train" / "cat").mkdir(parents=True)
    for index in range(2):
        (tmp_path / "broken" / "train" / "cat" / f"{index}.png").write_bytes(b"not a png")
    sections = {"model": {"factory": f"{module}:build", **model},
                "data": {"kind": "imagefolder", "root": str(image_folder), "search_size": 100, **data}}
    for values in sections.values():
        for key in ("root", "checkpoint"):
            if key in values:
                values[key] = str(tmp_path / values[key])
    path = tmp_path / "study.toml"
    path.write_text(f"""name = "bad"
output_dir = "{tmp_path / 'run'}"
[budget]
memory = "50KiB"
[search]
n_trials = 1
sensitivity_metric = "ssim_weight"
measured_sensitivity_images = 0
""" + "".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
              for name, values in sections.items()))
    assert main(["run", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("oaq-search: error: ")
    assert re.search(expected, error), error
