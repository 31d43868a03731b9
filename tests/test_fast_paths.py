"""The sweep fast path: checkpoints by elapsed time, SQLite in write-ahead-log mode, the console
script's fast exit. Real sweeps on real SQLite files; real subprocesses for the exit."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sweeps import study_file, trials

from conftest import run_cli
from tuner.engine.sweep import Flags, prepare_study
from tuner.engine.worker import run_worker
from tuner.errors import ConfigError
from tuner.storage.artifacts import CheckpointPolicy
from tuner.storage.artifacts import checkpoint_ids as checkpoint_artifacts
from tuner.study.config import load_study_file
from tuner.study.settings import DEFAULT_CHECKPOINT_EVERY, checkpoint_every, resolve


class Stop:
    def __init__(self, requested: bool) -> None:
        self.stop_requested = requested


def test_checkpoint_policy():
    now = time.monotonic()
    every = CheckpointPolicy(every=60.0)
    assert not every.due(1, 5, since=now)  # 60 s have not passed
    assert every.due(1, 5, since=now - 61)  # they have: the first epoch boundary after them
    assert not every.due(5, 5, since=now - 61)  # the last epoch: the trial is over, nothing to resume
    assert CheckpointPolicy(every=0.0).due(1, 5, since=now)  # 0: every epoch
    assert CheckpointPolicy(every=60.0, keep="best").due(5, 5, since=now)  # the kept best needs its weights
    stopping = CheckpointPolicy(every=60.0, stop=Stop(True))
    assert stopping.due(2, 5, since=now)  # a signal: the trial is queued to resume from here
    assert not stopping.due(5, 5, since=now)  # ... unless it just finished
    assert not CheckpointPolicy(every=60.0, stop=Stop(False)).due(2, 5, since=now)


def test_checkpoint_every_from_flag_env_default():
    env: dict[str, str] = {}
    assert checkpoint_every(None, env) == DEFAULT_CHECKPOINT_EVERY == 60.0
    assert checkpoint_every(0, env) == 0.0
    env["TUNER_CHECKPOINT_EVERY"] = "15"
    assert checkpoint_every(None, env) == 15.0
    assert checkpoint_every(5, env) == 5.0  # the flag wins
    env["TUNER_CHECKPOINT_EVERY"] = "soon"
    with pytest.raises(ConfigError, match="TUNER_CHECKPOINT_EVERY"):
        checkpoint_every(None, env)
    with pytest.raises(ConfigError, match="--checkpoint-every"):
        checkpoint_every(-1, env)


def _sweep(tmp_path: Path, n_trials: int = 3, **opts) -> tuple[str, Path]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}  # no trial diverges: all run 3 epochs
    config = load_study_file(study_file(tmp_path, n_trials=n_trials, pruner="none", space=space))
    prepare_study(config, url, None, keep_checkpoints=opts.pop("keep", None))
    store = tmp_path / "study.db.artifacts"
    run_worker(resolve(Flags(storage=url, worker_index=0, artifact_dir=str(store), **opts)), "small", handle_signals=False)
    return url, store


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture
def saves(monkeypatch) -> list[int]:
    """The epochs at which the engine wrote a checkpoint (the real writer, observed)."""
    from tuner.training import train

    epochs: list[int] = []
    real = train.save_checkpoint

    def observed(path, **kw):
        epochs.append(kw["epoch"])
        return real(path, **kw)

    monkeypatch.setattr(train, "save_checkpoint", observed)
    return epochs


def test_short_trials_write_no_checkpoints(tmp_path, one_thread, saves):
    url, store = _sweep(tmp_path)  # trials of about a second, far below the 60 s default
    ts = trials(url, "small")
    assert len(ts) == 3 and all(t.user_attrs["epochs"] == 3 for t in ts)
    assert saves == [] and _files(store) == []
    assert all(not t.user_attrs.get("checkpoint") and not checkpoint_artifacts(t) for t in ts)


def test_keep_best_checkpoints_the_last_epoch_of_the_winner(tmp_path, one_thread, saves):
    url, store = _sweep(tmp_path, keep="best")
    ts = trials(url, "small")
    assert saves == [3, 3, 3]  # each trial's final weights, nothing before
    best = max((t for t in ts if t.value is not None), key=lambda t: (t.value, -t.number))
    kept = [t for t in ts if any((store / i).exists() for i in checkpoint_artifacts(t))]
    assert [t.number for t in kept] == [best.number]  # the others' files were deleted
    assert best.user_attrs["checkpoint"]["epoch"] == 3
    assert _files(store) == checkpoint_artifacts(best)


def test_checkpoint_every_zero_checkpoints_every_epoch(tmp_path, one_thread, saves):
    url, store = _sweep(tmp_path, n_trials=2, checkpoint_every=0.0)
    assert saves == [1, 2, 1, 2]  # not after the last: the trial is over, there is nothing to resume
    assert _files(store) == []  # finished trials' checkpoints are deleted
    # the attr keeps the last checkpoint (epoch 2): finished trials are read-only, and a worker that
    # dies before its tell must leave the retry something to resume from
    assert [t.user_attrs["checkpoint"]["epoch"] for t in trials(url, "small")] == [2, 2]


def _journal_mode(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("pragma journal_mode").fetchone()[0]
    finally:
        conn.close()


def test_sweep_puts_sqlite_in_wal_mode_and_leaves_no_log_behind(tmp_path):
    path = study_file(tmp_path, n_trials=2, pruner="none")
    run = run_cli("sweep", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}", cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "best value" in run.stdout  # the fast exit flushed everything
    # the process closed its connections before exiting: the log was folded into the database
    assert not (tmp_path / "study.db-wal").exists() and not (tmp_path / "study.db-shm").exists()
    assert _journal_mode(tmp_path / "study.db") == "wal"
    assert len(trials(f"sqlite:///{tmp_path / 'study.db'}", "small")) == 2


def test_wal_can_be_turned_off(tmp_path):
    path = study_file(tmp_path, n_trials=1, pruner="none")
    run = run_cli("sweep", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}", cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1", "TUNER_SQLITE_WAL": "0"})
    assert run.returncode == 0, run.stderr
    assert _journal_mode(tmp_path / "study.db") == "delete"


def _console_script(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tuner.cli.run` (the console script) in a fresh interpreter, after `body`."""
    code = textwrap.dedent(body) + "\nsys.argv = ['tuner', *sys.argv[1:]]\nfrom tuner.cli import run\nrun()\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**env, "TUNER_DEBUG": "0"})


def test_fast_exit_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    body = """
        import atexit, sys
        atexit.register(lambda: print("exit handler ran", flush=False))
    """
    ok = _console_script(tmp_path, body, "--help")
    assert ok.returncode == 0 and "Usage" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    bad = _console_script(tmp_path, body, "studies", "--storage", "sqlite:///missing.db")
    assert bad.returncode == 2 and "missing.db" in bad.stderr and "exit handler ran" in bad.stdout


def test_exit_waits_for_a_live_non_daemon_thread(tmp_path):
    body = """
        import sys, threading, time
        threading.Thread(target=lambda: (time.sleep(1.0), print("thread finished", flush=True))).start()
    """
    run = _console_script(tmp_path, body, "--help")
    assert run.returncode == 0 and "thread finished" in run.stdout
