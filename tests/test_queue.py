"""The trial queue: a worker killed at any moment leaves nothing that blocks the next one."""

import time

import optuna
import pytest
from optuna.trial import TrialState

from oaq_search.queue import _claim_waiting, fill_queue, work
from oaq_search.storage import open_storage


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_worker_killed_right_after_claiming_a_trial_leaves_it_to_be_retried(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_seconds=1, grace_seconds=1)
    study = optuna.create_study(study_name="queue", storage=storage)
    fill_queue(study, storage, 2, seeds=[({"x": 3}, "seed")])
    claimed = _claim_waiting(storage, study._study_id)  # then the worker "dies": it never beats again
    time.sleep(3)  # past the grace period (SQLite's clock counts whole seconds)
    optuna.storages.fail_stale_trials(study)
    assert storage.get_trial(claimed).state == TrialState.FAIL  # stale, not blocking the queue for ever

    ran = work(study, storage, lambda trial: trial.suggest_int("x", 0, 9) ** 2)

    trials = {t._trial_id: t for t in study.get_trials()}
    assert ran == 2 and [t.state for t in trials.values()].count(TrialState.COMPLETE) == 2
    retried = [t for t in trials.values() if t.user_attrs.get("seed") == "seed" and t.state == TrialState.COMPLETE]
    assert [t.params for t in retried] == [{"x": 3}]  # the killed seed trial came back with its plan


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_an_idle_worker_says_which_trials_it_waits_on_until_they_come_back(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_seconds=1, grace_seconds=1)
    study = optuna.create_study(study_name="queue", storage=storage)
    fill_queue(study, storage, 1)
    claimed = _claim_waiting(storage, study._study_id)  # another worker holds the only trial, then dies
    waited_on = []

    ran = work(study, storage, lambda trial: trial.suggest_int("x", 0, 9), on_waiting=waited_on.append)

    assert waited_on == [[storage.get_trial(claimed).number]]  # said once, not at every poll
    assert ran == 1 and [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


class InterruptedOnce(optuna.samplers.RandomSampler):
    """Ctrl-C lands while the trial starts (the sampler's before_trial), before the objective runs."""

    def __init__(self):
        super().__init__(seed=0)
        self.interrupted = False

    def before_trial(self, study, trial):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        super().before_trial(study, trial)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_ctrl_c_as_a_trial_starts_fails_it_and_queues_it_again(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_seconds=30, grace_seconds=90)
    study = optuna.create_study(study_name="queue", storage=storage, sampler=InterruptedOnce())
    fill_queue(study, storage, 2, seeds=[({"x": 3}, "seed")])
    with pytest.raises(KeyboardInterrupt):
        work(study, storage, lambda trial: trial.suggest_int("x", 0, 9) ** 2)
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states and states.count(TrialState.FAIL) == 1  # nothing left for a grace period
    started = time.perf_counter()
    assert work(study, storage, lambda trial: trial.suggest_int("x", 0, 9) ** 2) == 2
    assert time.perf_counter() - started < 30  # the next run does not wait on the interrupted trial
    seeded = [t for t in study.get_trials() if t.user_attrs.get("seed") == "seed" and t.state == TrialState.COMPLETE]
    assert [t.params for t in seeded] == [{"x": 3}]


def test_a_rerun_with_fewer_trials_cancels_the_waiting_surplus(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="queue", storage=storage)
    fill_queue(study, storage, 6, seeds=[({"x": 3}, "seed")])
    assert fill_queue(study, storage, 2) == 0  # run again with n_trials 2: nothing added, four cancelled

    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 2 and waiting[0].user_attrs.get("seed") == "seed"  # the seed stays
    assert work(study, storage, lambda trial: trial.suggest_int("x", 0, 9)) == 2
    cancelled = study.get_trials(states=(TrialState.FAIL,))
    assert len(cancelled) == 4 and all(t.user_attrs["cancelled"] == "n_trials lowered to 2" for t in cancelled)
    assert fill_queue(study, storage, 3) == 1  # raised again: one more, the finished two kept
