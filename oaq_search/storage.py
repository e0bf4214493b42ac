"""Optuna storage from a URL: SQLite by default, PostgreSQL to share a study between machines.

RDB storages get a heartbeat, so a trial whose worker died (kill -9, lost machine) is marked
failed when the study is next touched and retried, while every finished trial stays.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from .errors import UserError

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
MAX_RETRIES = 2


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                 grace_seconds: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` (sqlite:///path.db, postgresql://..., or any SQLAlchemy URL)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and relied on here
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            )
    except Exception as error:  # SQLAlchemy raises many types for bad URLs and unreachable servers
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot open study storage {url!r}: {first_line}") from None
