"""Real sweeps on SQLite (and PostgreSQL where the fixture has it): pruning, stored config,
continuation, refusal of a changed config, divergence, failures, export round trip, Optuna's CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from sweeps import assert_clean_finish, states, study_file, trials

from tuner.engine.sweep import Flags, prepare_study, run_sweep
from tuner.engine.worker import run_worker
from tuner.storage.database import DEFAULT_STORAGE, StorageURL
from tuner.storage.keys import CONFIG as ATTR_CONFIG
from tuner.study.config import load_study_file
from tuner.study.settings import resolve, storage_url
from tuner.training.train import SingleEngine


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_quickstart_sized_sweep_prunes_and_records(tmp_path, cli):
    url = sqlite(tmp_path)
    path = study_file(tmp_path, n_trials=10)
    run = cli("sweep", str(path), "--storage", url)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(url, "small", 10)
    counts = states(url, "small")
    assert counts.get("PRUNED", 0) >= 1 and counts.get("COMPLETE", 0) >= 1, counts
    assert "best value" in run.stdout and "trial   9" in run.stdout
    for t in trials(url, "small"):
        attrs = t.user_attrs
        assert set(attrs["params"]) == {"optimizer", "schedule", "clipping", "training"}
        assert attrs["env"]["torch"] == torch.__version__ and attrs["env"]["optuna"] == optuna.__version__
        assert attrs["env"]["device"] == "cpu" and attrs["seconds"] > 0
        assert len(attrs["history"]) == attrs["epochs"] == len(t.intermediate_values)
        if attrs["history"]:  # empty for a trial that diverged in its first epoch
            assert {"grad_norm_p50", "grad_norm_p90", "grad_norm_max", "clip_fraction"} <= set(attrs["history"][0])
        if t.state == TrialState.PRUNED and not attrs.get("diverged"):
            assert attrs["epochs"] < 3


def test_stored_config_and_continuation(tmp_path, cli):
    url = sqlite(tmp_path)
    path = study_file(tmp_path, n_trials=3)
    assert cli("sweep", str(path), "--storage", url).returncode == 0
    stored = optuna.load_study(study_name="small", storage=url).user_attrs[ATTR_CONFIG]
    assert stored == load_study_file(path).to_dict()
    assert "storage" not in stored
    more = cli("sweep", str(path), "--storage", url, "--n-trials", "5")
    assert more.returncode == 0, more.stderr
    assert_clean_finish(url, "small", 5)
    ts = trials(url, "small")
    firsts = [t.params["lr"] for t in ts[:3]]
    assert all(t.params["lr"] not in firsts for t in ts[3:]), "the continued run re-sampled the first points"


@pytest.mark.parametrize("change, key", [
    ({"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, "space"),
    ({"epochs": 4}, "epochs"),
    ({"dataset": "synthetic:1200"}, "dataset"),
])
def test_changed_config_is_refused_on_continue(tmp_path, cli, change, key):
    url = sqlite(tmp_path)
    assert cli("sweep", str(study_file(tmp_path, n_trials=1)), "--storage", url).returncode == 0
    changed = study_file(tmp_path, n_trials=3, **change)
    run = cli("sweep", str(changed), "--storage", url)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "--study-name small-v2" in lines[0], run.stderr
    assert len(trials(url, "small")) == 1  # nothing was run or written
    renamed = cli("sweep", str(changed), "--storage", url, "--study-name", "small-v2", "--n-trials", "1")
    assert renamed.returncode == 0, renamed.stderr


def test_invalid_study_file_writes_nothing(tmp_path, cli):
    path = study_file(tmp_path, space={"lr": {"low": 1.0, "high": 0.1}})
    run = cli("sweep", str(path))
    assert run.returncode == 2
    assert "space.lr.low" in run.stderr and str(path) in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "tuner.db").exists()


def test_diverged_trial_is_pruned_and_flagged(tmp_path):
    url = sqlite(tmp_path)
    config = load_study_file(study_file(tmp_path, n_trials=2, space={"lr": 50.0, "optimizer": "adam"}))
    result = run_sweep(config, Flags(storage=url))
    assert result.counts["PRUNED"] == 2 and result.best is None
    for t in trials(url, "small"):
        assert t.state == TrialState.PRUNED and t.user_attrs["diverged"] is True
        assert t.user_attrs["diverged_at"]["epoch"] == 1


def test_exception_in_a_trial_fails_it_and_the_sweep_goes_on(tmp_path):
    url = sqlite(tmp_path)
    config = load_study_file(study_file(tmp_path, n_trials=3))
    prepare_study(config, url, None)

    class Flaky(SingleEngine):
        def add(self, key, params, resume_from=None):
            if key == 1:
                self.data, real = None, self.data  # training on no data raises inside the engine
                try:
                    return super().add(key, params, resume_from)
                finally:
                    self.data = real
            return super().add(key, params, resume_from)

    ran = run_worker(resolve(Flags(storage=url, worker_index=0)), "small",
                     make_engine=lambda data, manager, settings: Flaky(data))
    assert ran == 3
    ts = trials(url, "small")
    assert [t.state for t in ts].count(TrialState.FAIL) == 1
    failed = ts[1]
    assert failed.state == TrialState.FAIL and "AttributeError" in failed.user_attrs["error"]
    assert ts[2].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_export_round_trip_and_plain_torch(tmp_path, cli):
    url = sqlite(tmp_path)
    assert cli("sweep", str(study_file(tmp_path, n_trials=4)), "--storage", url).returncode == 0
    out = tmp_path / "best.yaml"
    run = cli("export", "small", "-o", str(out), "--storage", url)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert "sqlite" not in text and str(tmp_path) not in text
    data = yaml.safe_load(text)
    best = optuna.load_study(study_name="small", storage=url).best_trial
    assert data["study"] == {"name": "small", "direction": "maximize", "dataset": "synthetic:1000",
                             "trial": best.number, "value": best.value, "selected_by": "best single run"}
    opt = data["optimizer"]
    assert all(isinstance(opt[k], float) for k in ("lr", "eps", "weight_decay"))
    assert all(isinstance(b, float) for b in opt["betas"])
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt["name"]]
    model = torch.nn.Linear(3, 2)
    optimizer = cls(model.parameters(), **{k: v for k, v in opt.items() if k != "name"})
    assert optimizer.param_groups[0]["lr"] == opt["lr"]
    train = cli("train", str(out), "--json")
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    assert result["params"]["optimizer"] == opt and result["epochs"] == 3
    assert result["val_accuracy"] == pytest.approx(best.value)  # same params, seed and data: same result


def test_best_and_studies_commands(tmp_path, cli):
    url = sqlite(tmp_path)
    assert cli("sweep", str(study_file(tmp_path, n_trials=3)), "--storage", url).returncode == 0
    listing = cli("studies", "--storage", url)
    assert listing.returncode == 0 and "small" in listing.stdout and "3" in listing.stdout
    best = cli("best", "small", "--top", "2", "--storage", url)
    value = optuna.load_study(study_name="small", storage=url).best_value
    assert best.returncode == 0 and f"{value:.4f}" in best.stdout
    missing = cli("best", "nope", "--storage", url)
    assert missing.returncode == 2 and "study 'nope' not found (studies here: small)" in missing.stderr


def test_optuna_cli_reads_the_database(tmp_path, cli):
    url = sqlite(tmp_path)
    assert cli("sweep", str(study_file(tmp_path, n_trials=3)), "--storage", url).returncode == 0
    optuna_bin = str(Path(sys.executable).with_name("optuna"))
    best = subprocess.run([optuna_bin, "best-trial", "--study-name", "small", "--storage", url, "-f", "json"],
                          capture_output=True, text=True, timeout=120)
    assert best.returncode == 0, best.stderr
    # the metric is named (tuner.insight.dashboard.publish), so Optuna's CLI shows it by name
    assert json.loads(best.stdout)["value"] == {"val_accuracy": optuna.load_study(study_name="small", storage=url).best_value}
    listing = subprocess.run([optuna_bin, "trials", "--study-name", "small", "--storage", url, "-f", "json"],
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and len(json.loads(listing.stdout)) == 3


def test_storage_precedence():
    env: dict[str, str] = {}
    assert storage_url(None, None, env).url == DEFAULT_STORAGE == "sqlite:///tuner.db"
    assert storage_url(None, "sqlite:///file.db", env).url == "sqlite:///file.db"
    env["TUNER_STORAGE"] = "sqlite:///env.db"
    assert storage_url(None, "sqlite:///file.db", env).url == "sqlite:///env.db"
    assert storage_url("sqlite:///flag.db", "sqlite:///file.db", env).url == "sqlite:///flag.db"


def test_sqlite_busy_timeout_and_postgres_pre_ping():
    assert StorageURL.parse("sqlite:///x.db").engine_kwargs() == {"connect_args": {"timeout": 60}}
    assert StorageURL.parse("postgresql+psycopg://u@h/db").engine_kwargs() == {"pool_pre_ping": True}


def test_sweep_workers_per_gpu_counts_visible_uuids(tmp_path, cli):
    """CUDA_VISIBLE_DEVICES entries that are GPU-/MIG- UUIDs are GPUs to pin to, kept as they are:
    two of them and `--workers-per-gpu 2` make four worker processes (on a CPU machine, the pinned
    children's `--device auto` trains on the CPU) that run the study to exactly n_trials."""
    url = sqlite(tmp_path)
    path = study_file(tmp_path, n_trials=5, epochs=1)
    visible = "GPU-0c5a9e3f-2b1d-4e8a-9f7c-3d2e1b0a9c8d,MIG-5f7c2a31-0b8e-5d4c-9a1f-2e3d4c5b6a79"
    run = cli("sweep", str(path), "--storage", url, "--workers-per-gpu", "2", timeout=600,
              env={"CUDA_VISIBLE_DEVICES": visible, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "4 workers" in run.stdout and "ignored" not in run.stderr
    assert_clean_finish(url, "small", 5)
