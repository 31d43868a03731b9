"""A tuner database is an Optuna database: Optuna's own tools work on it, beside running workers.

`optuna.copy_study` into and out of it, `study.add_trials`, Optuna's `RetryFailedTrialCallback`,
and a plain ask-and-tell trial while tuner workers run (its worker never fails it as stale)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState
from sweeps import study_file

from tuner.engine.sweep import Flags, prepare_study, run_sweep
from tuner.storage import keys
from tuner.study.config import load_study_file

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuner.db'}"
    return request.getfixturevalue("pg_url")


def _swept(tmp_path, url: str, n: int = 3) -> list[optuna.trial.FrozenTrial]:
    config = load_study_file(study_file(tmp_path, n_trials=n, epochs=2))
    run_sweep(config, Flags(storage=url, device="cpu", worker_index=0, checkpoint_every=0.0))
    return optuna.load_study(study_name="small", storage=url).get_trials()


def test_copy_study_into_and_out_of_a_tuner_database(tmp_path, url):
    ts = _swept(tmp_path, url)
    out = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name="small", from_storage=url, to_storage=out, to_study_name="copied")
    copied = optuna.load_study(study_name="copied", storage=out).get_trials()
    assert [(t.state, t.value, t.params) for t in copied] == [(t.state, t.value, t.params) for t in ts]
    assert copied[0].user_attrs[keys.PARAMS] == ts[0].user_attrs[keys.PARAMS]
    # back into the tuner database, beside the original (trials keep their system attrs, tokens too)
    optuna.copy_study(from_study_name="copied", from_storage=out, to_storage=url, to_study_name="back")
    back = optuna.load_study(study_name="back", storage=url).get_trials()
    assert [t.system_attrs for t in back] == [t.system_attrs for t in ts]
    assert [t.intermediate_values for t in back] == [t.intermediate_values for t in ts]


def test_add_trials_and_a_continued_sweep(tmp_path, url):
    ts = _swept(tmp_path, url)
    config = load_study_file(study_file(tmp_path, name="other", n_trials=5, epochs=2))
    prepare_study(config, url, None).engine.dispose()
    other = optuna.load_study(study_name="other", storage=url)
    other.add_trials(ts)  # three finished trials, copied with every attr
    assert len(other.get_trials()) == 3
    run_sweep(config, Flags(storage=url, device="cpu", worker_index=0, checkpoint_every=0.0))
    after = optuna.load_study(study_name="other", storage=url).get_trials()
    assert len(after) == 5 and all(t.state.is_finished() for t in after)  # the added trials count


def test_optunas_retry_failed_trial_callback_on_a_tuner_database(tmp_path, url):
    config = load_study_file(study_file(tmp_path, n_trials=3, epochs=2))
    prepare_study(config, url, None).engine.dispose()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=1, grace_period=2,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
    study = optuna.load_study(study_name="small", storage=storage)
    crashed = study.ask()
    crashed.suggest_float("lr", 1e-3, 1e-1, log=True)
    storage.record_heartbeat(crashed._trial_id)
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)  # Optuna's own path: fail it, then its retry callback
    ts = study.get_trials()
    assert ts[0].state == TrialState.FAIL
    copy = ts[1]
    assert copy.state == TrialState.WAITING and copy.system_attrs["retry_history"] == [0]
    storage.engine.dispose()
    # a tuner sweep runs Optuna's retry copy first (its params are fixed), then fills the budget
    run_sweep(config, Flags(storage=url, device="cpu", worker_index=0, checkpoint_every=0.0))
    ts = optuna.load_study(study_name="small", storage=url).get_trials()
    assert ts[1].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert ts[1].params["lr"] == pytest.approx(crashed.params["lr"])
    assert keys.budget_used(ts) == 3 and len(ts) == 4  # the failed trial is replaced by its copy


@pytest.mark.timeout(240)
def test_a_plain_ask_and_tell_trial_beside_running_workers(tmp_path, url):
    """A trial asked by plain Optuna, with no heartbeat, outlives the workers' grace period: they
    never fail it, and its `tell` works after the sweep."""
    path = study_file(tmp_path, n_trials=6, epochs=3, heartbeat={"interval": 1, "grace_period": 2})
    config = load_study_file(path)
    prepare_study(config, url, None).engine.dispose()
    plain_study = optuna.load_study(study_name="small", storage=url)
    plain = plain_study.ask()
    plain.suggest_float("lr", 1e-3, 1e-1, log=True)
    env = {**os.environ, "TUNER_STORAGE": url, "OMP_NUM_THREADS": "1", "TUNER_CHECKPOINT_EVERY": "0",
           "TUNER_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    run = subprocess.run([sys.executable, "-m", "tuner", "sweep", str(path), "--workers", "2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr
    ts = {t.number: t for t in optuna.load_study(study_name="small", storage=url).get_trials()}
    assert ts[plain.number].state == TrialState.RUNNING  # 2 s of grace passed many times over
    assert plain_study.tell(plain, 0.25).state == TrialState.COMPLETE
    ts = optuna.load_study(study_name="small", storage=url).get_trials()
    assert keys.budget_used(ts) == 6  # the plain trial counts against the budget, the workers filled the rest
