import pickle

import pytest
import torch

from oaq_search.checkpoints import load_checkpoint, read_state_dict
from oaq_search.errors import UserError
from oaq_search.models import MODELS, build_model, model_spec
from oaq_search.models.torchvision_zoo import import_torchvision


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet100"])
def test_cifar_models_classify_cifar_images(name):
    logits = build_model(name)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


def test_torchvision_models_import_through_the_guarded_helper():
    torchvision = import_torchvision()
    assert hasattr(torchvision.models, "resnet18")
    logits = build_model("tv_mobilenet_v2")(torch.randn(1, 3, 96, 96))
    assert logits.shape == (1, 1000)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'resnet21'.*resnet20"):
        model_spec("resnet21")


def test_resnet_parameter_names_match_akamaster_layout():
    names = set(build_model("resnet20").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer3.2.conv2.weight", "linear.bias"} <= names
    assert not any("shortcut" in n for n in names)  # option A shortcuts have no parameters


def test_checkpoint_with_module_prefix_and_wrapper_loads(tmp_path):
    source = build_model("resnet20")
    wrapped = {"best_prec1": 91.0, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.th")
    target = load_checkpoint(build_model("resnet20"), tmp_path / "wrapped.th")
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist") as error:
        read_state_dict(tmp_path / "nope.pt")
    assert "\n" not in str(error.value)


def test_truncated_checkpoint_is_reported(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be read") as error:
        read_state_dict(tmp_path / "cut.pt")
    assert "\n" not in str(error.value)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(UserError, match=r"missing keys \[layer1\.3\..*more\]") as error:
        load_checkpoint(build_model("resnet56"), tmp_path / "r20.pt")
    assert "r20.pt" in str(error.value)
    state = build_model("resnet20").state_dict()
    state["extra.weight"] = torch.zeros(1)
    state["linear.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"unexpected keys \[extra\.weight\].*wrong shapes \[linear\.weight"):
        load_checkpoint(build_model("resnet20"), tmp_path / "odd.pt")


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('checkpoint code ran')",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"conv1.weight": _RunsCode()}, handle, protocol=2)
    with pytest.raises(UserError, match="refused|cannot be read"):
        read_state_dict(path)


def test_registry_lists_every_required_model():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet100",
            "tv_resnet18", "tv_resnet50", "tv_mobilenet_v2"} <= set(MODELS)


def test_checkpoint_with_nan_weights_or_statistics_is_refused_naming_them(tmp_path):
    model = build_model("resnet20")
    state = model.state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer2.0.bn1.running_var"][3] = float("inf")
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(UserError, match=r"NaN or infinite values in \[layer1.0.conv1.weight, layer2.0.bn1.running_var\]"):
        load_checkpoint(build_model("resnet20"), tmp_path / "diverged.pt")
