"""Packed workers (a Pack driven by the worker loop, tuner/engine/worker.py): `--pack K` sweeps on SQLite and PostgreSQL end with exactly
n_trials, with pruning and refills; a kill -9 and a SIGINT leave trials that resume from their
per-slot checkpoints, packed or alone. Real processes, real storages (see test_faults.py)."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sweeps import study_file as small_study
from test_faults import (
    EPOCHS,
    Proc,
    assert_study_done,
    create_study,
    env_for,
    running_with_checkpoint,
    study_file,
    trials,
    wait_for,
)

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


def overlap(ts: list[optuna.trial.FrozenTrial]) -> int:
    """The most trials that ran at the same time."""
    events: list[tuple[datetime, int]] = []
    for t in ts:
        if t.datetime_start is not None and t.datetime_complete is not None:
            events += [(t.datetime_start, 1), (t.datetime_complete, -1)]
    most = now = 0
    for _, step in sorted(events):
        now += step
        most = max(most, now)
    return most


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def test_pack_setting_in_the_study_file_and_the_flag(tmp_path: Path, cli) -> None:
    from tuner.errors import ConfigError
    from tuner.study.config import load_study_file, parse_study
    from tuner.study.settings import pack

    plain = load_study_file(small_study(tmp_path, "plain"), check_model=False)
    packed = load_study_file(small_study(tmp_path, "packed", training={"pack": 4}), check_model=False)
    assert plain.pack == "auto" and packed.pack == 4
    assert packed.to_dict()["training"]["pack"] == 4 and "pack" not in plain.to_dict()["training"]
    assert parse_study(packed.to_dict()).pack == 4  # stored and read back by workers
    assert packed.fingerprint()["training"] == plain.fingerprint()["training"]  # a continued study may change it
    auto = load_study_file(small_study(tmp_path, "auto", training={"pack": "auto"}), check_model=False)
    assert auto.pack == "auto"
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="training.pack"):
            load_study_file(small_study(tmp_path, "bad", training={"pack": bad}), check_model=False)
    assert pack(None) is None and pack("auto") == "auto" and pack("3") == 3
    with pytest.raises(ConfigError, match="--pack"):
        pack("0")
    result = cli("sweep", str(small_study(tmp_path, "flag")), "--pack", "zero")
    assert result.returncode == 2 and "--pack" in result.stderr, result.stderr
    result = cli("sweep", str(small_study(tmp_path, "flag")), "--create-only", "--pack", "2")
    assert result.returncode == 2 and "--pack" in result.stderr and "tuner worker" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def check_packed_sweep(url: str, name: str, n: int, k: int, epochs: int) -> list[optuna.trial.FrozenTrial]:
    ts = trials(url, name)
    assert sorted(t.number for t in ts) == list(range(n)), [(t.number, t.state.name) for t in ts]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ts), [t.state.name for t in ts]
    assert any(t.state == TrialState.PRUNED for t in ts), "the pruner stopped some trials"
    for t in ts:
        history = t.user_attrs["history"]
        assert t.user_attrs["epochs"] == len(history) == len(t.intermediate_values)
        if t.user_attrs.get("diverged"):  # lr up to 1: some diverge, in their first epoch too
            assert t.state == TrialState.PRUNED and t.user_attrs["diverged_at"]["epoch"] == len(history) + 1
        else:
            assert len(history) >= 1
        assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
        assert [t.intermediate_values[h["epoch"]] for h in history] == [h["val_accuracy"] for h in history]
        assert t.user_attrs["params"]["training"]["epochs"] == epochs
        if t.state == TrialState.COMPLETE:
            assert len(history) == epochs and t.value == history[-1]["val_accuracy"]
    return ts


@pytest.mark.timeout(300)
def test_packed_sweep_on_sqlite_runs_exactly_n_trials(tmp_path: Path) -> None:
    path = small_study(tmp_path, n_trials=10)
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0"}
    run = Proc(tmp_path, "sweep", "sweep", str(path), "--pack", "4", "--storage", url, env=env)
    assert run.wait(240) == 0, run.output()
    assert "Traceback" not in run.stderr()
    ts = check_packed_sweep(url, "small", 10, 4, 3)
    assert overlap(ts) == 4  # four trials at a time, never more; freed slots were refilled
    assert "pack: 4" in run.stderr()


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_two_packed_workers_on_postgres_run_exactly_n_trials(tmp_path: Path, pg_url: str) -> None:
    path = small_study(tmp_path, n_trials=11, training={"pack": 3})  # the study file's setting
    env = {**os.environ, "TUNER_STORAGE": pg_url, "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0"}
    run = Proc(tmp_path, "sweep", "sweep", str(path), "--workers", "2", env=env)
    assert run.wait(240) == 0, run.output()
    ts = check_packed_sweep(pg_url, "small", 11, 3, 3)
    assert 3 < overlap(ts) <= 6


# ---------------------------------------------------------------------------------------------
# Faults: kill -9 and signals
# ---------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize("then", ["packed", "alone"])
def test_kill9_of_a_packed_worker_then_its_trials_resume(tmp_path: Path, pg_url: str, then: str) -> None:
    epochs = 10
    name = create_study(tmp_path, pg_url, epochs=epochs, n_trials=3)
    art = tmp_path / "artifacts"
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(art))
    first = Proc(tmp_path, "w1", "worker", "--study-name", name, "--pack", "3", env=env)
    wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, name, 2, 6), 120)
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    dead = {t.number: t for t in trials(pg_url, name) if t.state == TrialState.RUNNING}
    assert len(dead) == 3, "the three trials ran together"
    saved = {n: t.user_attrs.get("checkpoint", {}).get("epoch", 0) for n, t in dead.items()}

    second = Proc(tmp_path, "w2", "worker", "--study-name", name, "--pack", "3" if then == "packed" else "1", env=env)
    assert second.wait(180) == 0, second.output()
    assert "Traceback" not in second.stderr()
    ts = assert_study_done(pg_url, name, 3)
    for number, epoch in saved.items():
        retry = next(t for t in ts if t.system_attrs.get("retry_history", [None])[-1] == number)
        assert retry.state == TrialState.COMPLETE and retry.params == dead[number].params
        if epoch:
            assert retry.user_attrs["resumed_from_epoch"] in (epoch, epoch + 1)
            assert retry.user_attrs["resumed_from_trial"] == number
        assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))  # the whole curve
        for step, value in dead[number].intermediate_values.items():  # continued where it stopped
            if step <= epoch:
                assert retry.intermediate_values[step] == pytest.approx(value)
    assert [p.name for p in art.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_sigint_stops_a_pack_at_an_epoch_boundary_and_the_next_run_resumes(tmp_path: Path, pg_url: str) -> None:
    path = study_file(tmp_path, n_trials=4)
    art = tmp_path / "artifacts"
    env = env_for(pg_url, TUNER_ARTIFACT_DIR=str(art))
    run = Proc(tmp_path, "sweep1", "sweep", str(path), "--pack", "3", env=env)
    wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, "faulty", 1, EPOCHS - 2), 120)
    run.popen.send_signal(signal.SIGINT)
    assert run.wait(60) == 130, run.output()
    err = run.stderr()
    assert "Traceback" not in err and "interrupted by SIGINT: trials" in err, err

    ts = trials(pg_url, "faulty")
    assert TrialState.RUNNING not in [t.state for t in ts], [(t.number, t.state.name) for t in ts]
    stopped = [t for t in ts if t.user_attrs.get("interrupted")]
    assert len(stopped) == 3 and all(t.state == TrialState.FAIL for t in stopped)  # the whole pack
    waiting = [t for t in ts if t.state == TrialState.WAITING]
    assert {t.system_attrs["retry_history"][-1] for t in waiting} == {t.number for t in stopped}
    epochs = {t.number: t.user_attrs["checkpoint"]["epoch"] for t in stopped}
    assert all(1 <= e < EPOCHS for e in epochs.values())
    assert len(set(epochs.values())) == 1  # one boundary for the whole pack

    started = time.monotonic()
    again = Proc(tmp_path, "sweep2", "sweep", str(path), "--pack", "3", env=env)
    assert again.wait(180) == 0, again.output()
    assert time.monotonic() - started < 180
    ts = assert_study_done(pg_url, "faulty", 4)
    for number, epoch in epochs.items():
        retry = next(t for t in ts if t.system_attrs.get("retry_history", [None])[-1] == number)
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == epoch
        assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    assert [p.name for p in art.iterdir() if not p.name.startswith(".")] == []
