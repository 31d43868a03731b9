"""Study storage: a SQLAlchemy URL used through Optuna's RDBStorage.

Precedence: the `--storage` flag, then env `TUNER_STORAGE`, then the study file, then
`sqlite:///tuner.db` in the working directory. SQLite gets a busy timeout so a few local workers
can share it; PostgreSQL gets `pool_pre_ping`. Passwords never leave this module unredacted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError, StorageError, StudyNotFoundError, redact

DEFAULT_STORAGE = "sqlite:///tuner.db"
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for the lock before "database is locked"
DIALECTS = ("sqlite", "postgresql", "mysql")


def resolve_url(flag: str | None, from_file: str | None = None) -> str:
    """The storage URL by precedence: flag, env TUNER_STORAGE, study file, default."""
    return flag or os.environ.get("TUNER_STORAGE") or from_file or DEFAULT_STORAGE


def check_url(url: str) -> sa.engine.URL:
    """Parse and check the scheme; a bad one is a usage error (exit 2)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"storage URL {redact(url)!r} is not a SQLAlchemy URL "
                          "(e.g. sqlite:///tuner.db or postgresql+psycopg://user@host/db)") from None
    if parsed.get_backend_name() not in DIALECTS:
        raise ConfigError(f"storage URL scheme {parsed.drivername!r} is not supported "
                          f"(valid: {', '.join(DIALECTS)}, e.g. sqlite:///tuner.db, postgresql+psycopg://...)")
    return parsed


def display(url: str) -> str:
    """The URL as it may be shown: password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return redact(url)


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    return {"pool_pre_ping": True}


def open_storage(url: str, *, must_exist: bool = False, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, max_retry: int | None = None) -> optuna.storages.RDBStorage:
    """An RDBStorage for `url`. With `must_exist`, a missing SQLite file is an error, not created."""
    check_url(url)
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise StudyNotFoundError(f"no study database at {path} (pass --storage or set TUNER_STORAGE)")
    kwargs: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat_interval:
                kwargs["heartbeat_interval"] = heartbeat_interval
                kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
                kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
    except ModuleNotFoundError as exc:
        raise StorageError(f"storage {display(url)}: driver {exc.name!r} is not installed "
                           "(pip install 'tuner[postgres]' for PostgreSQL)") from None
    except Exception as exc:  # noqa: BLE001 - OperationalError and friends: unreachable or refused
        raise StorageError(f"storage {display(url)} is unreachable: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = redact(str(getattr(exc, "orig", None) or exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def require_study(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The study id, or a StudyNotFoundError that lists the studies there are."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        names = study_names(storage)
        known = f" (studies here: {', '.join(names)})" if names else " (the storage has no studies)"
        raise StudyNotFoundError(f"study {name!r} not found{known}") from None


# ---------------------------------------------------------------------------------------------
# A cross-process lock per study, for the n_trials cap shared by workers
# ---------------------------------------------------------------------------------------------

_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, url: str, study_name: str) -> Iterator[None]:
    """Mutual exclusion across worker processes (and machines, on PostgreSQL/MySQL).

    PostgreSQL: a session advisory lock; MySQL: GET_LOCK; SQLite: flock on `<db>.lock` beside
    the database file. A killed worker's lock dies with its connection or file descriptor.
    """
    backend = make_url(url).get_backend_name()
    key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
    with _THREAD_LOCK:
        if backend == "postgresql":
            with storage.engine.connect() as conn:
                conn.execute(sa.text("select pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sa.text("select pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        elif backend == "mysql":
            with storage.engine.connect() as conn:
                conn.execute(sa.text("select get_lock(:k, 120)"), {"k": f"tuner-{key}"})
                try:
                    yield
                finally:
                    conn.execute(sa.text("select release_lock(:k)"), {"k": f"tuner-{key}"})
        else:
            path = sqlite_path(url)
            if path is None:
                yield
                return
            with open(f"{path}.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
