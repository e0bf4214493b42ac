"""Optuna storage from a URL: SQLite by default, PostgreSQL to share a study between machines.

RDB storages get a heartbeat, so a trial whose worker died (kill -9, lost machine) is marked
failed when the study is next touched and retried, while every finished trial stays. Opening a new
database creates Optuna's tables; a process that opens it at the same moment (a second worker,
optuna-dashboard) races to create them too, so the loser of that race opens it again.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import NoReturn

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.exc import DatabaseError, IntegrityError

from .errors import UserError

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
MAX_RETRIES = 2
SCHEMA_RACE_ATTEMPTS = 5
IN_MEMORY = "memory"


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                 grace_seconds: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` (sqlite:///path.db, postgresql://..., or any SQLAlchemy URL; "memory":
    this process alone, gone when it ends)."""
    if url == IN_MEMORY:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            return _rdb_storage(url, heartbeat_seconds, grace_seconds)
        except DatabaseError as error:
            if attempt + 1 < SCHEMA_RACE_ATTEMPTS and _lost_schema_race(error):
                time.sleep(0.2 * (attempt + 1))  # the winner is still writing its tables
                continue
            _refuse(url, error)
        except Exception as error:  # SQLAlchemy raises many types for bad URLs and unreachable servers
            _refuse(url, error)


def _rdb_storage(url: str, heartbeat_seconds: int, grace_seconds: int) -> RDBStorage:
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and relied on here
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
        )


def _lost_schema_race(error: DatabaseError) -> bool:
    """Whether another process created Optuna's tables (or stamped their version) under our feet."""
    return isinstance(error, IntegrityError) or "already exists" in str(error)


def _refuse(url: str, error: Exception) -> NoReturn:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(f"cannot open study storage {url!r}: {first_line}") from None
