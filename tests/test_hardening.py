"""Hostile input: data files that try to run code, plans for another model, impossible target numbers,
a resumed study whose settings changed."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from hwmodels import CostReport, MemoryModel, load_target
from hwmodels.target import TARGETS_DIR
from oaq_search.checkpoints import load_checkpoint
from oaq_search.cli import main
from oaq_search.config import dump_study_config, load_study_config, validate
from oaq_search.data import BATCH_FOLDER, TEST_FILE, load_cifar10
from oaq_search.errors import UserError
from oaq_search.finetuning import _saved_state
from oaq_search.pipeline import layer_graph, load_model, run_study
from oaq_search.plan import LayerPlan, Plan
from oaq_search.planning import PlanFactory

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


def test_the_readmes_plug_in_example_runs_a_study_to_its_summary(synthetic_cifar, tmp_path, monkeypatch, capsys):
    """The README's cost model, verbatim: it reports latency only, and `run` must still end in its summary."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Adding a hardware target"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    (tmp_path / "readme_npu.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = synthetic_study(synthetic_cifar, tmp_path, n_trials=2, cost_model="readme_npu:MyAccelerator")
    config.budget = {"latency": "1ms"}
    (tmp_path / "study.toml").write_text(dump_study_config(config))
    assert main(["run", str(tmp_path / "study.toml")]) == 0
    summary = capsys.readouterr().out
    assert "costs latency_s " in summary and "budget: latency_s <= 1.000 ms" in summary


def test_study_and_plan_paths_that_are_folders_binary_or_absurd_are_one_line(tmp_path, capsys):
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 4)
    for path in (tmp_path, tmp_path / "binary.toml"):
        assert main(["run", str(path)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and ("is a folder" in error or "is not text" in error), error
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nested too deeply"):
        Plan.load(tmp_path / "deep.json")
    plan = json.loads(Plan("resnet20", [LayerPlan("conv1", 4, threshold=2.0)]).to_json())
    plan["layers"][0]["threshold"] = float("inf")
    (tmp_path / "infinite.json").write_text(json.dumps(plan))  # json writes Infinity, which json reads back
    with pytest.raises(UserError, match="must be positive and finite, got inf"):
        Plan.load(tmp_path / "infinite.json")


def test_output_paths_that_cannot_be_written_are_refused_before_the_work(synthetic_cifar, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("")
    for command, what in ((["quantize", "--model", "resnet20", "--data-root", str(synthetic_cifar), "--out",
                            str(tmp_path / "taken")], "packed model"),
                          (["hw", "measure", "--model", "resnet20", "--out", str(tmp_path / "taken")], "target table"),
                          (["finetune", "--plan", "missing.json", "--out", str(tmp_path / "a-file" / "run")],
                           "fine-tune output"),
                          (["export", "missing.toml", "--out", str(tmp_path / "taken")], "exported plan")):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert what in error and error.count("\n") == 1, error
    assert not list((tmp_path / "taken").iterdir())


def test_a_malicious_finetune_state_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "state.pt").write_bytes(pickle.dumps(PlantedCommand(marker)))
    with pytest.raises(UserError, match="fine-tune state .*state.pt cannot be read"):
        _saved_state(tmp_path / "state.pt", "fingerprint")
    assert not marker.exists()


def test_fuzzed_checkpoints_plans_and_study_files_end_in_user_errors_only(tmp_path):
    """A few hundred damaged files through the loaders: each loads or is refused with a UserError."""
    rng = random.Random(0)
    model = load_model("resnet20")
    torch.save(model.state_dict(), tmp_path / "good.pt")
    good = {"checkpoint": (tmp_path / "good.pt").read_bytes(),
            "plan": PlanFactory("resnet20", model, layer_graph("resnet20", model)).uniform(4).to_json().encode(),
            "study": (Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml").read_bytes()}
    loaders = {"checkpoint": lambda path: load_checkpoint(load_model("resnet20"), path), "plan": Plan.load,
               "study": load_study_config}
    suffix = {"checkpoint": ".pt", "plan": ".json", "study": ".toml"}
    for kind, data in good.items():
        for case in range(150 if kind != "checkpoint" else 60):
            damaged = bytearray(data)
            if case % 3 == 0:
                damaged = damaged[:rng.randrange(len(damaged))]  # truncated
            else:
                for _ in range(rng.randint(1, 8)):  # a few bytes changed
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path = tmp_path / f"{kind}{case}{suffix[kind]}"
            path.write_bytes(bytes(damaged))
            try:
                loaders[kind](path)
            except UserError:
                pass


class TotalsOnly(MemoryModel):
    """A plug-in that reports totals alone, no per-layer costs."""

    name = "totals-only"

    def evaluate(self, graph, plan):
        return CostReport(super().evaluate(graph, plan).totals, {})


def test_a_cost_model_without_per_layer_costs_is_searched_by_measuring_whole_plans(synthetic_cifar, tmp_path):
    config = synthetic_study(synthetic_cifar, tmp_path, n_trials=3, cost_model=TotalsOnly())
    config.budget = {"memory": "120KiB"}
    result = run_study(config)
    assert result.plan.totals["weight_bytes"] <= 120 * 1024 and result.finished_trials == 3
