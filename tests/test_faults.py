"""Fault tolerance with real processes, real PostgreSQL, real kill -9 and signals (GitHub issue 5).

A tiny study (the tiny net on 600 synthetic images, 6 epochs of ~0.1-0.3 s, heartbeat 1 s) keeps
every test bounded; each wait has a deadline and each subprocess a timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
import yaml
from optuna.trial import TrialState

from conftest import need

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

EPOCHS = 6


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def study_file(folder: Path, name: str = "faulty", **changes) -> Path:
    data = {
        "name": name, "direction": "maximize", "dataset": "synthetic:600", "model": "tiny", "epochs": EPOCHS,
        "batch_size": 64, "seed": 0, "n_trials": 3, "sampler": {"name": "random"}, "pruner": "none",
        "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 3},
        "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def env_for(url: str, **extra: str) -> dict[str, str]:
    # these trials last seconds: checkpoint after every epoch (the default waits 60 s), so a kill
    # always finds a checkpoint to resume from
    env = {**os.environ, "TUNER_STORAGE": url, "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0",
           "TUNER_CHECKPOINT_EVERY": "0", **extra}
    return env


class Proc:
    """`python -m tuner ARGS` in the background, output to files in `folder`."""

    def __init__(self, folder: Path, tag: str, *args: str, env: dict[str, str]) -> None:
        self.out_path, self.err_path = folder / f"{tag}.out", folder / f"{tag}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.popen = subprocess.Popen([sys.executable, "-m", "tuner", *args], cwd=folder, env=env,
                                      stdout=self._out, stderr=self._err)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"process did not finish in {timeout} s\n{self.output()}")
        finally:
            self._out.close()
            self._err.close()

    def output(self) -> str:
        return f"--- stdout\n{self.out_path.read_text()}\n--- stderr\n{self.err_path.read_text()}"

    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - the database may be briefly unavailable
            value = None
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if "postgres" in url else {})
    try:
        sid = storage.get_study_id_from_name(name)
        return storage.get_all_trials(sid)
    finally:
        storage.engine.dispose()


def running_with_checkpoint(url: str, name: str, min_epoch: int = 1, below: int = EPOCHS):
    for t in trials(url, name):
        ck = t.user_attrs.get("checkpoint") or {}
        if t.state == TrialState.RUNNING and min_epoch <= ck.get("epoch", 0) < below:
            return t
    return None


def superseded(ts: list[optuna.trial.FrozenTrial]) -> set[int]:
    return {t.system_attrs["retry_history"][-1] for t in ts if t.system_attrs.get("retry_history")}


def assert_study_done(url: str, name: str, n: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly n finished trials (the retried ones aside), unique numbers, none RUNNING or WAITING."""
    ts = trials(url, name)
    states = [t.state.name for t in ts]
    numbers = [t.number for t in ts]
    assert sorted(numbers) == list(range(len(ts))), numbers
    assert TrialState.RUNNING not in [t.state for t in ts] and TrialState.WAITING not in [t.state for t in ts], states
    replaced = superseded(ts)
    counted = [t for t in ts if t.number not in replaced]
    assert len(counted) == n, states
    assert all(t.state == TrialState.COMPLETE for t in counted), states
    assert all(t.state == TrialState.FAIL for t in ts if t.number in replaced), states
    return ts


def create_study(folder: Path, url: str, **changes) -> str:
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    config = load_study_file(study_file(folder, **changes))
    prepare_study(config, url, None).engine.dispose()
    return config.name


@pytest.fixture
def pg_db(pg_url: str) -> str:
    """A fresh PostgreSQL database that survives a server restart (see conftest's pg_url)."""
    return pg_url


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of a trial, at random moments after its first checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", [11, 22, 33])
def test_kill9_mid_trial_then_the_retry_resumes_from_its_checkpoint(tmp_path, pg_url, seed):
    rng = random.Random(seed)
    min_epoch, epochs = rng.choice([1, 2, 3]), 10
    name = create_study(tmp_path, pg_url, epochs=epochs)
    art = tmp_path / "artifacts"
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(art))
    first = Proc(tmp_path, "w1", "worker", "--study-name", name, env=env)
    victim = wait_for("a RUNNING trial with a checkpoint",
                      lambda: running_with_checkpoint(pg_url, name, min_epoch, 5), 90)
    time.sleep(rng.uniform(0.0, 0.2))  # a random moment within the trial, after its first checkpoint
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    at_kill = {t.number: t for t in trials(pg_url, name)}
    dead = [t for t in at_kill.values() if t.state == TrialState.RUNNING]
    assert len(dead) == 1, [(t.number, t.state.name) for t in at_kill.values()]
    dead_trial = dead[0]
    saved_epoch = dead_trial.user_attrs["checkpoint"]["epoch"]
    assert saved_epoch >= victim.user_attrs["checkpoint"]["epoch"] >= 1
    assert any(art.iterdir()), "the killed trial's checkpoint is in the artifact store"

    second = Proc(tmp_path, "w2", "worker", "--study-name", name, env=env)
    assert second.wait(120) == 0, second.output()
    assert "Traceback" not in second.stderr()

    ts = assert_study_done(pg_url, name, 3)
    killed = next(t for t in ts if t.number == dead_trial.number)
    assert killed.state == TrialState.FAIL
    retry = next(t for t in ts if t.system_attrs.get("retry_history", [None])[-1] == killed.number)
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == killed.number
    assert retry.state == TrialState.COMPLETE
    assert retry.params == killed.params
    # the file is written before its attr: a kill between the two leaves the attr one epoch behind
    # the file, and the retry resumes from the file (a whole, consistent state)
    assert retry.user_attrs["resumed_from_epoch"] in (saved_epoch, saved_epoch + 1) and saved_epoch >= 1
    assert retry.user_attrs["resumed_from_trial"] == killed.number
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))  # the whole curve
    assert [h["epoch"] for h in retry.user_attrs["history"]] == list(range(1, epochs + 1))
    for step, value in killed.intermediate_values.items():  # the resumed curve starts where it stopped
        if step <= saved_epoch:
            assert retry.intermediate_values[step] == pytest.approx(value)
    assert [p.name for p in art.iterdir() if not p.name.startswith(".")] == []  # finished: checkpoints removed


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig, workers, code", [(signal.SIGINT, 1, 130), (signal.SIGTERM, 2, 143)],
                         ids=["sigint-1-worker", "sigterm-2-workers"])
def test_signal_stops_at_an_epoch_boundary_and_the_next_run_resumes(tmp_path, pg_url, sig, workers, code):
    path = study_file(tmp_path, n_trials=4)
    art = tmp_path / "artifacts"
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(art))
    run = Proc(tmp_path, "sweep1", "sweep", str(path), "--workers", str(workers), env=env)
    wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, "faulty", 1, EPOCHS - 2), 90)
    run.popen.send_signal(sig)
    assert run.wait(60) == code, run.output()
    err = run.stderr()
    assert "Traceback" not in err and f"interrupted by {sig.name}" in err, err

    ts = trials(pg_url, "faulty")
    assert TrialState.RUNNING not in [t.state for t in ts], [(t.number, t.state.name) for t in ts]
    stopped = [t for t in ts if t.user_attrs.get("interrupted")]
    assert stopped and all(t.state == TrialState.FAIL for t in stopped)
    waiting = [t for t in ts if t.state == TrialState.WAITING]
    assert {t.system_attrs["retry_history"][-1] for t in waiting} == {t.number for t in stopped}
    assert all(t.system_attrs["tuner_interrupted"][-1] == t.system_attrs["retry_history"][-1] for t in waiting)
    epochs = {t.number: t.user_attrs["checkpoint"]["epoch"] for t in stopped}
    assert all(1 <= e < EPOCHS for e in epochs.values())

    again = Proc(tmp_path, "sweep2", "sweep", str(path), env=env)
    assert again.wait(120) == 0, again.output()
    ts = assert_study_done(pg_url, "faulty", 4)
    for number, epoch in epochs.items():
        retry = next(t for t in ts if t.system_attrs.get("retry_history", [None])[-1] == number)
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == epoch
        assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    assert [p.name for p in art.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.timeout(90)
def test_a_second_sigint_aborts_at_once(tmp_path, pg_url):
    # a trial far longer than the test, with epochs of ~1 s: the second signal lands mid-epoch
    path = study_file(tmp_path, n_trials=2, epochs=200, dataset="synthetic:2500")
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(tmp_path / "artifacts"))
    run = Proc(tmp_path, "sweep", "sweep", str(path), env=env)
    wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, "faulty", 1, 200), 90)
    run.popen.send_signal(signal.SIGINT)
    time.sleep(0.05)
    run.popen.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert run.wait(20) == 130, run.output()
    assert time.monotonic() - started < 10
    assert "Traceback" not in run.stderr() and "aborted by a second SIGINT" in run.stderr(), run.output()
    ts = trials(pg_url, "faulty")
    assert TrialState.RUNNING not in [t.state for t in ts]
    assert [t.state for t in ts if t.state == TrialState.WAITING], "the aborted trial is queued to resume"


@pytest.mark.timeout(120)
def test_a_live_worker_whose_trial_was_judged_stale_goes_on(tmp_path, pg_url):
    """Another worker failed our trial (say after a long database outage) and queued its retry:
    the live worker notices at its next epoch, leaves the trial to the copy, and goes on."""
    from tuner.storage import keys
    from tuner.storage.database import open_storage

    name = create_study(tmp_path, pg_url, n_trials=2, epochs=8)
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(tmp_path / "artifacts"))
    worker = Proc(tmp_path, "w1", "worker", "--study-name", name, env=env)
    victim = wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, name, 1, 5), 90)
    storage = open_storage(pg_url)
    study = optuna.load_study(study_name=name, storage=storage)
    assert storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
    study.add_trial(keys.retry_template(storage.get_trial(victim._trial_id)))
    storage.engine.dispose()
    assert worker.wait(90) == 0, worker.output()
    assert "Traceback" not in worker.stderr() and f"trial {victim.number} was failed by another worker" in worker.stderr()
    ts = assert_study_done(pg_url, name, 2)
    retry = next(t for t in ts if t.system_attrs.get("retry_history") == [victim.number])
    assert retry.user_attrs["resumed_from_epoch"] >= 1


# ---------------------------------------------------------------------------------------------
# Database faults
# ---------------------------------------------------------------------------------------------

def _pg_cluster() -> tuple[str, str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or os.geteuid() != 0:
        need("postgres", "restarting PostgreSQL needs pg_ctlcluster and root")
    return versions[-1], "main"


@pytest.mark.timeout(180)
def test_postgres_restart_in_the_middle_of_a_sweep(tmp_path, pg_db):
    version, cluster = _pg_cluster()
    path = study_file(tmp_path, n_trials=8, heartbeat={"interval": 1, "grace_period": 30})
    env = env_for(pg_db, TUNER_ARTIFACT_DIR=str(tmp_path / "artifacts"))
    run = Proc(tmp_path, "sweep", "sweep", str(path), "--workers", "2", env=env)

    def some_done() -> bool:
        ts = trials(pg_db, "faulty")
        return sum(t.state == TrialState.COMPLETE for t in ts) >= 2 and \
            any(t.state == TrialState.RUNNING for t in ts)

    wait_for("two COMPLETE trials and one RUNNING", some_done, 90)
    restart = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
                             capture_output=True, text=True, timeout=60)
    assert restart.returncode == 0, restart.stderr
    assert run.wait(150) == 0, run.output()
    assert "Traceback" not in run.stderr()
    ts = assert_study_done(pg_db, "faulty", 8)
    assert all(t.state == TrialState.COMPLETE for t in ts)  # no trial lost, none duplicated


class TcpProxy:
    """A TCP relay 127.0.0.1:port -> target. `down()` drops every connection and refuses new ones,
    like a database host that vanished; `up()` brings it back on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        if self._server is not None:
            try:  # wakes the accept() blocked on it: close() alone leaves that accept() taking connections
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.mark.timeout(150)
def test_database_down_past_the_retry_bound_exits_1_then_the_study_recovers(tmp_path, pg_url):
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.up()
    url = sa.engine.make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    try:
        name = create_study(tmp_path, url, n_trials=2, epochs=40)
        env = env_for(url, TUNER_ARTIFACT_DIR=str(tmp_path / "artifacts"), TUNER_DB_RETRY_SECONDS="3")
        worker = Proc(tmp_path, "w1", "worker", "--study-name", name, env=env)
        wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(url, name, 1, 40), 90)
        proxy.down()
        started = time.monotonic()
        assert worker.wait(60) == 1, worker.output()
        assert time.monotonic() - started < 40
        lines = [ln for ln in worker.stderr().splitlines() if ln.strip()]
        assert len(lines) == 1 and "unreachable" in lines[0] and "giving up" in lines[0], lines
        assert "Traceback" not in worker.stderr()

        proxy.up()  # the database is back: a new worker finishes the study, resuming the lost trial
        env["TUNER_DB_RETRY_SECONDS"] = "30"
        again = Proc(tmp_path, "w2", "worker", "--study-name", name, env=env)
        assert again.wait(120) == 0, again.output()
        ts = assert_study_done(url, name, 2)
        resumed = [t for t in ts if t.user_attrs.get("resumed_from_epoch")]
        assert resumed and resumed[0].user_attrs["resumed_from_epoch"] >= 1, (again.output(), [(t.number, t.state, t.user_attrs.get("checkpoint"), t.system_attrs) for t in ts])
    finally:
        proxy.down()


# ---------------------------------------------------------------------------------------------
# In-process checks of the worker's gate, reconcile and retry rules, on a real worker (fast)
# ---------------------------------------------------------------------------------------------

class opened_worker:
    """A real lease manager (tuner.engine.lease) on the study, as a worker opens it, with its heartbeat thread."""

    def __init__(self, url: str, name: str, **opts) -> None:
        from dataclasses import replace

        import torch

        from tuner.engine.faults import StopController
        from tuner.engine.lease import open_lease_manager
        from tuner.engine.worker import environment
        from tuner.study.settings import Flags, resolve

        settings = replace(resolve(Flags(storage=url, device="cpu", worker_index=0)), **opts)
        self.manager = open_lease_manager(settings, name, StopController(), environment(torch.device("cpu")))

    def __enter__(self):
        return self.manager.__enter__()

    def __exit__(self, *exc) -> None:
        self.manager.__exit__(*exc)


def _age(url: str, trial_id: int, seconds: float) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        then = datetime.now() - timedelta(seconds=seconds)  # Optuna stores local naive datetimes
        conn.execute(sa.text("update trials set datetime_start = :t where trial_id = :i"), {"t": then, "i": trial_id})
    engine.dispose()


def test_orphans_of_tuner_workers_are_reaped_but_plain_optuna_trials_are_not(tmp_path, pg_url):
    from tuner.storage import keys

    name = create_study(tmp_path, pg_url, n_trials=10)
    with opened_worker(pg_url, name) as w:
        sid = w.study_id
        # a tuner trial popped by a worker that died before its first heartbeat
        orphan = w.storage.create_new_trial(sid, keys.fresh_template("dead-worker"))
        w.storage.set_trial_state_values(orphan, TrialState.RUNNING)
        _age(pg_url, orphan, 60)
        # a plain ask-and-tell trial, no heartbeat ever, started long ago: not tuner's to fail
        plain = optuna.load_study(study_name=name, storage=pg_url).ask()
        _age(pg_url, plain._trial_id, 60)
        # a tuner trial popped a moment ago: its worker is about to beat
        young = w.storage.create_new_trial(sid, keys.fresh_template("live-worker"))
        w.storage.set_trial_state_values(young, TrialState.RUNNING)
        w.queue_retries()
        w.queue_retries()  # twice, as two workers would: still one retry copy
        ts = {t._trial_id: t for t in w.storage.get_all_trials(sid)}
        assert ts[orphan].state == TrialState.FAIL
        assert ts[plain._trial_id].state == TrialState.RUNNING and ts[young].state == TrialState.RUNNING
        copies = [t for t in ts.values() if t.state == TrialState.WAITING]
        assert [c.system_attrs["retry_history"] for c in copies] == [[ts[orphan].number]]
    # the plain trial is still the plain user's: its tell works
    study = optuna.load_study(study_name=name, storage=pg_url)
    assert study.tell(plain.number, 0.5).state == TrialState.COMPLETE


def test_lost_commit_replies_do_not_duplicate_trials(tmp_path, pg_url):
    """A commit that succeeds but whose reply is lost (the connection drops) is retried safely:
    Optuna's own retry queues a duplicate, which the next gate holder voids; a lost claim leaves
    an orphan that is failed and queued again once its grace period passed."""
    import psycopg

    from tuner.storage import keys

    name = create_study(tmp_path, pg_url, n_trials=3)
    lose = {"n": 0, "what": "", "armed": False}

    def after_flush(session, _context) -> None:  # what the transaction writes (pre-flush state)
        trials = [o for o in list(session.new) + list(session.dirty) if type(o).__name__ == "TrialModel"]
        if lose["what"] == "insert" and any(o in session.new for o in trials):
            lose["armed"] = True
        if lose["what"] == "claim" and any(o in session.dirty and o.state == TrialState.RUNNING for o in trials):
            lose["armed"] = True

    def listen(w, what: str) -> None:
        dialect = w.storage.engine.dialect
        real = type(dialect).do_commit

        def do_commit(dbapi_connection) -> None:  # the COMMIT reaches the server, its reply does not
            real(dialect, dbapi_connection)
            if lose["n"] and lose["armed"]:
                lose["n"] -= 1
                lose["armed"] = False
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        lose.update(n=1, what=what, armed=False)
        dialect.do_commit = do_commit
        sa.event.listen(sa.orm.Session, "after_flush", after_flush)

    def unlisten(w) -> None:
        del w.storage.engine.dialect.do_commit
        sa.event.remove(sa.orm.Session, "after_flush", after_flush)

    with opened_worker(pg_url, name, retry_seconds=30) as w:
        listen(w, "insert")  # the reply of the fresh trial's insert is lost
        try:
            first = w.lease()
            assert lose["n"] == 0 and first is not None
        finally:
            unlisten(w)
        ts = w.trials()
        assert sorted(t.state.name for t in ts) == ["RUNNING", "WAITING"]  # the duplicate, queued twice
        ts = w.queue_retries()
        void = [t for t in ts if t.user_attrs.get(keys.VOID)]
        assert len(void) == 1 and void[0].state == TrialState.FAIL
        assert keys.budget_used(ts) == 1

        # a lost reply when claiming: the claimed trial is left behind (an orphan), the worker goes on
        w.storage.create_new_trial(w.study_id, keys.fresh_template("queued"))
        listen(w, "claim")
        try:
            second = w.lease()
            assert lose["n"] == 0
        finally:
            unlisten(w)
        assert second is not None
        ts = w.trials()
        orphan = next(t for t in ts if t.state == TrialState.RUNNING and keys.ENV not in t.user_attrs)
        _age(pg_url, orphan._trial_id, 60)
        ts = w.queue_retries()
        assert next(t for t in ts if t.number == orphan.number).state == TrialState.FAIL
        assert keys.budget_used(ts) == 3  # first, second, and the orphan's copy: the budget, exactly
        assert w.lease() is not None  # the orphan's copy
        assert w.lease() is None  # the budget is used up


def test_the_budget_gate_counts_before_it_queues(tmp_path, pg_url):
    from tuner.storage import keys

    name = create_study(tmp_path, pg_url, n_trials=2)
    with opened_worker(pg_url, name) as w:
        a, b = w.lease(), w.lease()
        assert a is not None and b is not None
        assert w.lease() is None
        # a is stopped by a signal: its copy replaces it and the budget stays 2
        a.trial.set_user_attr(keys.INTERRUPTED, True)
        w.study.tell(a.trial, state=TrialState.FAIL)
        ts = w.queue_retries()
        ts = w.queue_retries()
        copies = [t for t in ts if t.state == TrialState.WAITING]
        assert [c.system_attrs["retry_history"] for c in copies] == [[a.trial.number]]
        assert keys.budget_used(ts) == 2
        c = w.lease()
        assert c is not None and c.retried and c.trial.number == copies[0].number
        assert w.lease() is None


def test_db_retry_bound_must_be_a_number(tmp_path, cli):
    run = cli("worker", "--study-name", "x", "--storage", f"sqlite:///{tmp_path}/none.db",
              env={"TUNER_DB_RETRY_SECONDS": "soon"})
    assert run.returncode == 2 and "TUNER_DB_RETRY_SECONDS" in run.stderr and "Traceback" not in run.stderr


def test_which_database_errors_are_retried():
    import sqlite3

    import psycopg
    from psycopg import errors as pg

    from tuner.storage.database import is_transient

    def wrapped(orig: Exception, cls=sa.exc.OperationalError) -> Exception:
        try:
            raise optuna.exceptions.StorageInternalError("commit failed") from cls("SELECT 1", {}, orig)
        except optuna.exceptions.StorageInternalError as exc:
            return exc

    assert is_transient(wrapped(psycopg.OperationalError("connection refused")))
    assert is_transient(wrapped(pg.AdminShutdown("terminating connection due to administrator command")))
    assert is_transient(wrapped(pg.CannotConnectNow("the database system is starting up")))
    assert is_transient(wrapped(pg.DeadlockDetected("deadlock detected"), sa.exc.DBAPIError))
    assert is_transient(wrapped(pg.SerializationFailure("could not serialize access"), sa.exc.DBAPIError))
    assert is_transient(wrapped(sqlite3.OperationalError("database is locked")))
    assert not is_transient(wrapped(pg.InvalidPassword("password authentication failed")))
    assert not is_transient(wrapped(pg.InvalidCatalogName('database "x" does not exist')))
    assert not is_transient(wrapped(sqlite3.OperationalError("no such table: trials")))
    assert not is_transient(wrapped(pg.UniqueViolation("duplicate key"), sa.exc.IntegrityError))
    assert not is_transient(ValueError("Cannot tell a FAIL trial."))
    assert is_transient(wrapped(pg.QueryCanceled("canceling statement due to statement timeout")))
