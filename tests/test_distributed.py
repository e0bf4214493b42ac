"""Many workers on one study through PostgreSQL, and a worker killed with SIGKILL, resumed.

Uses the real ResNet-20 and CIFAR-10 (scoring few images per trial) and a real PostgreSQL server
on 127.0.0.1, which .ci/run starts and names in OAQ_TEST_POSTGRES_URL.
"""

import os
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from oaq_search.config import dump_study_config

from processes import finish, kill_after_trials, oaq_process

pytestmark = pytest.mark.shared


@pytest.fixture
def postgres_url():
    url = os.environ.get("OAQ_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("OAQ_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip("no PostgreSQL: set OAQ_TEST_POSTGRES_URL (see .ci/postgres.sh)")
    return url


def study_file(quick_study, tmp_path, n_trials, eval_images, storage=None):
    """The quick study (no fine-tune, no measured sensitivity, one finalist: these tests are about the
    study) under a fresh name, with fast heartbeats, written to a study file the workers read."""
    config = quick_study
    config.name = f"t{uuid.uuid4().hex[:8]}"
    config.storage = storage
    config.search.n_trials = n_trials
    config.search.eval_images = eval_images
    config.search.heartbeat_seconds, config.search.grace_seconds = 1, 3
    path = tmp_path / "study.toml"
    path.write_text(dump_study_config(config))
    return path, config


def test_two_workers_finish_exactly_the_requested_trials(quick_study, tmp_path, postgres_url):
    path, config = study_file(quick_study, tmp_path, n_trials=10, eval_images=200, storage=postgres_url)
    created = oaq_process("create", str(path))
    assert created.wait(timeout=120) == 0, created.stdout.read()
    workers = [oaq_process("worker", str(path), "--worker-index", str(i)) for i in (1, 2)]
    outputs = [finish(w, timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = optuna.load_study(study_name=config.name, storage=postgres_url).trials
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)
    ran = [int(out.rsplit("ran ", 1)[1].split()[0]) for out in outputs]
    assert sum(ran) == 10 and min(ran) > 0, outputs  # both workers took part
    seeds = {t.user_attrs.get("seed") for t in trials} - {None}
    assert seeds == {"integer_program", "greedy", "uniform"}


def test_killed_worker_loses_no_finished_trial_and_the_study_resumes(quick_study, tmp_path):
    path, config = study_file(quick_study, tmp_path, n_trials=8, eval_images=1000)
    storage = config.storage_url
    kill_after_trials(oaq_process("run", str(path)), config.name, storage, 3)
    before = {t.number: (t.params, t.value) for t in optuna.load_study(study_name=config.name, storage=storage).trials
              if t.state == TrialState.COMPLETE}

    resumed = oaq_process("run", str(path))
    output = finish(resumed, timeout=300)
    assert resumed.returncode == 0, output
    trials = optuna.load_study(study_name=config.name, storage=storage).trials
    after = {t.number: (t.params, t.value) for t in trials if t.state == TrialState.COMPLETE}
    assert all(after[number] == before[number] for number in before)  # every finished trial survived intact
    assert len(after) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
