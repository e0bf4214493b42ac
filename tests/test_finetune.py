"""Fine-tuning: what it learns, the files it writes, exact resume, and the command line."""

import json

import pytest
import torch

from oaq_search.activations import ActivationQuantizer
from oaq_search.cli import main
from oaq_search.config import FinetuneConfig
from oaq_search.data import load_cifar10
from oaq_search.errors import UserError
from oaq_search.fake_quant import quantized_layers
from oaq_search.devices import training_device
from oaq_search.finetuning import STATE_FILE, distillation_loss, finetune, training_images
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.plan import LayerPlan, Plan
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize

TINY = {"epochs": 2, "batch_size": 32, "images_per_epoch": 64}


@pytest.fixture(scope="module")
def resnet20(shared):
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model)).uniform(4, activation_bits=4)
    splits = load_cifar10(shared / "data" / "cifar10", search_size=500)
    return model, plan, splits


def outputs(model, splits):
    images = next(splits.test.batches(50))[0]
    with torch.no_grad():
        return model.eval()(images)


def test_algorithm_1_learns_only_s_and_ranges_and_apply_rebuilds_it(resnet20, tmp_path):
    model, plan, splits = resnet20
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = FinetuneConfig(mode="scale", learn_batchnorm=False, **TINY)  # the paper's Algorithm 1 exactly
    result = finetune(model, plan, splits, config, tmp_path, progress=False)
    assert [epoch["epoch"] for epoch in result.history] == [1, 2]
    changed = [layer.name for layer, old in zip(result.plan.layers, plan.layers) if layer.scale_factor != old.scale_factor]
    assert len(changed) >= len(plan.layers) // 2  # s moved away from its data-free start in most layers
    assert all(layer.activation_range is not None and layer.activation_range[1] > 0 for layer in result.plan.layers)
    saved = torch.load(result.files["checkpoint"], weights_only=True)
    for name, tensor in before.items():  # weights and BN affine frozen; BN statistics were corrected (PTQ)
        if name.endswith("bias"):  # beta moved only to put the folded bias on its int32 grid (kernel_rounding)
            assert torch.allclose(saved[name], tensor, rtol=0, atol=1e-3), name
        elif not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(saved[name], tensor), name
    assert torch.load(result.files["packed"], weights_only=True)["format"] == "oaq-packed-2"
    rebuilt = post_training_quantize(load_model("resnet20", result.files["checkpoint"]),
                                     Plan.load(result.files["plan"]), splits.search, bn_correction=False)
    assert torch.allclose(outputs(rebuilt, splits), outputs(result.model, splits), atol=1e-5)


def test_scale_finetune_by_default_also_learns_batchnorm_affine(resnet20, tmp_path):
    model, plan, splits = resnet20
    result = finetune(model, plan, splits, FinetuneConfig(mode="scale", **TINY), tmp_path, progress=False)
    saved = torch.load(result.files["checkpoint"], weights_only=True)
    assert not torch.equal(saved["bn1.weight"], model.bn1.weight)
    assert torch.equal(saved["conv1.weight"], model.conv1.weight)


def test_qat_trains_weights_and_writes_a_plain_checkpoint(resnet20, tmp_path):
    model, plan, splits = resnet20
    config = FinetuneConfig(mode="qat", distill=True, **TINY)
    result = finetune(model, plan, splits, config, tmp_path, progress=False)
    tuned = load_model("resnet20", result.files["checkpoint"])  # loads strictly, weights_only
    assert not torch.equal(tuned.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    assert json.loads(result.files["plan"].read_text())["metadata"]["finetune"]["mode"] == "qat"


def test_interrupted_finetune_resumes_to_the_same_result(resnet20, tmp_path, second_epoch_interrupted):
    model, plan, splits = resnet20
    config = FinetuneConfig(mode="scale", **TINY)
    straight = finetune(model, plan, splits, config, tmp_path / "straight", progress=False)
    with second_epoch_interrupted():
        finetune(model, plan, splits, config, tmp_path / "resumed", progress=False)
    state_path = tmp_path / "resumed" / STATE_FILE  # as saved before output rounding: no output ranges
    state = torch.load(state_path, weights_only=True)
    state["model"] = {key: value for key, value in state["model"].items() if not key.endswith(".output_quantizer.clip")}
    torch.save(state, state_path)
    resumed = finetune(model, plan, splits, config, tmp_path / "resumed", progress=False)
    learned = ("loss", "train_accuracy", "search_accuracy")
    for resumed_epoch, straight_epoch in zip(resumed.history, straight.history):  # epoch 1 loaded, epoch 2 re-run
        assert [resumed_epoch[k] for k in learned] == [straight_epoch[k] for k in learned]
    assert [layer.scale_factor for layer in resumed.plan.layers] == [layer.scale_factor for layer in straight.plan.layers]
    with pytest.raises(UserError, match="different plan or with different settings"):
        finetune(model, plan, splits, FinetuneConfig(mode="scale", **{**TINY, "epochs": 3}), tmp_path / "resumed")


def test_learned_scale_factor_gets_a_gradient():
    torch.manual_seed(0)
    model = load_model("resnet20")
    plan = Plan.uniform("resnet20", layer_graph("resnet20", model), 3, scale_factor=0.2)
    from oaq_search.fake_quant import quantize_

    quantize_(model, plan)
    model.requires_grad_(False)
    layer = next(quantized_layers(model))
    logit = layer.learn_scale_factor()
    assert layer.scale_factor == pytest.approx(0.2)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert logit.grad is not None and float(logit.grad.abs()) > 0


def test_distillation_loss_is_zero_only_when_student_matches_teacher():
    logits = torch.randn(8, 10)
    assert float(distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(8, 10), 4.0)) > 0


def test_activation_range_round_trips_through_the_plan():
    quantizer = ActivationQuantizer(4)
    quantizer.set_range(-1.5, 1.5)
    assert quantizer.calibrated and quantizer.range == (-1.5, 1.5)
    assert LayerPlan("conv", 4, activation_bits=4, activation_range=[0.0, 2.0]).activation_range == [0.0, 2.0]
    with pytest.raises(UserError, match="activation_range must be"):
        LayerPlan("conv", 4, activation_bits=4, activation_range=[-1.0, 2.0])


def test_finetune_config_rejects_bad_values():
    with pytest.raises(UserError, match="finetune mode must be one of"):
        FinetuneConfig(mode="full")
    with pytest.raises(UserError, match="epochs must be at least 1"):
        FinetuneConfig(mode="scale", epochs=0)
    with pytest.raises(UserError, match="train_split must be one of finetune, all"):
        FinetuneConfig(mode="scale", train_split="test")
    with pytest.raises(UserError, match="device must be auto, cpu, cuda or cuda:N"):
        FinetuneConfig(mode="scale", device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_finetune_device_auto_is_the_cpu_and_cuda_without_a_gpu_is_refused():
    assert training_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="PyTorch sees no CUDA GPU"):
        training_device("cuda:0")


def test_train_split_all_adds_the_search_split_and_nothing_else(synthetic_cifar):
    splits = load_cifar10(synthetic_cifar, search_size=50)
    assert training_images(splits, "finetune") is splits.finetune
    both = training_images(splits, "all")
    assert len(both) == len(splits.finetune) + len(splits.search) == 200
    assert torch.equal(both.images[-50:], splits.search.images) and torch.equal(both.labels[-50:], splits.search.labels)


def test_finetune_command_needs_a_checkpoint(capsys, tmp_path):
    model = load_model("resnet20")
    Plan.uniform("resnet20", layer_graph("resnet20", model), 4).save(tmp_path / "plan.json")
    assert main(["finetune", "--plan", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --checkpoint" in err
    assert main(["finetune", "--plan", str(tmp_path / "plan.json"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device must be auto, cpu, cuda or cuda:N" in err


def test_finetune_command_writes_plan_checkpoint_and_packed_model(resnet20, shared, tmp_path, capsys):
    model, plan, _ = resnet20
    plan.save(tmp_path / "plan.json")
    argv = ["finetune", "--plan", str(tmp_path / "plan.json"), "--checkpoint",
            str(shared / "models" / "resnet20_cifar10jpeg.pt"), "--data-root", str(shared / "data" / "cifar10"),
            "--epochs", "1", "--images-per-epoch", "64", "--test-images", "200", "--out", str(tmp_path / "ft"),
            "--no-distill"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fine-tuned (scale, 1 epoch," in out and "on 200 images" in out
    tuned = Plan.load(tmp_path / "ft" / "plan.json")
    assert tuned.metadata["finetune"]["test_images"] == 200
    assert tuned.metadata["finetune"]["distill"] is False  # on by default; --no-distill turns it off
    assert {p.name for p in (tmp_path / "ft").iterdir()} >= {"plan.json", "finetuned.pt", "model.packed.pt"}
