"""Study storage: Optuna's own `RDBStorage` on a SQLAlchemy URL, and the rules for riding out faults.

tuner does not change how Optuna stores a study. `open_storage` returns a plain
`optuna.storages.RDBStorage`, configured for the backend: SQLite gets a busy timeout (and, for the
storages that run trials, write-ahead logging with `synchronous=NORMAL`), PostgreSQL and MySQL get
`pool_pre_ping`, so a connection that a restarted server dropped is replaced before it is used.
Optuna's storage conformance tests run against exactly this object (tests/test_storage_conformance.py).

Riding out a database outage is the worker's job: every step of its loop goes through `retrying`,
which retries transient errors (a dropped connection, a restarting server, deadlocks, serialization
failures, statement timeouts, SQLite's "database is locked") with bounded exponential backoff, and
gives up after `retry_seconds` with one line (StorageError, exit 1). Each retried step is safe to
repeat: reports and attrs are upserts, and the steps that are not (creating and claiming trials)
run under the budget gate, which re-reads the study before it tries again (see gate.py, worker.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tuner.errors import ConfigError, StorageError, StudyNotFoundError, redact

DEFAULT_STORAGE = "sqlite:///tuner.db"
DEFAULT_RETRY_SECONDS = 60.0
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for the lock before "database is locked"
DIALECTS = ("sqlite", "postgresql", "mysql")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# URLs: parsed once
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageURL:
    """A checked storage URL. `url` holds the password; only `shown` may be printed."""

    url: str
    backend: str  # sqlite | postgresql | mysql
    sqlite_file: Path | None  # the database file of a file-backed SQLite URL

    @classmethod
    def parse(cls, url: str | StorageURL) -> StorageURL:
        """Parse and check the scheme; a bad one is a usage error (exit 2)."""
        if isinstance(url, StorageURL):
            return url
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise ConfigError(f"storage URL {redact(url)!r} is not a SQLAlchemy URL "
                              "(e.g. sqlite:///tuner.db or postgresql+psycopg://user@host/db)") from None
        backend = parsed.get_backend_name()
        if backend not in DIALECTS:
            raise ConfigError(f"storage URL scheme {parsed.drivername!r} is not supported "
                              f"(valid: {', '.join(DIALECTS)}, e.g. sqlite:///tuner.db, postgresql+psycopg://...)")
        db = parsed.database
        sqlite_file = Path(db) if backend == "sqlite" and db not in (None, "", ":memory:") else None
        if backend == "sqlite" and sqlite_file is None:
            raise ConfigError(f"storage URL {redact(url)!r} is an in-memory SQLite database: every open (each "
                              "command, worker and check) gets a new, empty one; use a file, e.g. sqlite:///tuner.db")
        return cls(url=url, backend=backend, sqlite_file=sqlite_file)

    @property
    def shown(self) -> str:
        """The URL as it may be shown: password replaced by ***."""
        return display(self.url)

    def with_password(self, password: str) -> StorageURL:
        if self.backend == "sqlite" or not password:
            return self
        return StorageURL.parse(make_url(self.url).set(password=password).render_as_string(hide_password=False))

    def engine_kwargs(self) -> dict[str, Any]:
        if self.backend == "sqlite":
            return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
        return {"pool_pre_ping": True}

    def __str__(self) -> str:  # never the password
        return self.shown


def display(url: str | StorageURL) -> str:
    """A URL as it may be shown: password replaced by ***."""
    if isinstance(url, StorageURL):
        url = url.url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return redact(url)


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------

_ENGINES: weakref.WeakSet[sa.engine.Engine] = weakref.WeakSet()  # of the storages opened here
# URLs whose schema this process has checked once: Optuna's compatibility check (alembic's migration
# scripts read from disk, ~20 ms) gives the same answer for every later open by the same Optuna
_CHECKED: set[str] = set()


def close_all() -> None:
    """Close the pooled connections of every storage this process opened (before a fast exit:
    closing the last connection is what folds a SQLite write-ahead log back into the database)."""
    for engine in list(_ENGINES):
        with contextlib.suppress(Exception):
            engine.dispose()


def open_storage(url: str | StorageURL, *, must_exist: bool = False, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, wal: bool = False) -> Any:
    """Optuna's `RDBStorage` for `url`. With `must_exist`, a missing SQLite file is an error, not
    created. Opening fails at once if the database is unreachable (exit 1). `heartbeat_interval`
    turns Optuna's heartbeats on (workers); `wal` puts a SQLite database in write-ahead-log mode."""
    target = StorageURL.parse(url)
    if must_exist and target.sqlite_file is not None and not target.sqlite_file.exists():
        raise StudyNotFoundError(f"no study database at {target.sqlite_file} (pass --storage or set TUNER_STORAGE)")
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
    if target.url in _CHECKED:
        kwargs["skip_compatibility_check"] = True  # a public RDBStorage argument
    try:
        storage = _create(target, kwargs)
    except ModuleNotFoundError as exc:
        raise StorageError(f"storage {target.shown}: driver {exc.name!r} is not installed "
                           "(pip install 'tuner[postgres]' for PostgreSQL)") from None
    except Exception as exc:  # noqa: BLE001 - OperationalError and friends: unreachable or refused
        what = "is unreachable" if is_transient(exc) else "could not be opened"  # a schema or permission problem
        raise StorageError(f"storage {target.shown} {what}: {reason(exc)}") from None
    _CHECKED.add(target.url)
    if wal and target.sqlite_file is not None:
        sa.event.listen(storage.engine, "connect", _wal_pragmas)
        storage.engine.dispose()  # the connections that created the tables predate the listener
    _ENGINES.add(storage.engine)
    return storage


SCHEMA_RACE = ("already exists", "duplicate key", "unique constraint failed")  # two creators of one schema


def _create(target: StorageURL, kwargs: dict[str, Any]) -> Any:
    """`RDBStorage(...)` under the schema lock. Processes that do not take the lock (plain Optuna,
    optuna-dashboard) can still race on a fresh database's tables: a failure that reads like that
    race is tried again, a few times, once the other creator has had time to finish."""
    for attempt in range(4):
        try:
            with warnings.catch_warnings(), schema_lock(target):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(target.url, engine_kwargs=target.engine_kwargs(), **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            if attempt == 3 or not any(m in str(exc).lower() for m in SCHEMA_RACE):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")  # the loop returns or raises


SCHEMA_LOCK = (0x74756E65, 0)  # PostgreSQL advisory lock keys: 'tune', 0 (the gate uses 'tune', study id >= 1)


@contextlib.contextmanager
def schema_lock(target: StorageURL) -> Iterator[None]:
    """Serialize Optuna's table creation (`RDBStorage(...)` on a fresh database) across processes and
    hosts: processes started together on an empty database otherwise race on `CREATE TABLE` and
    the schema's version row (SQLite: "table studies already exists"; PostgreSQL: a duplicate key in
    pg_type). SQLite: `flock` on the database's folder (no new file beside the database); PostgreSQL:
    an advisory lock; MySQL: GET_LOCK. Each dies with its process or connection. A database that
    cannot be reached raises here, as opening it would."""
    if target.backend == "sqlite":
        folder = (target.sqlite_file.parent if target.sqlite_file is not None else None)
        if folder is None or not folder.is_dir():
            yield  # in memory, or a folder that does not exist (RDBStorage reports that)
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
        return
    engine = sa.create_engine(target.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if target.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_lock(:a, :b)"), {"a": SCHEMA_LOCK[0], "b": SCHEMA_LOCK[1]})
            else:
                conn.execute(sa.text("SELECT GET_LOCK('tuner-schema', -1)"))
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a dead connection has released it already
                    if target.backend == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"),
                                     {"a": SCHEMA_LOCK[0], "b": SCHEMA_LOCK[1]})
                    else:
                        conn.execute(sa.text("SELECT RELEASE_LOCK('tuner-schema')"))
    finally:
        engine.dispose()


def _wal_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def study_names(storage: Any) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def require_study(storage: Any, name: str) -> int:
    """The study id, or a StudyNotFoundError that lists the studies there are."""
    try:
        return int(storage.get_study_id_from_name(name))
    except KeyError:
        names = study_names(storage)
        known = f" (studies here: {', '.join(names)})" if names else " (the storage has no studies)"
        raise StudyNotFoundError(f"study {name!r} not found{known}") from None


# ---------------------------------------------------------------------------------------------
# Transient errors and the retry loop
# ---------------------------------------------------------------------------------------------

# 40001 serialization, 40P01 deadlock, 57P01-03 shutdown/crash/starting up, 53300 too many
# connections, 55P03 lock not available, 57014 statement timeout (query_canceled)
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03", "57014"}
_PERMANENT_SQLSTATE_CLASSES = {"22", "23", "28", "3D", "42"}  # data, integrity, auth, no such db, syntax
_MYSQL_TRANSIENT = {1205, 1213, 2003, 2006, 2013, 2055, 3024}
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "database table is locked")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "orig", None), e.__context__, e.__cause__])


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: lost connections, server restarts, deadlocks, statement
    timeouts, a busy SQLite database."""
    for e in _chain(exc):
        if isinstance(e, (sa.exc.TimeoutError, sa.exc.DisconnectionError)):
            return True
        if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
            return True
        code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(code, str) and code:
            if code in _TRANSIENT_SQLSTATES or code.startswith("08"):
                return True
            if code[:2] in _PERMANENT_SQLSTATE_CLASSES:
                return False
        text = str(e).lower()
        if any(m in text for m in _SQLITE_TRANSIENT):
            return True
        kind = type(e)
        if kind.__module__.startswith("psycopg") and kind.__name__ in ("OperationalError", "InterfaceError"):
            return not code  # connection refused / closed: no SQLSTATE
        if kind.__module__.startswith("pymysql") and kind.__name__ == "OperationalError":
            return bool(e.args) and e.args[0] in _MYSQL_TRANSIENT
    return False


def reason(exc: BaseException) -> str:
    """The driver's first line for a database error, password redacted."""
    for e in _chain(exc):
        if type(e).__module__.startswith(("psycopg", "sqlite3", "pymysql", "MySQLdb")):
            exc = e
            break
    text = redact(str(getattr(exc, "orig", None) or exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Retry:
    """Runs steps against one storage, retrying transient errors for at most `seconds` per step.

    `step(fn, recover=...)`: after a failed attempt, `recover()` runs first (e.g. re-acquire a lock,
    re-read the study) before `fn` is tried again. Past the bound it raises StorageError naming
    the storage (password redacted)."""

    def __init__(self, shown: str, seconds: float = DEFAULT_RETRY_SECONDS,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        self.shown = shown
        self.seconds = float(seconds)
        self.sleep = sleep

    def __call__(self, fn: Callable[[], T], recover: Callable[[], Any] | None = None) -> T:
        deadline: float | None = None
        attempt = 0
        while True:
            try:
                if attempt and recover is not None:
                    recover()
                return fn()
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.seconds
                if now >= deadline:
                    raise StorageError(f"storage {self.shown}: the database was unreachable for "
                                       f"{self.seconds:g} s, giving up ({reason(exc)})") from None
                delay = min(5.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
                self.sleep(max(0.0, min(delay, deadline - now)))
                attempt += 1

    def once(self, fn: Callable[[], T]) -> T | None:
        """A best-effort step (while aborting): one attempt, errors swallowed."""
        try:
            return fn()
        except Exception:  # noqa: BLE001
            return None
