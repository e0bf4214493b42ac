"""Hostile input: data files that try to run code, plans for another model, impossible target numbers,
a resumed study whose settings changed."""

from __future__ import annotations

import pickle

import pytest

from oaq_search.cli import main
from oaq_search.config import dump_study_config, validate
from oaq_search.data import BATCH_FOLDER, TEST_FILE, load_cifar10
from oaq_search.errors import UserError
from oaq_search.pipeline import layer_graph, load_model, run_study
from oaq_search.planning import PlanFactory
from hwmodels import load_target
from hwmodels.target import TARGETS_DIR

from test_search import synthetic_study


class PlantedCommand:
    """Unpickling this would run a shell command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_a_malicious_cifar_batch_runs_nothing_and_is_one_line(synthetic_cifar, tmp_path):
    root = tmp_path / "data"
    (root / BATCH_FOLDER).mkdir(parents=True)
    for path in (synthetic_cifar / BATCH_FOLDER).iterdir():
        (root / BATCH_FOLDER / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "ran"
    (root / BATCH_FOLDER / TEST_FILE).write_bytes(pickle.dumps({"data": PlantedCommand(marker), "labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"test_batch cannot be read \(it names posix.system, which a CIFAR batch never "
                                        r"holds\): re-copy the file"):
        load_cifar10(root)
    assert not marker.exists()


def test_a_plan_for_another_model_is_refused_naming_both(synthetic_cifar, tmp_path, capsys):
    model = load_model("resnet20")
    PlanFactory("resnet20", model, layer_graph("resnet20", model)).uniform(4).save(tmp_path / "plan.json")
    for command in (["apply", "--model", "resnet56", "--plan", str(tmp_path / "plan.json")],
                    ["finetune", "--model", "resnet56", "--checkpoint", "none.pt", "--plan", str(tmp_path / "plan.json")]):
        code = main([*command, "--data-root", str(synthetic_cifar)])
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1, error
        assert "plan for resnet20 leaves 36 of resnet56's 56 layers unplanned" in error or "none.pt" in error, error


@pytest.mark.parametrize("line, replacement, expected", [
    ("macs_per_s = ", "macs_per_s = -", "must be a finite number, positive"),
    ("macs_per_s = 4.096e12", "macs_per_s = 0", "must be a finite number, positive, got 0"),
    ("layer_overhead_s = ", "layer_overhead_s = -", "'rates.layer_overhead_s' must be a finite number, zero or more"),
    ("macs_per_s = 4.096e12", "macs_per_s = nan", "must be a finite number, positive, got nan"),
])
def test_target_tables_refuse_impossible_numbers_naming_the_key(line, replacement, expected, tmp_path):
    text = (TARGETS_DIR / "bitfusion.toml").read_text()
    assert line in text
    (tmp_path / "broken.toml").write_text(text.replace(line, replacement, 1))
    with pytest.raises(UserError, match=rf"target table .*broken.toml: key .*{expected}"):
        load_target(tmp_path / "broken.toml")


def test_a_study_resumed_with_another_sensitivity_metric_is_refused(synthetic_cifar, tmp_path):
    run_study(synthetic_study(synthetic_cifar, tmp_path, n_trials=1))
    with pytest.raises(UserError, match="was started with a different search space"):
        run_study(synthetic_study(synthetic_cifar, tmp_path, n_trials=1, sensitivity_metric="ssim_weight"))


@pytest.mark.parametrize("arguments, expected", [
    (["--n-trials", "0"], "n_trials must be at least 1, got 0"),
    (["--n-trials", "1000000000"], "n_trials must be at most 100000"),
])
def test_out_of_range_counts_are_refused_before_the_study_exists(arguments, expected, synthetic_cifar, tmp_path, capsys):
    config = synthetic_study(synthetic_cifar, tmp_path)
    (tmp_path / "study.toml").write_text(dump_study_config(config))
    assert main(["run", str(tmp_path / "study.toml"), *arguments]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no study storage was created


@pytest.mark.parametrize("change, expected", [
    ({"budget": {"memory": "1e400KiB"}}, "must be a positive, finite quantity"),
    ({"budget": {"latency": "1ms"}}, "cost model 'memory' reports no 'latency_s'"),
    ({"search": {"pareto_metric": "energy"}}, "cost model 'memory' reports no 'energy'"),
])
def test_budgets_and_metrics_the_cost_model_cannot_judge_are_refused_before_any_trial(change, expected, synthetic_cifar,
                                                                                    tmp_path):
    with pytest.raises(UserError, match=expected):
        config = synthetic_study(synthetic_cifar, tmp_path, **change.get("search", {}))
        config.budget = change.get("budget", config.budget)
        run_study(validate(config))


def test_command_line_counts_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "resnet20", "--batch-size", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err
