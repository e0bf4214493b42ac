import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from oaq_search.cli import main
from oaq_search.errors import UserError
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.sensitivity import SensitivityMetric, SensitivityTable, compute_sensitivity, get_metric, register_metric
from oaq_search.sensitivity.metrics import _global_ssim, ssim


@pytest.fixture(scope="module")
def heavy_tailed_resnet20() -> tuple:
    """ResNet-20 with Student-t weights: a bulk and far outliers, like trained layers."""
    torch.manual_seed(0)
    model = load_model("resnet20")
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.weight.data = torch.distributions.StudentT(3.0).sample(module.weight.shape) * 0.05
    return model, layer_graph("resnet20", model)


def test_ssim_matches_scikit_image_and_the_global_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 27))
    b = a + rng.normal(scale=0.1, size=a.shape)
    assert ssim(a, b, 6.0) == pytest.approx(structural_similarity(a, b, data_range=6.0, win_size=7), abs=1e-12)
    # a window as large as the signal is the global formula
    x, y = rng.normal(size=(7,)), rng.normal(size=(7,))
    sk = structural_similarity(x, y, data_range=4.0, win_size=7, use_sample_covariance=False)
    assert _global_ssim(x, y, 4.0) == pytest.approx(sk, abs=1e-6)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_sensitivity_falls_monotonically_as_bits_rise(shared, name):
    """On every layer of the real checkpoints, for every metric and both methods."""
    model = load_model(name, shared / "models" / f"{name}_cifar10jpeg.pt")
    table = compute_sensitivity(model, layer_graph(name, model), cache_dir=None)
    for metric, methods in table.scores.items():
        for method, rows in methods.items():
            for layer, row in zip(table.layers, rows):
                assert all(row[i] >= row[i + 1] - 1e-9 for i in range(len(row) - 1)), (metric, method, layer, row)
                assert row[-1] < row[0]


def test_table_is_cached_by_weights_and_reloads(heavy_tailed_resnet20, tmp_path):
    model, graph = heavy_tailed_resnet20
    first = compute_sensitivity(model, graph, ["mse"], bits=[2, 4], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert compute_sensitivity(model, graph, ["mse"], bits=[2, 4], cache_dir=tmp_path) == first
    ranking = first.ranking("mse", "oaq", 2)
    assert sorted(ranking) == sorted(graph.names)
    assert SensitivityTable.load(first.save(tmp_path / "t.json")) == first


def test_hessian_metric_needs_data_and_scores_with_it(synthetic_cifar):
    from oaq_search.data import load_cifar10

    model = load_model("resnet20")
    graph = layer_graph("resnet20", model)
    with pytest.raises(UserError, match="needs data"):
        compute_sensitivity(model, graph, ["hessian"], bits=[2], cache_dir=None)
    table = compute_sensitivity(model, graph, [get_metric("hessian")], bits=[2, 8],
                                data=load_cifar10(synthetic_cifar, search_size=64).search, cache_dir=None)
    rows = np.array(table.scores["hessian"]["oaq"])
    assert np.isfinite(rows).all() and (rows >= 0).all() and (rows[:, 0] > rows[:, 1]).all()


def test_hessian_trace_is_the_same_in_any_batch_size(synthetic_cifar):
    """Batches bound memory only: the same probes over the same images give the same trace."""
    from oaq_search.data import load_cifar10
    from oaq_search.sensitivity.metrics import HessianTrace

    torch.manual_seed(0)
    model = load_model("resnet20")
    graph = layer_graph("resnet20", model)
    data = load_cifar10(synthetic_cifar, search_size=64).search
    traces = []
    for batch_size in (64, 24):  # one pass, and three uneven ones (24 + 24 + 16)
        metric = HessianTrace(images=64, samples=2, batch_size=batch_size)
        metric.prepare(model, graph, data)
        traces.append(metric.trace_per_weight)
    assert traces[1] == pytest.approx(traces[0], rel=1e-3)  # float32 sums in another order: ~1e-4 apart
    assert len(set(traces[0].values())) > 1  # layers differ: the comparison is not of zeros


def test_user_metrics_register_and_load_by_path():
    @register_metric
    class MaxError(SensitivityMetric):
        name = "max_error_test"

        def score(self, layer, weight, quantized):
            return float((weight - quantized).abs().max())

    assert isinstance(get_metric("max_error_test"), MaxError)
    assert get_metric("oaq_search.sensitivity.metrics:WeightMSE").name == "mse"
    with pytest.raises(UserError, match="unknown sensitivity metric"):
        get_metric("psnr")


def test_sensitivity_command_writes_table_csv_and_heatmap(tmp_path, capsys):
    assert main(["sensitivity", "--model", "resnet20", "--metrics", "ssim_weight,mse", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "most sensitive first" in out and out.count("\n") > 20
    assert (tmp_path / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer1.0.conv1" in (tmp_path / "sensitivity.csv").read_text()
    table = SensitivityTable.load(tmp_path / "sensitivity.json")
    assert set(table.scores) == {"ssim_weight", "mse"} and set(table.scores["mse"]) == {"vanilla", "oaq"}
    assert np.array(table.scores["mse"]["oaq"]).shape == (20, 7)


@pytest.mark.shared
def test_measuring_each_move_from_its_groups_first_block_gives_the_same_scores(shared):
    import copy

    from oaq_search.bn_correction import BatchNormCorrector
    from oaq_search.data import load_cifar10
    from oaq_search.planning import PlanFactory, uniform_activation_bits
    from oaq_search.prefix import PrefixCache
    from oaq_search.ptq import requantize
    from oaq_search.sensitivity.measured import measure_group_sensitivity

    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    graph = layer_graph("resnet20", model)
    splits = load_cifar10(shared / "data" / "cifar10")
    calibration, probe = next(splits.search.batches(100))[0], next(splits.search.last(64).batches(64))[0]
    factory = PlanFactory("resnet20", model, graph, "oaq", "uniform", False)
    groups = graph.tie_groups()
    counts = [2 if index % 3 == 1 else 1 for index in range(len(groups))]  # moves early, middle and late
    trial, corrector = copy.deepcopy(model), BatchNormCorrector(model, calibration)
    activations = uniform_activation_bits(graph, 8, 8)

    def quantize(choice):  # a group's last index is its widest, 8 bits; the other 2
        weights = {name: 8 if index == count - 1 else 2 for group, index, count in zip(groups, choice, counts)
                   for name in group}
        return requantize(trial, factory(weights, activations), calibration, corrector)

    quantize([count - 1 for count in counts])
    runs = []
    trial.layer1[0].conv1.register_forward_pre_hook(lambda *_: runs.append(1))
    full = measure_group_sensitivity(quantize, counts, model, probe, progress=False)
    full_runs, runs[:] = len(runs), []
    prefix = PrefixCache(model, probe[:1], (torch.nn.Conv2d, torch.nn.Linear))
    assert prefix.fits(model, probe, len(probe) + len(calibration))
    reused = measure_group_sensitivity(quantize, counts, model, probe, False, prefix, groups)
    assert np.isfinite(full).sum() > 5 and np.allclose(reused, full, rtol=1e-5, atol=1e-8)
    assert len(runs) < full_runs / 2  # most moves start past layer1.0


def test_the_prefix_cache_takes_a_quarter_of_free_memory_within_its_bounds(tmp_path):
    from oaq_search import prefix

    assert prefix.MIN_BYTES <= prefix.memory_budget() <= prefix.MAX_BYTES
    meminfo = tmp_path / "meminfo"
    cases = ((12 * 1024**2, 3 * 1024**3), (1024**2, prefix.MIN_BYTES), (64 * 1024**2, prefix.MAX_BYTES))  # KiB free
    for available_kib, budget in cases:
        meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_kib} kB\n")
        assert prefix.memory_budget(str(meminfo)) == budget
    assert prefix.memory_budget(str(tmp_path / "missing")) == prefix.MIN_BYTES
