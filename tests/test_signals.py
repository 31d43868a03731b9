"""Every command stops on SIGINT / SIGTERM with exit 130 / 143 and one line on stderr (README,
"Exit codes and errors"), with real processes and real signals.

Commands that run for a while (`train`, `verify`, `worker`, `sweep`) are signalled mid-run, once
they print a known line. The fast read-only ones are signalled at a blocking point: their storage
is a TCP port that accepts a connection and never answers, so the process is blocked inside its
command, reading the study, when the signal comes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
from test_cli_train import params_text
from test_faults import Proc, env_for, running_with_checkpoint, study_file, wait_for
from test_verify import constructed

SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


class SilentDatabase:
    """A PostgreSQL address whose server accepts connections and never answers: a client's first
    query blocks there. `connected` is set once a client connected."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.url = f"postgresql+psycopg://tuner@127.0.0.1:{self.server.getsockname()[1]}/tuner"
        self.connected = threading.Event()
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.clients.append(client)
            self.connected.set()

    def close(self) -> None:
        for s in (self.server, *self.clients):
            s.close()


@pytest.fixture
def silent_db():
    db = SilentDatabase()
    yield db
    db.close()


def stopped(proc: Proc, sig: signal.Signals, code: int, timeout: float = 30) -> str:
    """Send `sig`; the process exits `code` within `timeout` with one line naming the signal and no
    traceback. Returns its stderr."""
    proc.popen.send_signal(sig)
    assert proc.wait(timeout) == code, proc.output()
    err = proc.stderr()
    assert "Traceback" not in err, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith(f"interrupted by {sig.name}"), err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the commands that read a study storage, each blocked on it when the signal comes
BLOCKED = {
    "studies": ["studies"],
    "best": ["best", "s"],
    "export": ["export", "s"],
    "report": ["report", "s", "-o", "r.html"],
    "compare": ["compare", "s", "t"],
    "verify": ["verify", "s", "--device", "cpu"],
    "dashboard": ["dashboard", "--port", "PORT"],
    "sweep": ["sweep", "s.yaml", "--device", "cpu"],
    "sweep --create-only": ["sweep", "s.yaml", "--create-only"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig, code", SIGNALS)
@pytest.mark.parametrize("command", list(BLOCKED))
def test_a_command_blocked_on_its_storage_stops_on_a_signal(tmp_path, silent_db, command, sig, code):
    study_file(tmp_path, name="s", dataset="synthetic:200", epochs=1)
    args = [str(free_port()) if a == "PORT" else a for a in BLOCKED[command]]
    proc = Proc(tmp_path, "cmd", *args, env=env_for(silent_db.url))
    try:
        wait_for("the command to connect to its storage", silent_db.connected.is_set, 30)
        stopped(proc, sig, code, timeout=10)
    finally:
        proc.kill()


@pytest.mark.timeout(60)
def test_a_worker_blocked_on_its_storage_stops_on_the_first_signal(tmp_path, silent_db):
    """Before its first lease a worker has no trial to stop gracefully: a signal aborts at once."""
    proc = Proc(tmp_path, "worker", "worker", "--study-name", "s", "--device", "cpu", env=env_for(silent_db.url))
    try:
        wait_for("the worker to connect to its storage", silent_db.connected.is_set, 30)
        stopped(proc, signal.SIGINT, 130, timeout=10)
    finally:
        proc.kill()


# ---------------------------------------------------------------------------------------------
# Mid-run
# ---------------------------------------------------------------------------------------------

def wait_line(proc: Proc, text: str, timeout: float = 60) -> None:
    wait_for(f"{text!r} on stdout", lambda: text in proc.out_path.read_text() or proc.popen.poll() is not None,
             timeout)
    assert proc.popen.poll() is None, f"exited before printing {text!r}\n{proc.output()}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, code", SIGNALS)
def test_train_stops_mid_run(tmp_path, sig, code):
    path = tmp_path / "best.yaml"
    path.write_text(params_text(epochs=200), encoding="utf-8")
    proc = Proc(tmp_path, "train", "train", str(path), "--device", "cpu", env=env_for("sqlite:///unused.db"))
    try:
        wait_line(proc, "epoch 1/200")
        stopped(proc, sig, code)
        assert "test_accuracy" not in proc.out_path.read_text()
    finally:
        proc.kill()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, code", SIGNALS)
def test_verify_stops_mid_run(tmp_path, sig, code):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    constructed(url, [0.5, 0.6, 0.7], name="v")
    proc = Proc(tmp_path, "verify", "verify", "v", "--top", "3", "--seeds", "30", "--device", "cpu",
                env=env_for(url))
    try:
        wait_line(proc, "run 1/90")
        stopped(proc, sig, code)
        assert "tuner export picks" not in proc.out_path.read_text()
    finally:
        proc.kill()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, code", SIGNALS)
def test_worker_stops_mid_trial(tmp_path, sig, code):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = study_file(tmp_path, name="w", dataset="synthetic:200", epochs=100, n_trials=1)
    create = Proc(tmp_path, "create", "sweep", str(path), "--create-only", env=env_for(url))
    assert create.wait(60) == 0, create.output()
    proc = Proc(tmp_path, "worker", "worker", "--study-name", "w", "--device", "cpu",
                env=env_for(url, TUNER_ARTIFACT_DIR=str(tmp_path / "artifacts")))
    try:
        wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(url, "w", 1, 100), 60)
        err = stopped(proc, sig, code, timeout=60)
        assert "will resume from its checkpoint on the next" in err, err
    finally:
        proc.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig, code", SIGNALS)
def test_dashboard_stops_while_serving(tmp_path, sig, code):
    pytest.importorskip("optuna_dashboard")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    constructed(url, [0.5], name="d")
    proc = Proc(tmp_path, "dashboard", "dashboard", "--port", str(free_port()), env=env_for(url))
    try:
        wait_line(proc, "(Ctrl-C to stop)")
        stopped(proc, sig, code)
    finally:
        proc.kill()



# ---------------------------------------------------------------------------------------------
# The line a stopped worker prints
# ---------------------------------------------------------------------------------------------

NEXT_RUN = "on the next `tuner sweep` or `tuner worker`"


@pytest.mark.parametrize("interrupted, says", [
    ([], "no trial was running, so none is left to resume"),
    ([3], f"trial 3 will resume from its checkpoint {NEXT_RUN}"),
    ([3, 7], f"trials 3 and 7 will resume from their checkpoints {NEXT_RUN}"),
    ([3, 4, 7], f"trials 3, 4 and 7 will resume from their checkpoints {NEXT_RUN}"),
], ids=["none", "one", "two", "three"])
def test_a_stopped_worker_says_what_resumes_in_a_sentence(interrupted, says, capsys):
    from tuner.engine.faults import Interrupted, StopController

    stop = StopController().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the worker's handler
        wait_for("the stop request", lambda: stop.stop_requested, 5)
        stop.interrupted.extend(interrupted)
        with pytest.raises(Interrupted) as caught:
            stop.raise_if_stopped()
    finally:
        stop.restore()
    assert str(caught.value) == f"interrupted by SIGTERM: {says}"
    assert caught.value.exit_code == 143
    assert "received SIGTERM: stopping after the current epoch" in capsys.readouterr().err
