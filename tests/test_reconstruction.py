"""Block reconstruction: learned rounding inside OAQ's quantizer, the units it fits, and that what it
learns reaches the packed model, the ONNX export and a resumed fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from oaq_search import grids
from oaq_search import ptq as ptq_module
from oaq_search.blocks import find_blocks
from oaq_search.cli import main
from oaq_search.config import FinetuneConfig, PtqConfig
from oaq_search.data import load_cifar10
from oaq_search.deploy import export_onnx, from_packed, reference_model
from oaq_search.errors import UserError
from oaq_search.evaluate import accuracy, logits
from oaq_search.fake_quant import QuantizedLayer, quantize_, quantized_layers
from oaq_search.oaq import WeightQuantizer, fake_quantize_weight, normalized_grid_input, quantize_weight
from oaq_search.packing import load_packed, pack_model
from oaq_search.pipeline import finetune_and_test, layer_graph, load_model
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize, reconstruct_plan
from oaq_search.reconstruction import SoftRounding
from oaq_search.runtime import agreement, onnx_logits


@pytest.mark.parametrize("grid", ["uniform", "pot", "ipot", "midrise"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rounding_up_or_down_brackets_every_value_and_includes_the_nearest(grid, bits):
    x = torch.cat([torch.linspace(-1, 1, 2001), torch.rand(1000) * 2 - 1])
    below = grids.floor_code(x, grid, bits)
    low, high = grids.codes_to_values(below, grid, bits), grids.codes_to_values(below + 1, grid, bits)
    assert (low <= x + 1e-6).all() and (x <= high + 1e-6).all()
    nearest = grids.level_index(x, grid, bits)
    up = nearest - below
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(grids.rounded_codes(x, grid, bits, up), nearest)


def test_soft_rounding_starts_at_the_unrounded_weight_and_hardens_to_the_nearest_codes():
    layer = QuantizedLayer(nn.Conv2d(8, 16, 3), "conv")
    layer.weight_quantizer = WeightQuantizer(3, scale_factor=0.3)
    rounding = SoftRounding(layer)
    x, mu, sigma, scale = normalized_grid_input(layer.layer.weight, layer.weight_quantizer)
    assert torch.allclose(rounding(), sigma * scale * x + mu, atol=1e-5)  # h = the fraction: no rounding yet
    codes = quantize_weight(layer.layer.weight, layer.weight_quantizer, round_up=rounding.round_up()).codes
    nearest = quantize_weight(layer.layer.weight, layer.weight_quantizer).codes
    assert (codes != nearest).float().mean() < 0.01  # only exact ties may differ
    pushed = fake_quantize_weight(layer.layer.weight, layer.weight_quantizer, round_up=torch.ones_like(codes))
    assert (pushed >= fake_quantize_weight(layer.layer.weight, layer.weight_quantizer) - 1e-6).all()


class _Shared(nn.Module):
    """A block whose conv runs twice: it cannot be fitted alone, its parent can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_units_are_blocks_in_execution_order_and_layers_that_run_twice_are_left_out(shared):
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model), "oaq", "uniform", False).uniform(4)
    quantized = quantize_(copy.deepcopy(model), plan)
    units = find_blocks(quantized, torch.zeros(1, 3, 32, 32), QuantizedLayer)
    assert units == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear"]

    tangled = nn.Sequential(nn.Conv2d(3, 4, 1), _Shared(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    for name in ("0", "1.conv", "3"):
        layer = tangled.get_submodule(name)
        wrapper = QuantizedLayer(layer, name)
        wrapper.weight_quantizer = WeightQuantizer(4)
        wrapper.refresh()
        parent, _, child = name.rpartition(".")
        setattr(tangled.get_submodule(parent) if parent else tangled, child, wrapper)
    assert find_blocks(tangled, torch.zeros(1, 3, 8, 8), QuantizedLayer) == ["0", "1", "3"]
    assert find_blocks(model, torch.zeros(1, 3, 32, 32), (nn.Conv2d, nn.Linear)) == units  # the same, unwrapped


@pytest.fixture(scope="module")
def reconstructed_w2(shared):
    """ResNet-20 W2A8 rounded to nearest, and reconstructed briefly (short enough for a test)."""
    torch.manual_seed(0)
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    splits = load_cifar10(shared / "data" / "cifar10")
    calibration = next(splits.search.batches(500))[0]
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model), "oaq", "uniform", False,
                       calibration).uniform(2, 8)
    nearest = post_training_quantize(model, plan, splits.search)
    config = PtqConfig(reconstruct=True, images=256, iterations=150, learning_rate=0.01)
    reconstructed = copy.deepcopy(nearest)
    tuned_plan = reconstruct_plan(reconstructed, model, plan, splits.search, config, False)
    return model, splits, plan, nearest, reconstructed, config, tuned_plan


def test_reconstruction_brings_held_out_outputs_closer_to_full_precision(reconstructed_w2):
    model, splits, _, nearest, reconstructed, _, _ = reconstructed_w2
    held_out = next(splits.test.batches(500))[0]  # images reconstruction never saw
    with torch.no_grad():
        target = model(held_out)
        error = {name: float((m(held_out) - target).pow(2).sum(1).mean()) for name, m in
                 (("nearest", nearest), ("reconstructed", reconstructed))}
    assert error["reconstructed"] < 0.8 * error["nearest"], error
    layers = list(quantized_layers(reconstructed))
    assert all(layer.rounding is None for layer in layers)
    assert any(layer.round_up is not None for layer in layers)  # a block 150 steps did not improve keeps nearest


def test_the_packed_model_and_its_onnx_reference_carry_the_learned_codes(reconstructed_w2, tmp_path):
    model, splits, plan, nearest, reconstructed, config, tuned_plan = reconstructed_w2
    assert tuned_plan.metadata["reconstruction"]["iterations"] == config.iterations
    pack_model(reconstructed, tuned_plan, tmp_path / "model.packed.pt")
    packed = load_packed(tmp_path / "model.packed.pt")
    assert not any(key.endswith("round_up") for key in packed.state)  # the codes carry the rounding
    differs = False
    for layer in quantized_layers(reconstructed):
        assert torch.equal(packed.layers[layer.name]["codes"], layer.codes().codes)
        differs |= not torch.equal(layer.codes().codes, dict((l.name, l) for l in quantized_layers(nearest))[
            layer.name].codes().codes)
    assert differs
    fresh = load_model("resnet20")
    layers = from_packed(packed, fresh)
    test = splits.test.subset(500)
    with torch.no_grad():
        images = next(test.batches(64))[0]
        assert torch.allclose(reference_model(fresh, layers)(images), reconstructed(images), atol=1e-4)
    export_onnx(fresh, tuned_plan, next(splits.search.batches(500))[0], tmp_path / "model.onnx", layers)
    assert agreement(onnx_logits(tmp_path / "model.onnx", test), logits(reconstructed, test)) >= 0.97


def test_a_new_grid_drops_the_learned_rounding_and_a_new_scale_factor_keeps_it(reconstructed_w2):
    _, _, plan, _, reconstructed, _, _ = reconstructed_w2
    model = copy.deepcopy(reconstructed)
    name = next(layer.name for layer in quantized_layers(model) if layer.round_up is not None)
    quantize_(model, plan.with_layers({name: {"scale_factor": 0.5}}))
    assert model.get_submodule(name).round_up is not None
    quantize_(model, plan.with_layers({name: {"weight_bits": 3}}))
    assert model.get_submodule(name).round_up is None


def test_reconstruction_without_calibration_data_and_bad_settings_are_refused(shared):
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model), "oaq", "uniform", False).uniform(4)
    with pytest.raises(UserError, match="need calibration data"):
        post_training_quantize(model, plan, None, reconstruction=PtqConfig(reconstruct=True))
    with pytest.raises(UserError, match="drop_probability"):
        PtqConfig(drop_probability=1.0)
    with pytest.raises(UserError, match="iterations"):
        PtqConfig(iterations=0)


def test_quantize_reconstruct_prints_both_accuracies_and_records_its_settings(tmp_path, synthetic_cifar, capsys):
    argv = ["quantize", "--model", "resnet20", "--data-root", str(synthetic_cifar), "--search-size", "50", "--wbits", "3",
            "--abits", "8", "--reconstruct", "--reconstruct-iterations", "4", "--reconstruct-images", "32",
            "--out", str(tmp_path / "q.pt")]
    assert main(argv) == 0
    assert "rounded to nearest" in capsys.readouterr().out
    settings = Plan.load(tmp_path / "q.plan.json").metadata["reconstruction"]
    assert (settings["iterations"], settings["images"]) == (4, 32)
    assert main(["apply", "--model", "resnet20", "--data-root", str(synthetic_cifar), "--search-size", "50", "--plan",
                 str(tmp_path / "q.plan.json")]) == 0
    assert "this plan was reconstructed" in capsys.readouterr().err  # apply alone cannot rebuild its rounding


def test_a_fine_tune_from_a_reconstructed_model_keeps_its_rounding_and_resumes_without_learning_it_again(
        synthetic_cifar, tmp_path, monkeypatch, second_epoch_interrupted):
    model = load_model("resnet20")
    splits = load_cifar10(synthetic_cifar, 50)
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model), "oaq", "uniform", False).uniform(3, 8)
    ptq = PtqConfig(reconstruct=True, images=32, iterations=8, learning_rate=0.02)
    config = FinetuneConfig(mode="scale", epochs=2, batch_size=16, images_per_epoch=32)
    with second_epoch_interrupted():
        finetune_and_test(model, plan, splits, config, tmp_path, test_images=64, progress=False, reconstruction=ptq)
    start = post_training_quantize(model, plan, splits.search, reconstruction=ptq, progress=False)
    monkeypatch.setattr(ptq_module, "reconstruct", lambda *args, **kwargs: pytest.fail("reconstructed again"))
    resumed = finetune_and_test(model, plan, splits, config, tmp_path, test_images=64, progress=False,
                                reconstruction=ptq)
    assert resumed.plan.metadata["reconstruction"]["iterations"] == 8
    # the post-training score is the reconstructed start's, saved before the interruption
    assert resumed.scores["ptq_test_accuracy"] == accuracy(start, splits.test.subset(64), progress=False)
    learned = [layer for layer in quantized_layers(resumed.model) if layer.round_up is not None]
    assert learned
    packed = load_packed(resumed.files["packed"])
    for layer in learned:
        assert torch.equal(packed.layers[layer.name]["codes"], layer.codes().codes)


def test_restarts_keep_the_reconstruction_most_accurate_on_the_search_images_it_does_not_fit_on(synthetic_cifar):
    model = load_model("resnet20")
    splits = load_cifar10(synthetic_cifar, 50)
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model), "oaq", "uniform", False).uniform(2, 4)
    nearest = post_training_quantize(model, plan, splits.search)
    ptq = PtqConfig(reconstruct=True, images=32, iterations=4, batch_size=8, learning_rate=0.1, restarts=2)
    kept = copy.deepcopy(nearest)
    scores = reconstruct_plan(kept, model, plan, splits.search, ptq, False).metadata["reconstruction"][
        "held_out_accuracies"]
    assert len(scores) == 2 and accuracy(kept, splits.search.last(50 - 32), progress=False) == max(scores)
    alone = [copy.deepcopy(nearest) for _ in scores]  # each seed reconstructed on its own
    for seed, candidate in enumerate(alone):
        reconstruct_plan(candidate, model, plan, splits.search, PtqConfig(**{**vars(ptq), "restarts": 1, "seed": seed}))
    codes = lambda m: [layer.codes().codes for layer in quantized_layers(m)]  # noqa: E731
    assert not all(map(torch.equal, codes(alone[0]), codes(alone[1])))  # the seeds learn different roundings
    assert all(map(torch.equal, codes(kept), codes(alone[scores.index(max(scores))])))
    ptq_module._adopt_reconstruction(alone[0], alone[1])  # the kept one taken over whole, whichever seed won
    images = next(splits.test.batches(16))[0]
    assert all(map(torch.equal, codes(alone[0]), codes(alone[1])))
    assert torch.equal(alone[0](images), alone[1](images))
    with pytest.raises(UserError, match="restarts"):
        reconstruct_plan(copy.deepcopy(nearest), model, plan, splits.search, PtqConfig(reconstruct=True, images=50,
                                                                                      restarts=2))
