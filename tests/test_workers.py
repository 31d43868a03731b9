"""Several workers on one study, on every storage backend: exactly n_trials, unique numbers,
none left RUNNING. Also `tuner worker` joining a study from the storage alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sweeps import assert_clean_finish, study_file


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path):
    """Every storage case runs on each backend (PostgreSQL: a fresh database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


def test_two_workers_share_one_study(tmp_path, cli, storage_url):
    path = study_file(tmp_path, n_trials=7, epochs=2)
    run = cli("sweep", str(path), "--storage", storage_url, "--workers", "2", timeout=600)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(storage_url, "small", 7)
    assert "best value" in run.stdout


def test_standalone_workers_join_from_storage(tmp_path, storage_url):
    from tuner.config import load_study_file
    from tuner.sweep import prepare_study

    prepare_study(load_study_file(study_file(tmp_path, n_trials=6, epochs=2)), storage_url, None)
    env = {**os.environ, "TUNER_STORAGE": storage_url}
    procs = [subprocess.Popen([sys.executable, "-m", "tuner", "worker", "--study-name", "small"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert_clean_finish(storage_url, "small", 6)
    ran = [int(o[0].strip().splitlines()[-1].split()[2]) for o in outs]  # "worker done: N trials"
    assert sum(ran) == 6


def test_worker_on_unknown_study_exits_2(tmp_path, cli, storage_url):
    from tuner.config import load_study_file
    from tuner.sweep import prepare_study

    prepare_study(load_study_file(study_file(tmp_path, n_trials=1)), storage_url, None)
    run = cli("worker", "--study-name", "nope", "--storage", storage_url)
    assert run.returncode == 2 and "study 'nope' not found" in run.stderr




def test_gpu_pinning_round_robin():
    """`--workers N` pins one GPU per worker when several are visible; `--workers-per-gpu K` gives
    K workers each GPU; with one GPU or none, workers are not pinned."""
    from tuner.sweep import assign_gpus

    assert assign_gpus(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert assign_gpus(3, ["2", "5", "7"]) == ["2", "5", "7"]
    assert assign_gpus(2, ["0"]) == [None, None]
    assert assign_gpus(2, []) == [None, None]


def test_workers_per_gpu_without_gpu_is_a_note(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run = cli("sweep", str(study_file(tmp_path, n_trials=1, epochs=1)), "--storage", url, "--workers-per-gpu", "2",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "--workers-per-gpu ignored: no GPU visible" in run.stderr and "1 worker" in run.stdout
    bad = cli("sweep", str(study_file(tmp_path, n_trials=1, epochs=1)), "--workers-per-gpu", "0")
    assert bad.returncode == 2 and "--workers-per-gpu" in bad.stderr
