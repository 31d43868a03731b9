"""Study storage: a SQLAlchemy URL used through Optuna's RDBStorage, made to survive database faults.

Precedence: the `--storage` flag, then env `TUNER_STORAGE`, then the study file, then
`sqlite:///tuner.db` in the working directory. With env `TUNER_STORAGE_PASSWORD_FILE` (a Docker
secret) the password is read from that file into the URL. SQLite gets a busy timeout so a few local
workers can share it; PostgreSQL gets `pool_pre_ping`. Passwords never leave this module unredacted.

The retrying storage itself is in `resilient.py`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError, StorageError, StudyNotFoundError, redact

if TYPE_CHECKING:
    from .resilient import ResilientRDBStorage
DEFAULT_STORAGE = "sqlite:///tuner.db"
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for the lock before "database is locked"
DIALECTS = ("sqlite", "postgresql", "mysql")
# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------

def resolve_url(flag: str | None, from_file: str | None = None) -> str:
    """The storage URL by precedence: flag, env TUNER_STORAGE, study file, default."""
    url = flag or os.environ.get("TUNER_STORAGE") or from_file or DEFAULT_STORAGE
    secret = os.environ.get("TUNER_STORAGE_PASSWORD_FILE")
    if secret:
        url = _with_password(url, secret)
    return url


def _with_password(url: str, secret: str) -> str:
    try:
        password = Path(secret).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the storage password file: {exc.strerror or exc}",
                          key="TUNER_STORAGE_PASSWORD_FILE") from None
    parsed = check_url(url)
    if parsed.get_backend_name() == "sqlite" or not password:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


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


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------

_ENGINES: "weakref.WeakSet[sa.engine.Engine]" = weakref.WeakSet()  # of the storages opened here


def close_all() -> None:
    """Close the pooled connections of every storage this process opened (before a fast exit:
    closing the last connection is what folds a SQLite write-ahead log back into the database)."""
    for engine in list(_ENGINES):
        with contextlib.suppress(Exception):
            engine.dispose()


def open_storage(url: str, *, must_exist: bool = False, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, max_retry: int | None = None,
                 cap_key: str | None = None, cap_default: int | None = None,
                 wal: bool = False) -> "ResilientRDBStorage":
    """A storage for `url`. With `must_exist`, a missing SQLite file is an error, not created.
    Opening fails at once if the database is unreachable (exit 1); later operations retry.
    `wal`: a SQLite database is put in write-ahead-log mode (for the storages that run trials)."""
    check_url(url)
    from .resilient import ResilientRDBStorage, retry_seconds

    bound = retry_seconds()
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise StudyNotFoundError(f"no study database at {path} (pass --storage or set TUNER_STORAGE)")
    kwargs: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat_interval:
                from .faults import ResumeRetryCallback

                kwargs["heartbeat_interval"] = heartbeat_interval
                kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
                kwargs["heartbeat_stale_trial_callback"] = ResumeRetryCallback(max_retry=max_retry)
            storage = ResilientRDBStorage(url, retry_for=bound, cap_key=cap_key, cap_default=cap_default, wal=wal,
                                          engine_kwargs=engine_kwargs(url), **kwargs)
            _ENGINES.add(storage.engine)
            return storage
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
