"""The budget gate: one lock per study, across processes and machines, held while a worker counts
the study's trials and asks for new ones (and while it makes retry copies). With the gate held,
"count, then create" cannot interleave between tuner workers, so the budget is never overshot,
and a retry copy is made at most once.

| backend | lock | dies with |
| --- | --- | --- |
| SQLite | `flock` on `<database>.lock` beside the file | the process |
| PostgreSQL | `pg_advisory_lock(0x74756e65, study_id)` on the worker's own connection | the connection |
| MySQL | `GET_LOCK('tuner-<study_id>', -1)` on the worker's own connection | the connection |

A lock that lives on a connection is lost when the server restarts. On PostgreSQL a holder that
falls silent (a network partition, a frozen host) loses the gate after `HOLD_LIMIT_S` (30 s): the
server ends its idle session, so the other workers do not stall until the partition heals. `held()` pings that
connection; the worker checks it after it created a trial, and `reacquire()` takes the lock again
before it re-reads the study (see worker.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from typing import Any

import sqlalchemy as sa

from tuner.storage.database import StorageURL

PG_CLASS = 0x74756E65  # 'tune': the first key of tuner's advisory locks
# PostgreSQL: the longest a gate holder's session may stay silent before the server ends it (and
# releases the gate); a lease holds the gate for milliseconds, seconds under heavy load
HOLD_LIMIT_S = 30.0


class Gate:
    def __init__(self, url: StorageURL, study_id: int) -> None:
        self.url = url
        self.study_id = int(study_id)
        self._local = threading.Lock()  # one holder per process, too
        self._fh: Any = None
        self._engine: sa.engine.Engine | None = None
        self._conn: sa.engine.Connection | None = None
        self.held_now = False

    # -- acquiring ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock (blocks while another worker holds it). A connection that died while
        idle (a restarted server, a firewall) is replaced; a failure leaves nothing held, so the
        caller may retry (worker.py runs this under storage.Retry)."""
        self._local.acquire()
        try:
            self._lock()
        except BaseException:
            self._drop()
            self._local.release()
            raise
        self.held_now = True

    def release(self) -> None:
        self.held_now = False
        try:
            self._unlock()
        finally:
            self._local.release()

    def __enter__(self) -> Gate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _lock(self) -> None:
        if self.url.backend == "sqlite":
            if self.url.sqlite_file is not None:
                self._fh = open(f"{self.url.sqlite_file}.lock", "a+")  # noqa: SIM115 - held until _unlock
                fcntl.flock(self._fh, fcntl.LOCK_EX)
            return
        conn = self._connection()
        if self.url.backend == "postgresql":
            # While the gate is held its session sits idle (the worker's queries go through its other
            # connections). A holder that falls silent (cut off by a network partition, a host lost or
            # frozen) would otherwise stall every worker of the study until its TCP connection died,
            # which a proxy or NAT in between can delay indefinitely: the server ends a session idle
            # longer than HOLD_LIMIT_S while it holds the gate, and with it the lock.
            conn.execute(sa.text("SELECT set_config('idle_session_timeout', :t, false), pg_advisory_lock(:a, :b)"),
                         {"t": f"{int(HOLD_LIMIT_S * 1000)}ms", "a": PG_CLASS, "b": self.study_id})
        else:
            conn.execute(sa.text("SELECT GET_LOCK(:n, -1)"), {"n": f"tuner-{self.study_id}"})

    def _unlock(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
            return
        if self._conn is None:
            return
        try:
            if self.url.backend == "postgresql":  # idle between leases for as long as a trial trains: no limit
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:a, :b), set_config('idle_session_timeout', "
                                           "'0', false)"), {"a": PG_CLASS, "b": self.study_id})
            elif self.url.backend == "mysql":
                self._conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": f"tuner-{self.study_id}"})
        except Exception:  # noqa: BLE001 - a dead connection has released the lock already
            self._drop()

    def _connection(self) -> sa.engine.Connection:
        if self._conn is None:
            if self._engine is None:
                self._engine = sa.create_engine(self.url.url, poolclass=sa.pool.NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
            with contextlib.suppress(Exception):
                conn.close()

    # -- while held ----------------------------------------------------------------------------------

    def held(self) -> bool:
        """Is the lock still ours? (False after the server dropped the gate's connection.)"""
        if not self.held_now:
            return False
        if self._conn is None:
            return self.url.backend == "sqlite"
        try:
            self._conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001
            self._drop()
            return False

    def reacquire(self) -> None:
        """Take the lock again after its connection was lost (blocks like acquiring)."""
        if self.url.backend == "sqlite" or self.held():
            return
        self._drop()
        self._lock()

    def close(self) -> None:
        self._drop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
