"""Exactly N trials, shared by any number of workers: the study is a queue of enqueued trials.

`fill_queue` enqueues trials (seed plans first, then empty ones the sampler fills) until the study
holds N that are waiting or done, and cancels waiting ones beyond N (a rerun with fewer trials). `work` pops waiting trials one at a time, with a heartbeat, and
never creates new ones, so two workers on PostgreSQL finish exactly N. A worker killed mid-trial
stops beating; its trial goes stale, is marked failed and re-enqueued by the storage's
`RetryHeartbeatStaleTrialCallback`, and another (or the resumed) worker runs it. A trial gets its
first heartbeat before it is marked running: Optuna never fails a running trial that has none, so
a worker killed between the two would leave every later worker waiting on it for ever. Ctrl-C puts
the running trial back at once.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Callable, Mapping

import optuna
from optuna.exceptions import ExperimentalWarning, TrialPruned, UpdateFinishedTrialError
from optuna.trial import TrialState

COUNTED = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_POLL_SECONDS = 1.0


def fill_queue(study: optuna.Study, storage: optuna.storages.BaseStorage, n_trials: int,
               seeds: list[tuple[Mapping[str, int], str]] = ()) -> int:
    """Enqueue trials until `n_trials` are waiting, running or finished, seeds first; returns how many.
    Past `n_trials`, waiting trials are cancelled (failed, marked so), the newest sampled ones first."""
    present = len(study.get_trials(deepcopy=False, states=COUNTED))
    if present > n_trials:
        _cancel_waiting(study, storage, present - n_trials, n_trials)
    added = 0
    seeded = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)}
    for params, label in seeds:
        if present + added >= n_trials:
            break
        if label not in seeded:
            study.enqueue_trial(dict(params), user_attrs={"seed": label})
            added += 1
    while present + added < n_trials:
        study.enqueue_trial({})
        added += 1
    return added


def _cancel_waiting(study: optuna.Study, storage: optuna.storages.BaseStorage, count: int, n_trials: int) -> None:
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for trial in sorted(waiting, key=lambda t: ("seed" not in t.user_attrs, t.number), reverse=True)[:count]:
        storage.set_trial_user_attr(trial._trial_id, "cancelled", f"n_trials lowered to {n_trials}")
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # a worker claimed and ran it meanwhile: it counts


def work(study: optuna.Study, storage: optuna.storages.BaseStorage,
         objective: Callable[[optuna.Trial], float | tuple[float, ...]],
         on_finished: Callable[[optuna.trial.FrozenTrial], None] | None = None,
         on_waiting: Callable[[list[int]], None] | None = None) -> int:
    """Run waiting trials until none is waiting or running elsewhere; returns how many this worker ran.

    `storage` is the one `study` was opened with (Optuna keeps it private on the study).
    `on_waiting` hears the numbers of the trials running elsewhere whenever this worker, idle,
    starts waiting on a different set of them, so a waiting worker does not look hung.
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    ran = 0
    waiting_on: list[int] = []
    while True:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and relied on here
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # re-enqueues trials of dead workers
        trial_id = _claim_waiting(storage, study_id)
        if trial_id is None:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            if not running:
                return ran
            if running != waiting_on and on_waiting is not None:
                on_waiting(running)
            waiting_on = running
            time.sleep(_POLL_SECONDS)  # another worker's trial may still go stale and come back
            continue
        try:
            with _Heartbeat(storage, trial_id):
                trial = optuna.Trial(study, trial_id)  # runs the sampler's before_trial: already beating
                try:
                    values = objective(trial)
                except TrialPruned:
                    frozen = study.tell(trial, state=TrialState.PRUNED)
                except KeyboardInterrupt:
                    raise
                except Exception:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                else:
                    frozen = study.tell(trial, values)
        except KeyboardInterrupt:  # at any moment after the claim: nobody waits out a grace period for it
            _put_back(study, storage, trial_id)
            raise
        ran += 1
        if on_finished is not None:
            on_finished(frozen)


def _put_back(study: optuna.Study, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """An interrupted trial marked failed and queued again with what it was given (a seed's parameters)."""
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return  # finished (told) before the interrupt landed
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={**trial.user_attrs, "retry_of": trial.number})


def _claim_waiting(storage: optuna.storages.BaseStorage, study_id: int) -> int | None:
    """Marks a waiting trial running, its heartbeat recorded first; returns its id, None if none waits."""
    beating = _heartbeat_interval(storage) is not None
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if beating:  # harmless if another worker claims it: the heartbeat only counts while running
                storage.record_heartbeat(trial._trial_id)
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                return trial._trial_id
        except UpdateFinishedTrialError:
            continue
    return None


class _Heartbeat:
    """Records the trial's heartbeat in a background thread while the objective runs."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = _heartbeat_interval(storage)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def _beat(self):
        while not self.stopped.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


def _heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    return storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
