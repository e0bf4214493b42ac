"""oaq-search as a separate process, for tests that kill it: start, wait, kill after some trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState


def oaq_process(*args, **kwargs) -> subprocess.Popen:
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


def kill_after_trials(process: subprocess.Popen, study_name: str, storage: str, count: int,
                      timeout: float = 240) -> dict[int, FrozenTrial]:
    """SIGKILL `process` once its study holds `count` finished trials; returns those, by number."""
    deadline, done = time.time() + timeout, []
    while time.time() < deadline and len(done) < count:
        time.sleep(0.5)
        if process.poll() is not None:
            pytest.fail(f"the process exited ({process.returncode}) before it was killed; it printed:\n"
                        f"{process.communicate()[0]}")
        try:
            done = [t for t in optuna.load_study(study_name=study_name, storage=storage).trials
                    if t.state == TrialState.COMPLETE]
        except Exception:  # the study does not exist yet
            continue
    os.kill(process.pid, signal.SIGKILL)
    assert len(done) >= count, f"fewer than {count} trials finished in time; it printed:\n{process.communicate()[0]}"
    process.wait()
    return {t.number: t for t in done}
