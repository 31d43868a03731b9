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
    """Four `tuner sweep --create-only` (and on PostgreSQL a `tuner studies`) started at once on an empty database,
    three rounds (each on a fresh database): every one exits 0, and the study exists once."""
    import optuna

    path = study_file(tmp_path, n_trials=2, epochs=1)
    for round_ in range(3):
        if backend == "postgresql":
            url = request.getfixturevalue("pg_url") if round_ == 0 else _fresh_pg(request)
        else:
            url = f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
        tuner = [sys.executable, "-m", "tuner"]
        readers = [[*tuner, "studies", "--storage", url]] if backend == "postgresql" else []  # a SQLite file must exist
        runs = _together([*([[*tuner, "sweep", str(path), "--create-only", "--storage", url]] * 4), *readers],
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
