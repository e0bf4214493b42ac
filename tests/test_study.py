"""End to end on the real ResNet-20 and CIFAR-10: search, plan, resume, refusal of a changed study."""

import json

import optuna
import pytest

from oaq_search.errors import UserError
from oaq_search.pipeline import run_study
from oaq_search.plan import Plan

pytestmark = pytest.mark.shared


@pytest.fixture
def config(quick_study):
    return quick_study


def test_quickstart_writes_a_plan_that_fits_and_resumes(config):
    config.finetune.mode, config.finetune.images_per_epoch, config.finetune.epochs = "scale", 64, 1
    result = run_study(config, progress=False)
    plan = Plan.load(result.plan_path)
    assert plan.totals["weight_bytes"] <= 104 * 1024
    assert plan.layer("conv1").weight_bits == 8 and plan.layer("linear").weight_bits == 8
    assert plan.metadata["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert 10 < result.test_accuracy <= result.fp_test_accuracy
    assert json.loads(result.plan_path.read_text())["schema_version"] == 1
    tuned = Plan.load(result.finetuned.files["plan"])  # the run ends with the fine-tuned plan and files
    assert [layer.weight_bits for layer in tuned.layers] == [layer.weight_bits for layer in plan.layers]
    assert tuned.metadata["finetune"]["test_accuracy"] == pytest.approx(result.finetuned.scores["test_accuracy"])
    assert result.finetuned.files["packed"].is_file() and "finetune" in result.seconds

    before = optuna.load_study(study_name=config.name, storage=config.storage_url).trials
    config.search.n_trials = 5
    resumed = run_study(config, progress=False)
    after = optuna.load_study(study_name=config.name, storage=config.storage_url).trials
    assert resumed.finished_trials == 5
    assert [t.params for t in after[:3]] == [t.params for t in before]
    assert after[3].params != before[1].params  # the resumed sampler does not replay old samples


def test_resume_with_a_changed_budget_is_refused(config):
    run_study(config, progress=False)
    config.budget = {"memory": "120KiB"}
    with pytest.raises(UserError, match="different budget"):
        run_study(config, progress=False)


def test_infeasible_budget_stops_before_searching(config):
    config.budget = {"memory": "20KiB"}
    with pytest.raises(UserError, match=r"infeasible: the smallest plan .* needs 6\d\.\d KiB"):
        run_study(config, progress=False)
