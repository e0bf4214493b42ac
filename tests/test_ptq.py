import copy
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from oaq_search.bn_correction import BatchNormCorrector
from oaq_search.cache import default_cache_dir
from oaq_search.cli import main
from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy, logits, reference_accuracy, reusing
from oaq_search.fake_quant import quantize_
from oaq_search.oaq import fake_quantize_weight
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory
from oaq_search.ptq import calibrate_and_correct, post_training_quantize, requantize


def trained_like_resnet20():
    """A ResNet-20 whose BN statistics differ from the batch's, as after real training."""
    torch.manual_seed(0)
    model = load_model("resnet20")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model


def bn_outputs(model, images):
    outputs = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
               for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(images)
    for handle in handles:
        handle.remove()
    return outputs


def test_bn_correction_is_the_identity_on_the_full_precision_model():
    model = trained_like_resnet20()
    images = torch.randn(64, 3, 32, 32)
    corrected = BatchNormCorrector(model, images).apply(copy.deepcopy(model))
    for (name, ours), (_, theirs) in zip(corrected.state_dict().items(), model.state_dict().items()):
        assert torch.allclose(ours, theirs, atol=1e-5), name


def test_bn_correction_restores_full_precision_statistics_after_quantization():
    model = trained_like_resnet20()
    images = torch.randn(64, 3, 32, 32)
    graph = layer_graph("resnet20", model)
    quantized = quantize_(copy.deepcopy(model), Plan.uniform("resnet20", graph, 2, method="vanilla"))
    reference = bn_outputs(model, images)

    def mismatch(candidate):
        outputs = bn_outputs(candidate, images)
        return sum(float((outputs[n].mean((0, 2, 3)) - reference[n].mean((0, 2, 3))).abs().mean()) for n in reference)

    before = mismatch(quantized)
    after = mismatch(BatchNormCorrector(model, images).apply(quantized))
    assert after < before / 20


def test_a_trial_model_scores_a_plan_the_same_whatever_was_quantized_before():
    """Search trials re-quantize one model in place; with 4-bit inputs, ranges once fitted on the BN
    statistics the previous plan's correction left spread ResNet-20 W3A4 over 0.55 points."""
    model = trained_like_resnet20()
    graph = layer_graph("resnet20", model)
    images = torch.randn(64, 3, 32, 32)
    factory = PlanFactory("resnet20", model, graph, activation_bits={name: 4 for name in graph.names})
    plan, before = factory.uniform(3, 4), factory.uniform(2, 4)
    corrector = BatchNormCorrector(model, images)
    fresh = calibrate_and_correct(quantize_(copy.deepcopy(model), plan), images, corrector)
    trial = copy.deepcopy(model)
    requantize(trial, before, images, corrector)
    requantize(trial, plan, images, corrector)
    with torch.no_grad():
        assert torch.allclose(trial.eval()(images), fresh.eval()(images), atol=1e-5)


def test_bn_correction_fitted_with_the_ranges_in_one_pass_is_already_settled():
    """Correcting again, with every range now fixed, changes nothing."""
    model = trained_like_resnet20()
    graph = layer_graph("resnet20", model)
    images = torch.randn(64, 3, 32, 32)
    plan = PlanFactory("resnet20", model, graph).uniform(3, 4)
    corrector = BatchNormCorrector(model, images)
    quantized = calibrate_and_correct(quantize_(copy.deepcopy(model), plan), images, corrector)
    before = copy.deepcopy(quantized.state_dict())
    corrector.apply(quantized)
    for name, value in quantized.state_dict().items():
        assert torch.allclose(value, before[name], rtol=1e-4, atol=1e-6), name


def test_a_trial_scored_on_its_calibration_images_reuses_the_calibration_pass_exactly(synthetic_cifar):
    """The correction pass computes the corrected model's outputs on the calibration images; scoring the
    split they lead reads them instead of running the model again, and gets the same numbers."""
    model = trained_like_resnet20()
    graph = layer_graph("resnet20", model)
    split = load_cifar10(synthetic_cifar, search_size=120).search
    images = next(split.batches(50))[0]
    corrector = BatchNormCorrector(model, images)
    plan = PlanFactory("resnet20", model, graph).uniform(3, 4)
    quantized = requantize(quantize_(copy.deepcopy(model), plan), plan, images, corrector)
    fresh = logits(quantized, split, batch_size=25)
    calls = []
    quantized.register_forward_pre_hook(lambda _module, args: calls.append(len(args[0])))
    with reusing(quantized, corrector.images, corrector.outputs):
        reused = logits(quantized, split, batch_size=25)
    assert torch.allclose(reused, fresh, atol=1e-5)
    assert sum(calls) == 120 - 50  # the two batches inside the calibration images were not run


def test_the_full_precision_accuracy_is_read_back_from_the_cache(monkeypatch, synthetic_cifar):
    model = trained_like_resnet20()
    split = load_cifar10(synthetic_cifar, search_size=100).test
    first = reference_accuracy(model, split)
    monkeypatch.setattr("oaq_search.evaluate.accuracy", lambda *args: pytest.fail("computed again"))
    assert reference_accuracy(model, split) == first
    model.linear.bias.data += 1.0  # other weights: a new entry, computed
    with pytest.raises(pytest.fail.Exception, match="computed again"):
        reference_accuracy(model, split)
    monkeypatch.undo()
    for stored in default_cache_dir().glob("accuracy-*.json"):
        stored.write_text("{ half a file")  # a cache that does not parse is computed again, not an error
    value = reference_accuracy(model, split)
    monkeypatch.setattr("oaq_search.evaluate.accuracy", lambda *args: pytest.fail("computed again"))
    assert reference_accuracy(model, split) == value  # and written back whole


def test_quantize_command_writes_a_safe_packed_model(tmp_path, synthetic_cifar, capsys):
    torch.save(load_model("resnet20").state_dict(), tmp_path / "r20.pt")
    argv = ["quantize", "--model", "resnet20", "--checkpoint", str(tmp_path / "r20.pt"), "--data-root",
            str(synthetic_cifar), "--search-size", "50", "--wbits", "3", "--abits", "4", "--out", str(tmp_path / "q.pt")]
    assert main(argv) == 0
    assert "quantized" in capsys.readouterr().out
    packed = torch.load(tmp_path / "q.pt", weights_only=True)
    assert packed["layers"]["layer2.0.conv1"]["bits"] == 3 and packed["layers"]["conv1"]["bits"] == 8
    assert (tmp_path / "q.pt").stat().st_size < 200_000  # calibration samples are not saved
    assert Plan.load(tmp_path / "q.plan.json").layer("layer1.0.conv1").activation_bits == 4


def test_quantize_command_packs_ternary_layers_five_codes_a_byte(tmp_path, synthetic_cifar, capsys):
    argv = ["quantize", "--model", "resnet20", "--data-root", str(synthetic_cifar), "--search-size", "50",
            "--wbits", "2", "--code-packing", "base3", "--out", str(tmp_path / "q.pt")]
    assert main(argv) == 0
    layer = torch.load(tmp_path / "q.pt", weights_only=True)["layers"]["layer3.0.conv2"]
    assert layer["packing"] == "base3" and layer["codes"].numel() == 64 * 64 * 9 // 5 + 1
    assert Plan.load(tmp_path / "q.plan.json").layer("layer3.0.conv2").code_packing == "base3"


def test_hwmodels_imports_on_its_own():
    assert subprocess.run([sys.executable, "-c", "import hwmodels"], capture_output=True).returncode == 0


@pytest.mark.shared
def test_oaq_beats_vanilla_at_three_bits_on_resnet20(shared):
    splits = load_cifar10(shared / "data" / "cifar10")
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    graph = layer_graph("resnet20", model)
    scored = splits.search.subset(1000)
    results = {}
    for method in ("vanilla", "oaq"):
        plan = PlanFactory("resnet20", model, graph, method).uniform(3)
        results[method] = accuracy(post_training_quantize(model, plan, splits.search), scored)
    assert results["oaq"] > results["vanilla"] + 3, results


def test_plans_can_be_built_from_an_already_quantized_model():
    model = load_model("resnet20")
    graph = layer_graph("resnet20", model)
    quantize_(model, Plan.uniform("resnet20", graph, 3))
    plan = PlanFactory("resnet20", model, graph).uniform(4)
    assert torch.equal(model.layer1[0].conv1.weight, model.layer1[0].conv1.layer.weight)
    assert plan.layer("layer1.0.conv1").weight_bits == 4


def test_plans_pack_ternary_layers_the_way_the_cost_model_stores_them():
    model = load_model("resnet20")
    graph = layer_graph("resnet20", model)
    plan = PlanFactory("resnet20", model, graph, code_packing="base3").uniform(2)
    packings = {layer.name: layer.code_packing for layer in plan.layers}
    assert packings["layer1.0.conv1"] == "base3" and packings["conv1"] == packings["linear"] == "fields"  # 8-bit ends
    assert Plan.from_dict(json.loads(plan.to_json())).layer("layer1.0.conv1").code_packing == "base3"
    assert plan.key() != PlanFactory("resnet20", model, graph).uniform(2).key()  # the same bits, packed otherwise


def test_outlier_settings_chosen_on_calibration_images_are_read_back_from_the_cache(tmp_path, monkeypatch):
    model = trained_like_resnet20()
    graph = layer_graph("resnet20", model)
    images = torch.randn(16, 3, 32, 32)
    chosen = PlanFactory("resnet20", model, graph, calibration=images, cache_dir=tmp_path).uniform(3)
    monkeypatch.setattr("oaq_search.planning.choose_outlier_settings_by_output",
                        lambda *args: pytest.fail("chosen again"))
    assert PlanFactory("resnet20", model, graph, calibration=images, cache_dir=tmp_path).uniform(3).key() == chosen.key()
    with pytest.raises(pytest.fail.Exception, match="chosen again"):  # other images: chosen afresh
        PlanFactory("resnet20", model, graph, calibration=images[:8], cache_dir=tmp_path).uniform(3)
    monkeypatch.undo()
    for stored in tmp_path.glob("outliers-*.json"):
        stored.write_text('{"conv1|8|uniform": [7.0, 1.0]}')  # s outside [0, 1]: ignored, chosen afresh
    assert PlanFactory("resnet20", model, graph, calibration=images, cache_dir=tmp_path).uniform(3).key() == chosen.key()


@pytest.mark.shared
def test_output_error_rule_never_loses_to_weight_mse_or_vanilla_on_the_layer_output(shared):
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    graph = layer_graph("resnet20", model)
    images = next(load_cifar10(shared / "data" / "cifar10").search.batches(32))[0]
    by_output = PlanFactory("resnet20", model, graph, calibration=images)
    by_weight = PlanFactory("resnet20", model, graph)
    inputs = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
             for name in graph.names]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    differs = 0
    for name in graph.names[1:-1]:
        conv = model.get_submodule(name)

        @torch.no_grad()
        def output_error(quantizer, conv=conv, x=inputs[name]):
            delta = fake_quantize_weight(conv.weight, quantizer) - conv.weight
            return float(conv._conv_forward(x, delta, None).square().sum())

        chosen, data_free = by_output.weight_quantizer(name, 3), by_weight.weight_quantizer(name, 3)
        vanilla = replace(chosen, scale_factor=1.0)
        assert output_error(chosen) <= min(output_error(data_free), output_error(vanilla)) * (1 + 1e-6), name
        differs += (chosen.scale_factor, chosen.threshold) != (data_free.scale_factor, data_free.threshold)
    assert differs > 0  # the two rules are not the same rule
