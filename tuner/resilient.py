"""`ResilientRDBStorage` retries every storage operation on transient errors (a dropped connection,
a restarting server, deadlock 40P01, serialization failure 40001, SQLite "database is locked") with
bounded exponential backoff: env `TUNER_DB_RETRY_SECONDS` (default 60) per operation. Past the
bound it gives up for good (StorageError, exit 1), and later calls fail at once.

Operations that are not idempotent are made safe to retry:
- creating a trial writes a random token with the trial in the same transaction; after a failure
  the retry first looks for the token, so a commit whose reply was lost is not done twice;
- claiming a WAITING trial is one conditional UPDATE (`... where state = 'WAITING'`) that also
  writes a claim token, so two workers never run the same queued trial and a lost reply is found;
- the trial budget (`n_trials` across all workers) is checked inside the transaction that creates
  the trial, under a row lock on the study (PostgreSQL/MySQL) or a file lock (SQLite);
- a retry copy of a failed trial is created at most once per failed trial (same transaction).

SQLite, for the storages that run trials (`wal=True`): the database is switched to write-ahead
logging with `synchronous=NORMAL` (env TUNER_SQLITE_WAL=0 keeps the rollback journal). A commit
then costs an append instead of several fsyncs, which halves the storage time of a trial; readers
(the dashboard, reports) no longer block the workers; a killed process loses nothing it committed.
WAL needs a local file system (not NFS), and a copy of the database taken while a sweep runs must
include the `-wal` file.

Stale trials: Optuna fails RUNNING trials whose heartbeat is older than the grace period, but
skips trials that never wrote a heartbeat (killed right after `ask`). Here those count as stale
too once `datetime_start` is older than the grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import optuna
import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from .errors import ConfigError, StorageError, redact
from .storage import display, sqlite_path
DEFAULT_RETRY_SECONDS = 60.0

CAP_ATTR = "tuner_n_trials"  # study user attr: the trial budget workers follow
TOKEN_ATTR = "tuner_create_token"  # trial system attr: makes trial creation safe to retry
CLAIM_ATTR = "tuner_claim"  # trial system attr: makes claiming a WAITING trial safe to retry
INTERRUPTED_ATTR = "tuner_interrupted"  # trial system attr: numbers in the lineage stopped by a signal

_log = logging.getLogger("tuner.resilient")


class NoMoreTrials(Exception):
    """The study's trial budget is used up: the worker stops asking."""


class DuplicateRetry(Exception):
    """A retry copy of this failed trial exists already."""


def retry_seconds() -> float:
    """The bound on retrying one storage operation: env TUNER_DB_RETRY_SECONDS (default 60)."""
    raw = os.environ.get("TUNER_DB_RETRY_SECONDS")
    if raw is None or raw.strip() == "":
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"must be a number of seconds >= 0, got {raw!r}", key="TUNER_DB_RETRY_SECONDS")
    return value


# ---------------------------------------------------------------------------------------------
# Transient errors
# ---------------------------------------------------------------------------------------------

_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03"}
_PERMANENT_SQLSTATE_CLASSES = {"22", "23", "28", "3D", "42"}  # data, integrity, auth, no such db, syntax
_MYSQL_TRANSIENT = {1205, 1213, 2003, 2006, 2013, 2055}
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
    """True for errors a retry can cure: lost connections, server restarts, deadlocks, busy SQLite."""
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


def _reason(exc: BaseException) -> str:
    for e in _chain(exc):
        if type(e).__module__.startswith(("psycopg", "sqlite3", "pymysql", "MySQLdb")):
            exc = e
            break
    text = redact(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The storage
# ---------------------------------------------------------------------------------------------

# Public and internal methods Optuna's Study and _CachedStorage call. The outermost call retries.
# Not here (they retry in their own way): create_new_trial/_create_new_trial, set_trial_state_values,
# create_new_study, record_heartbeat.
_RETRIED = (
    "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
    "set_trial_param", "_set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
    "get_best_trial", "_get_best_trial_id", "_get_stale_trial_ids",
)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose operations survive database restarts; see the module docstring."""

    def __init__(self, url: str, *, retry_for: float | None = None, cap_key: str | None = None,
                 cap_default: int | None = None, wal: bool = False, **kwargs: Any) -> None:
        self._tls = threading.local()
        self._wal = wal
        self._retry_for = retry_seconds() if retry_for is None else retry_for
        self._dead: str | None = None  # set once an operation gave up: later calls fail at once
        self._shown = display(url)
        self.cap_key = cap_key
        self.cap_default = cap_default
        self._sqlite = sqlite_path(url)
        super().__init__(url, **kwargs)
        self._tune_sqlite()

    def _tune_sqlite(self) -> None:
        if self._sqlite is None or not self._wal or os.environ.get("TUNER_SQLITE_WAL", "1").strip() == "0":
            return
        sa.event.listen(self.engine, "connect", _wal_pragmas)
        self.engine.dispose()  # the connections that created the tables predate the listener

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_tls", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._tls = threading.local()
        self._tune_sqlite()

    # -- the retry loop --------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], Any], recover: Callable[[BaseException], Any] | None = None) -> Any:
        """Run `fn`, retrying transient errors with backoff until the bound. After a failed
        attempt, `recover(exc)` (when given) may return a result the failed attempt committed."""
        if getattr(self._tls, "depth", 0):
            return fn()
        self._tls.depth = 1
        try:
            deadline: float | None = None
            attempt = 0
            failed: BaseException | None = None
            while True:
                if self._dead is not None:
                    raise StorageError(self._dead)
                try:
                    if failed is not None and recover is not None:
                        found = recover(failed)
                        if found is not None:
                            return found
                    return fn()
                except Exception as exc:  # noqa: BLE001
                    if not is_transient(exc):
                        raise
                    failed = exc
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self._retry_for
                        _log.info("storage %s: %s; retrying for up to %.0f s", self._shown, _reason(exc),
                                  self._retry_for)
                    if now >= deadline:
                        self._dead = (f"storage {self._shown}: the database was unreachable for "
                                      f"{self._retry_for:g} s, giving up ({_reason(exc)})")
                        raise StorageError(self._dead) from None
                    delay = min(5.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
                    time.sleep(max(0.0, min(delay, deadline - now)))
                    attempt += 1
                    with contextlib.suppress(Exception):
                        self.scoped_session.remove()
        finally:
            self._tls.depth = 0

    @contextlib.contextmanager
    def single_attempt(self) -> Iterator[None]:
        """No retries in this block (this thread): for best-effort writes while aborting."""
        old = getattr(self._tls, "depth", 0)
        self._tls.depth = 1
        try:
            yield
        finally:
            self._tls.depth = old

    @property
    def gave_up(self) -> bool:
        return self._dead is not None

    def check_alive(self) -> None:
        """Raise the StorageError of an earlier give-up (an exception in between may hide it)."""
        if self._dead is not None:
            raise StorageError(self._dead)

    # -- trial creation: budget, retry copies, token -------------------------------------------

    @contextlib.contextmanager
    def _creation_lock(self) -> Iterator[None]:
        """SQLite ignores FOR UPDATE: serialise trial creation with a lock file beside the database."""
        if self._sqlite is None:
            yield
            return
        with _sqlite_lock(self._sqlite):
            yield

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        token = uuid.uuid4().hex

        def attempt() -> FrozenTrial:
            with self._creation_lock():
                self._tls.token = token
                try:
                    with _create_scoped_session(self.scoped_session) as session:
                        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                        trial = self._get_prepared_new_trial(study_id, template_trial, session)
                        return _frozen(trial, template_trial)
                finally:
                    self._tls.token = None

        def recover(_exc: BaseException) -> FrozenTrial | None:
            with _create_scoped_session(self.scoped_session) as session:
                row = (session.query(models.TrialSystemAttributeModel.trial_id)
                       .join(models.TrialModel, models.TrialModel.trial_id == models.TrialSystemAttributeModel.trial_id)
                       .filter(models.TrialModel.study_id == study_id,
                               models.TrialSystemAttributeModel.key == TOKEN_ATTR,
                               models.TrialSystemAttributeModel.value_json == json.dumps(token))
                       .one_or_none())
            return None if row is None else optuna.storages.RDBStorage.get_trial(self, row[0])

        return self._retry(attempt, recover)

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None,
                                session: Any) -> Any:
        if template_trial is None and self.cap_key is not None:
            cap = self._cap(session, study_id)
            if cap is not None and budget_used(_lineage_rows(session, study_id)) >= cap:
                raise NoMoreTrials()
        if template_trial is not None and template_trial.state == TrialState.WAITING:
            history = template_trial.system_attrs.get("retry_history") or []
            if history and _has_retry(session, study_id, history[-1]):
                raise DuplicateRetry()
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        token = getattr(self._tls, "token", None)
        if token:
            session.add(models.TrialSystemAttributeModel(trial_id=trial.trial_id, key=TOKEN_ATTR,
                                                         value_json=json.dumps(token)))
        return trial

    def _cap(self, session: Any, study_id: int) -> int | None:
        row = (session.query(models.StudyUserAttributeModel.value_json)
               .filter(models.StudyUserAttributeModel.study_id == study_id,
                       models.StudyUserAttributeModel.key == self.cap_key).one_or_none())
        value = json.loads(row[0]) if row is not None else self.cap_default
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    # -- state changes ---------------------------------------------------------------------------

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        if state == TrialState.RUNNING:
            return self._claim(trial_id)
        first = [True]

        def attempt() -> bool:
            try:
                return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if first[0]:
                    raise
                # our earlier attempt committed but its reply was lost
                trial = optuna.storages.RDBStorage.get_trial(self, trial_id)
                if trial.state == state:
                    return True
                raise
            finally:
                first[0] = False

        return self._retry(attempt)

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING in one conditional UPDATE; False if another worker got there first."""
        token = uuid.uuid4().hex

        def attempt() -> bool:
            with _create_scoped_session(self.scoped_session) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
                self.check_trial_is_updatable(trial_id, trial.state)
                result = session.execute(
                    sa.update(models.TrialModel)
                    .where(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.WAITING)
                    .values({models.TrialModel.state: TrialState.RUNNING,
                             models.TrialModel._datetime_start_utc: _utcnow()})
                    .execution_options(synchronize_session=False))
                if result.rowcount != 1:
                    return False
                session.add(models.TrialSystemAttributeModel(trial_id=trial_id, key=CLAIM_ATTR,
                                                             value_json=json.dumps(token)))
            return True

        def recover(_exc: BaseException) -> bool | None:
            attrs = optuna.storages.RDBStorage.get_trial_system_attrs(self, trial_id)
            return True if attrs.get(CLAIM_ATTR) == token else None

        try:
            return self._retry(attempt, recover)
        except sa.exc.IntegrityError:
            return False

    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        first = [True]

        def attempt() -> int:
            try:
                return optuna.storages.RDBStorage.create_new_study(self, directions, study_name)
            except optuna.exceptions.DuplicatedStudyError:
                if first[0] or study_name is None:
                    raise
                return optuna.storages.RDBStorage.get_study_id_from_name(self, study_name)
            finally:
                first[0] = False

        return self._retry(attempt)

    # -- heartbeats and stale trials -------------------------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        """Never raises: it runs in Optuna's heartbeat thread; the main thread sees a dead database."""
        try:
            self._retry(lambda: optuna.storages.RDBStorage.record_heartbeat(self, trial_id))
        except Exception as exc:  # noqa: BLE001
            _log.info("heartbeat of trial id %s not recorded: %s", trial_id, _reason(exc))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's rule (heartbeat older than the grace period, by the database clock), plus
        RUNNING trials that never wrote a heartbeat and started longer ago than the grace period."""
        stale = set(optuna.storages.RDBStorage._get_stale_trial_ids(self, study_id))
        grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 60))
        with _create_scoped_session(self.scoped_session, True) as session:
            rows = (session.query(models.TrialModel.trial_id, models.TrialModel._datetime_start_utc)
                    .outerjoin(models.TrialHeartbeatModel,
                               models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study_id,
                            models.TrialModel.state == TrialState.RUNNING,
                            models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
                    .all())
        now = _utcnow()  # Optuna 5 stores naive UTC datetimes
        stale.update(tid for tid, start in rows if start is None or now - start > grace)
        return sorted(stale)

    # -- several user attrs in one transaction ---------------------------------------------------

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Upsert several user attrs with one commit (an upsert is safe to retry)."""

        def attempt() -> None:
            with _create_scoped_session(self.scoped_session, True) as session:
                for key, value in attrs.items():
                    self._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)

        self._retry(attempt)

    # -- attribute removal (checkpoint artifacts that were deleted) ------------------------------

    def delete_trial_attrs(self, trial_id: int, *, user_keys: Iterable[str] = (),
                           system_keys: Iterable[str] = ()) -> None:
        user_keys, system_keys = list(user_keys), list(system_keys)

        def attempt() -> None:
            with _create_scoped_session(self.scoped_session) as session:
                for model, keys in ((models.TrialUserAttributeModel, user_keys),
                                    (models.TrialSystemAttributeModel, system_keys)):
                    if keys:
                        session.execute(sa.delete(model).where(model.trial_id == trial_id, model.key.in_(keys))
                                        .execution_options(synchronize_session=False))

        self._retry(attempt)


def _wrap(name: str) -> None:
    base = getattr(ResilientRDBStorage, name)

    @functools.wraps(base)
    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: base(self, *args, **kwargs))

    setattr(ResilientRDBStorage, name, method)


for _name in _RETRIED:
    _wrap(_name)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """`trial.set_user_attr` for each item, in one transaction when the storage is ours."""
    backend = getattr(trial.storage, "_backend", trial.storage)
    if not isinstance(backend, ResilientRDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    backend.set_trial_user_attrs(trial._trial_id, attrs)
    cached = getattr(trial, "_cached_frozen_trial", None)  # what `trial.set_user_attr` also updates
    if cached is not None:
        cached.user_attrs.update(attrs)


def _wal_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _frozen(trial: Any, template_trial: FrozenTrial | None) -> FrozenTrial:
    """The FrozenTrial of a just-created row (as Optuna's `_create_new_trial` builds it)."""
    import copy

    if template_trial is not None:
        frozen = copy.deepcopy(template_trial)
        frozen.number = trial.number
        frozen.datetime_start = trial.datetime_start
        frozen._trial_id = trial.trial_id
        return frozen
    return FrozenTrial(number=trial.number, state=trial.state, value=None, values=None,
                       datetime_start=trial.datetime_start, datetime_complete=None, params={}, distributions={},
                       user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=trial.trial_id)


def _lineage_rows(session: Any, study_id: int) -> list[tuple[int, TrialState, list[int]]]:
    trials = (session.query(models.TrialModel.trial_id, models.TrialModel.number, models.TrialModel.state)
              .filter(models.TrialModel.study_id == study_id).all())
    histories = dict(
        session.query(models.TrialSystemAttributeModel.trial_id, models.TrialSystemAttributeModel.value_json)
        .join(models.TrialModel, models.TrialModel.trial_id == models.TrialSystemAttributeModel.trial_id)
        .filter(models.TrialModel.study_id == study_id, models.TrialSystemAttributeModel.key == "retry_history")
        .all())
    return [(number, state, json.loads(histories[tid]) if tid in histories else []) for tid, number, state in trials]


def _has_retry(session: Any, study_id: int, number: int) -> bool:
    return any(history and history[-1] == number for _, _, history in _lineage_rows(session, study_id))


def budget_used(rows: Iterable[tuple[int, TrialState, list[int]]]) -> int:
    """Trials that use up the budget: every trial except those superseded by a retry copy
    (a crashed or interrupted trial counts once, through its retry)."""
    rows = list(rows)
    superseded = {history[-1] for _, _, history in rows if history}
    return sum(1 for number, _, _ in rows if number not in superseded)


# ---------------------------------------------------------------------------------------------
# A cross-process lock for SQLite (a file beside the database; dies with the process)
# ---------------------------------------------------------------------------------------------

_LOCKS: dict[str, tuple[threading.RLock, list[Any]]] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _sqlite_lock(db: Path) -> Iterator[None]:
    """Reentrant in a process (an RLock), exclusive across processes (flock on `<db>.lock`)."""
    key = str(db.resolve())
    with _LOCKS_GUARD:
        if key not in _LOCKS:
            _LOCKS[key] = (threading.RLock(), [None, 0])
        rlock, state = _LOCKS[key]
    with rlock:
        if state[1] == 0:
            fh = open(f"{db}.lock", "a+")
            fcntl.flock(fh, fcntl.LOCK_EX)
            state[0] = fh
        state[1] += 1
        try:
            yield
        finally:
            state[1] -= 1
            if state[1] == 0:
                fh, state[0] = state[0], None
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
