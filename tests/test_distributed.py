"""Many workers on one study through PostgreSQL, and a worker killed with SIGKILL, resumed.

Uses the real ResNet-20 and CIFAR-10 (scoring few images per trial) and a real PostgreSQL server
on 127.0.0.1, which .ci/run starts and names in OAQ_TEST_POSTGRES_URL.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from oaq_search.config import dump_study_config

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


def oaq(*args, **kwargs):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "oaq_search", *args], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """The process's output once it exits; past `timeout` it is killed and the test fails showing it."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{' '.join(process.args[2:])} ran past {timeout} s; it printed:\n{process.communicate()[0]}")


def test_two_workers_finish_exactly_the_requested_trials(quick_study, tmp_path, postgres_url):
    path, config = study_file(quick_study, tmp_path, n_trials=10, eval_images=200, storage=postgres_url)
    created = oaq("create", str(path))
    assert created.wait(timeout=120) == 0, created.stdout.read()
    workers = [oaq("worker", str(path), "--worker-index", str(i)) for i in (1, 2)]
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
    worker = oaq("run", str(path))
    storage = config.storage_url
    deadline = time.time() + 240
    done = []
    while time.time() < deadline and len(done) < 3:
        time.sleep(0.5)
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) before it was killed; it printed:\n"
                        f"{worker.communicate()[0]}")
        try:
            done = [t for t in optuna.load_study(study_name=config.name, storage=storage).trials
                    if t.state == TrialState.COMPLETE]
        except Exception:  # the study does not exist yet
            continue
    os.kill(worker.pid, signal.SIGKILL)
    assert len(done) >= 3, f"the worker finished fewer than 3 trials in time; it printed:\n{worker.communicate()[0]}"
    worker.wait()
    before = {t.number: (t.params, t.value) for t in optuna.load_study(study_name=config.name, storage=storage).trials
              if t.state == TrialState.COMPLETE}

    resumed = oaq("run", str(path))
    output = finish(resumed, timeout=300)
    assert resumed.returncode == 0, output
    trials = optuna.load_study(study_name=config.name, storage=storage).trials
    after = {t.number: (t.params, t.value) for t in trials if t.state == TrialState.COMPLETE}
    assert all(after[number] == before[number] for number in before)  # every finished trial survived intact
    assert len(after) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
