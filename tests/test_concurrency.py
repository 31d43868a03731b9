"""Several hosts on one study: the defects that appear only when processes start together or
disagree (creators racing on a fresh database, mixed heartbeat settings, sampler seeds, warm
starts and the budget). Real processes, real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sweeps import study_file

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    return {**env, "TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1"}


def _together(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once; wait for all."""
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    out = []
    for c, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_creators_started_together_on_a_fresh_database_all_succeed(tmp_path, request, backend):
    """Three `tuner sweep --create-only` (and on PostgreSQL a `tuner studies`) started at once on an empty
    database, two rounds (each on a fresh database): every one exits 0, and the study exists once. (Before
    table creation was serialized, two creators failed 5 runs of 5 on SQLite and 4 of 4 on PostgreSQL.)"""
    import optuna

    path = study_file(tmp_path, n_trials=2, epochs=1)
    for round_ in range(2):
        if backend == "postgresql":
            url = request.getfixturevalue("pg_url") if round_ == 0 else _fresh_pg(request)
        else:
            url = f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
        tuner = [sys.executable, "-m", "tuner"]
        readers = [[*tuner, "studies", "--storage", url]] if backend == "postgresql" else []  # a SQLite file must exist
        runs = _together([*([[*tuner, "sweep", str(path), "--create-only", "--storage", url]] * 3), *readers],
                         tmp_path)
        for run in runs:
            assert run.returncode == 0, f"round {round_}: {run.args[3]} exited {run.returncode}: {run.stderr}"
            assert "Traceback" not in run.stderr
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["small"]


def _fresh_pg(request) -> str:
    """Another fresh PostgreSQL database for the same test (dropped at the end)."""
    import uuid

    import sqlalchemy as sa

    from conftest import PG_ADMIN_URL

    name = f"tuner_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()

    request.addfinalizer(drop)
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_url_is_refused_before_anything_runs(tmp_path, capsys, url):
    from conftest import cli_main

    path = study_file(tmp_path, n_trials=2, epochs=1)
    code, out, err = cli_main(capsys, "sweep", str(path), "--storage", url)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "in-memory SQLite" in lines[0] and "sqlite:///" in lines[0], err
    assert out == ""  # not even the sweep's first line


# ---------------------------------------------------------------------------------------------
# Mixed heartbeat settings: the grace period is the study's
# ---------------------------------------------------------------------------------------------

def _worker(tmp_path: Path, url: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tuner", "worker", "--study-name", "small", "--storage", url,
                             "--device", "cpu", *flags], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["default-beside-fast", "study-fast-beside-slow"])
def test_workers_with_different_heartbeats_never_fail_each_others_trials(tmp_path, case):
    """A: a worker beating every 60 s (the default) beside one started with --heartbeat-interval 1,
    which by its own rule would judge a trial stale after 2 s. B: a study with heartbeat {interval 1,
    grace_period 2} and a worker started with --heartbeat-interval 30 beside one that follows the
    study. Trials last several seconds; every trial must complete, none failed or retried."""
    import optuna
    from optuna.trial import TrialState

    from tuner.engine.sweep import prepare_study
    from tuner.storage import keys
    from tuner.study.config import load_study_file

    beat = {"heartbeat": {"interval": 1, "grace_period": 2}} if case == "study-fast-beside-slow" else {}
    path = study_file(tmp_path, n_trials=4, epochs=8, dataset="synthetic:4000", pruner="none", sampler="random",
                      space={"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}, **beat)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(load_study_file(path), url, None).engine.dispose()
    slow, fast = (["--heartbeat-interval", "30"], []) if beat else ([], ["--heartbeat-interval", "1"])
    procs = [_worker(tmp_path, url, *slow), _worker(tmp_path, url, *fast)]
    errs = [p.communicate(timeout=500)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trials = optuna.load_study(study_name="small", storage=url).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, [(t.number, t.state.name) for t in trials]
    assert all(t.user_attrs.get("seconds", 0) > 2.5 for t in trials)  # longer than the fast worker's own grace
    assert all(not keys.history(t) for t in trials)
    grace = optuna.load_study(study_name="small", storage=url).user_attrs[keys.GRACE]
    assert grace == 120 if not beat else grace == 60  # twice the slowest worker's interval


# ---------------------------------------------------------------------------------------------
# Two sweeps on one study sample apart
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_two_sweeps_on_one_study_sample_different_configs(tmp_path, pg_url):
    import optuna

    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    path = study_file(tmp_path, n_trials=6, epochs=1, pruner="none", sampler="random")
    prepare_study(load_study_file(path), pg_url, None).engine.dispose()
    cmd = [sys.executable, "-m", "tuner", "sweep", str(path), "--storage", pg_url, "--device", "cpu"]
    runs = _together([cmd, cmd], tmp_path)
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    trials = optuna.load_study(study_name="small", storage=pg_url).get_trials(deepcopy=False)
    assert len(trials) == 6
    lrs = [t.params["lr"] for t in trials]
    assert len(set(lrs)) == len(lrs), sorted(lrs)


# ---------------------------------------------------------------------------------------------
# Warm starts under the budget gate
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_concurrent_warm_starts_queue_each_config_once(tmp_path, monkeypatch):
    """Two warm starts of one new study at once, with a 1 s pause injected between reading the study
    and queuing: the configs are queued once, and the study stays within n_trials."""
    import threading
    import time

    import optuna

    from tuner.engine import warmstart
    from tuner.engine.sweep import prepare_study
    from tuner.storage import keys
    from tuner.study.config import load_study_file

    source = f"sqlite:///{tmp_path / 'source.db'}"
    src = optuna.create_study(study_name="src", storage=source, direction="maximize")
    for i in range(4):
        src.add_trial(optuna.trial.create_trial(params={"lr": 10 ** (-3 + i / 2)}, value=0.1 * i,
                                                distributions={"lr": optuna.distributions.FloatDistribution(
                                                    1e-4, 1.0, log=True)}))
    config = load_study_file(study_file(tmp_path, n_trials=6, epochs=1))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(config, url, None).engine.dispose()  # the study exists, with no trial yet
    real = warmstart.choose

    def slow_choose(*args, **kwargs):
        time.sleep(1.0)  # both warm starts have read "not warm-started, no trials" by now
        return real(*args, **kwargs)

    monkeypatch.setattr(warmstart, "choose", slow_choose)
    errors: list[BaseException] = []

    def warm() -> None:
        try:
            ws = warmstart.WarmStart([f"{source}#src"], 3)
            prepare_study(config, url, None, warm_start=ws).engine.dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=warm) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    trials = optuna.load_study(study_name="small", storage=url).get_trials(deepcopy=False)
    assert len(trials) == 3, [(t.number, t.params) for t in trials]
    assert keys.budget_used(trials) <= 6


def _race_plain_optuna(url: str) -> list[BaseException]:
    """Two tuner opens and a plain `RDBStorage(url)` at the same moment: tuner's errors."""
    import threading

    import optuna

    from tuner.storage.database import open_storage

    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def ours() -> None:
        try:
            start.wait()
            open_storage(url).engine.dispose()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    def plain() -> None:
        start.wait()
        try:
            optuna.storages.RDBStorage(url).engine.dispose()
        except Exception:  # noqa: BLE001 - plain Optuna may lose the race itself; tuner must not
            pass

    threads = [threading.Thread(target=f) for f in (ours, ours, plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tuner_opens_a_fresh_database_beside_a_plain_optuna_creator(tmp_path, request, backend):
    """A plain Optuna process (or optuna-dashboard) creating the tables at the same moment does not
    take tuner's schema lock; tuner's open tries again when the failure reads like that race."""
    for round_ in range(3):
        if backend == "postgresql":
            url = request.getfixturevalue("pg_url") if round_ == 0 else _fresh_pg(request)
        else:
            url = f"sqlite:///{tmp_path / f'plain{round_}.db'}"
        errors = _race_plain_optuna(url)
        assert not errors, f"round {round_}: {errors}"
