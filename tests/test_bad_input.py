"""Malformed input through the real CLI: one line naming the problem, the right exit code, no
traceback, and nothing created or changed in the study database or the artifact store.

Each case runs in its own copy of a workspace that holds a study database (`tuner.db`, study
`base`), its artifact store (`tuner.db.artifacts/`), a valid study file and a valid params file.
The cases run a few at a time (each CLI start imports torch) and are checked one test per case.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

GOOD_STUDY = {
    "name": "base", "direction": "maximize", "dataset": "synthetic:200", "model": "tiny", "epochs": 2,
    "batch_size": 64, "seed": 0, "n_trials": 2, "sampler": "random", "pruner": "none",
    "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "schedule": {"choices": ["constant", "cosine"]}},
}
GOOD_PARAMS = {
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0,
                  "amsgrad": False},
    "schedule": {"name": "cosine", "warmup_fraction": 0.0},
    "clipping": {"mode": "none", "threshold": None},
    "training": {"model": "tiny", "epochs": 1, "batch_size": 64, "dataset": "synthetic:200", "seed": 0},
}
MARKER = "PWNED-marker"


class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def study(**changes: object) -> str:
    return _yaml({**GOOD_STUDY, **changes})


def params(section: str, **changes: object) -> str:
    data = {k: dict(v) for k, v in GOOD_PARAMS.items()}
    data[section].update(changes)
    return _yaml(data)


def _write_npz_corrupt(ws: Path) -> None:
    (ws / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)


def _write_npz_shape(ws: Path) -> None:
    x = np.zeros((120, 28, 28), dtype=np.uint8)  # MNIST-shaped, not 32x32x3
    y = np.zeros(120, dtype=np.int64)
    np.savez(ws / "shape.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])


MODS = """
from torch import nn

VALUE = 3


def not_a_module(num_classes):
    return [1, 2]


def bad_forward(num_classes):
    return nn.Linear(5, num_classes)


def wrong_shape(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))


def good(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
"""


def _write_npz_own(ws: Path, case: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8)
    y = np.arange(60) % 2
    if case == "labels":  # y_train has 0..1, y_test a 4
        np.savez(ws / "labels.npz", x_train=x, y_train=y, x_test=x[:20], y_test=np.where(np.arange(20) == 3, 4, 0))
    elif case == "float":
        np.savez(ws / "float.npz", x_train=x.astype(np.float32), y_train=y, x_test=x[:20], y_test=y[:20])
    else:  # grey train images, colour test images
        np.savez(ws / "mixed.npz", x_train=x, y_train=y, x_test=np.zeros((20, 28, 28, 3), np.uint8), y_test=y[:20])


def _write_empty_image_folder(ws: Path) -> None:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (ws / "imgs" / split / name).mkdir(parents=True)


def _write_ckpt_corrupt(ws: Path) -> None:
    (ws / "corrupt.pt").write_bytes(os.urandom(4096))


def _write_ckpt_tampered(ws: Path) -> None:
    torch.save({"format": "tuner-checkpoint-v1", "payload": Evil(ws / MARKER)}, ws / "tampered.pt")


@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    says: list[str]  # substrings of the one stderr line (case-insensitive)
    files: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # study files
    Case("study-yaml-syntax", ["sweep", "bad.yaml"], 2, ["bad.yaml", "yaml syntax error", "line"],
         files={"bad.yaml": "name: base\nspace: {lr: [1, 2\n"}),
    Case("study-empty", ["sweep", "bad.yaml"], 2, ["bad.yaml", "empty"], files={"bad.yaml": ""}),
    Case("study-missing", ["sweep", "nope.yaml"], 2, ["nope.yaml", "not found"]),
    Case("study-directory", ["sweep", "adir"], 2, ["adir", "directory"], setup=lambda ws: (ws / "adir").mkdir()),
    Case("study-not-a-mapping", ["sweep", "bad.yaml"], 2, ["bad.yaml", "mapping"], files={"bad.yaml": "- a\n- b\n"}),
    Case("study-wrong-type", ["sweep", "bad.yaml"], 2, ["epochs", "whole number"], files={"bad.yaml": study(epochs="many")}),
    Case("study-unknown-key", ["sweep", "bad.yaml"], 2, ["colour", "unknown key"], files={"bad.yaml": study(colour="red")}),
    Case("study-out-of-range", ["sweep", "bad.yaml"], 2, ["n_trials", ">= 1"], files={"bad.yaml": study(n_trials=0)}),
    Case("study-unknown-sampler", ["sweep", "bad.yaml"], 2, ["sampler", "annealing"],
         files={"bad.yaml": study(sampler="annealing")}),
    Case("study-unknown-pruner", ["sweep", "bad.yaml"], 2, ["pruner", "guillotine"],
         files={"bad.yaml": study(pruner="guillotine")}),
    Case("study-unknown-schedule", ["sweep", "bad.yaml"], 2, ["schedule", "warp"],
         files={"bad.yaml": study(space={"schedule": {"choices": ["cosine", "warp"]}})}),
    Case("study-unknown-model", ["sweep", "bad.yaml"], 2, ["model", "resnet9000"],
         files={"bad.yaml": study(model="resnet9000")}),
    Case("study-heartbeat-grace", ["sweep", "bad.yaml"], 2, ["heartbeat.grace_period"],
         files={"bad.yaml": study(heartbeat={"interval": 10, "grace_period": 5})}),
    Case("study-schedule-aware-not-bool", ["sweep", "bad.yaml"], 2, ["bad.yaml", "pruner.schedule_aware", "true or false"],
         files={"bad.yaml": study(pruner={"name": "median", "schedule_aware": "yes"})}),
    Case("study-changed-space", ["sweep", "bad.yaml"], 2, ["already exists", "space"],
         files={"bad.yaml": study(space={"lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True}})}),
    # params files
    Case("params-yaml-syntax", ["train", "bad.yaml"], 2, ["bad.yaml", "yaml syntax error"],
         files={"bad.yaml": "optimizer: {lr: 0.1\n"}),
    Case("params-wrong-type", ["train", "bad.yaml"], 2, ["optimizer.lr", "number"],
         files={"bad.yaml": params("optimizer", lr="fast")}),
    Case("params-unknown-key", ["train", "bad.yaml"], 2, ["optimizer.momentum", "unknown key"],
         files={"bad.yaml": params("optimizer", momentum=0.9)}),
    Case("params-out-of-range", ["train", "bad.yaml"], 2, ["optimizer.lr", "> 0"],
         files={"bad.yaml": params("optimizer", lr=-1)}),
    Case("params-unknown-schedule", ["train", "bad.yaml"], 2, ["schedule.name", "warp"],
         files={"bad.yaml": params("schedule", name="warp")}),
    Case("params-unknown-model", ["train", "bad.yaml"], 2, ["training.model", "resnet9000"],
         files={"bad.yaml": params("training", model="resnet9000")}),
    Case("params-bad-override", ["train", "good-params.yaml", "--epochs", "0"], 2, ["--epochs", ">= 1"]),
    # storage and studies
    Case("study-name-unknown", ["worker", "--study-name", "nope"], 2, ["study 'nope' not found", "base"]),
    Case("best-unknown-study", ["best", "nope"], 2, ["study 'nope' not found"]),
    Case("storage-unreachable", ["studies", "--storage", "postgresql+psycopg://tuner:pw@127.0.0.1:9/db"], 1,
         ["unreachable", "127.0.0.1"]),
    Case("storage-bad-scheme", ["studies", "--storage", "mongodb://db.example/x"], 2, ["scheme", "mongodb"]),
    Case("storage-not-a-url", ["studies", "--storage", "just words"], 2, ["not a sqlalchemy url"]),
    Case("storage-missing-sqlite", ["studies", "--storage", "sqlite:///missing.db"], 2, ["missing.db"]),
    Case("storage-password-file-missing", ["studies"], 2, ["TUNER_STORAGE_PASSWORD_FILE"],
         env={"TUNER_STORAGE_PASSWORD_FILE": "no-such-secret"}),
    Case("db-retry-bound", ["studies"], 2, ["TUNER_DB_RETRY_SECONDS"], env={"TUNER_DB_RETRY_SECONDS": "-5"}),
    # flags
    Case("sweep-n-trials", ["sweep", "good-study.yaml", "--n-trials", "0"], 2, ["--n-trials", ">= 1"]),
    Case("sweep-warm-start-missing", ["sweep", "good-study.yaml", "--warm-start", "nope"], 2,
         ["--warm-start", "'nope' not found"]),
    Case("sweep-warm-start-other-storage-missing", ["sweep", "good-study.yaml", "--warm-start", "sqlite:///gone.db#base"],
         2, ["--warm-start", "'base' not found"]),
    Case("sweep-warm-top", ["sweep", "good-study.yaml", "--warm-start", "base", "--warm-top", "0"], 2,
         ["--warm-top", ">= 1"]),
    Case("sweep-keep-policy", ["sweep", "good-study.yaml", "--keep-checkpoints", "all"], 2, ["--keep-checkpoints", "all"]),
    Case("create-only-workers", ["sweep", "good-study.yaml", "--create-only", "--workers", "2"], 2,
         ["--workers", "tuner worker"]),
    Case("create-only-device", ["sweep", "good-study.yaml", "--create-only", "--device", "cpu"], 2,
         ["--device", "--create-only"]),
    Case("sweep-checkpoint-every", ["sweep", "good-study.yaml", "--checkpoint-every", "-1"], 2,
         ["--checkpoint-every", ">= 0"]),
    Case("worker-checkpoint-every-env", ["worker", "--study-name", "base"], 2, ["TUNER_CHECKPOINT_EVERY", "number"],
         env={"TUNER_CHECKPOINT_EVERY": "soon"}),
    Case("worker-heartbeat", ["worker", "--study-name", "base", "--heartbeat-interval", "0"], 2, ["--heartbeat-interval"]),
    Case("worker-workers-per-gpu", ["worker", "--study-name", "base", "--workers-per-gpu", "0"], 2,
         ["--workers-per-gpu", ">= 1"]),
    Case("worker-device-not-visible", ["worker", "--study-name", "base", "--workers-per-gpu", "1", "--device", "cuda:2"],
         2, ["--device", "cuda:2", "2 gpus are visible"], env={"CUDA_VISIBLE_DEVICES": "0,1"}),
    Case("sweep-device-not-visible", ["sweep", "good-study.yaml", "--workers", "2", "--device", "cuda:1"], 2,
         ["--device", "cuda:1", "no gpu is visible"], env={"CUDA_VISIBLE_DEVICES": "-1"}),
    Case("sweep-device-malformed", ["sweep", "good-study.yaml", "--workers-per-gpu", "2", "--device", "cuda:x"], 2,
         ["--device", "cuda:N"], env={"CUDA_VISIBLE_DEVICES": "0"}),
    Case("dashboard-port", ["dashboard", "--port", "70000"], 2, ["--port"]),
    Case("unknown-flag", ["sweep", "good-study.yaml", "--frobnicate"], 2, ["--frobnicate"]),
    # data files
    Case("npz-corrupt", ["train", "good-params.yaml", "--dataset", "corrupt.npz"], 2, ["corrupt.npz"],
         setup=_write_npz_corrupt),
    Case("npz-wrong-shape", ["train", "good-params.yaml", "--dataset", "shape.npz"], 2, ["shape.npz", "shape"],
         setup=_write_npz_shape),
    Case("npz-labels-out-of-range", ["train", "good-params.yaml", "--dataset", "labels.npz"], 2,
         ["labels.npz", "y_test", "0..1"], setup=lambda ws: _write_npz_own(ws, "labels")),
    Case("npz-not-uint8", ["train", "good-params.yaml", "--dataset", "float.npz"], 2, ["float.npz", "uint8"],
         setup=lambda ws: _write_npz_own(ws, "float")),
    Case("npz-shapes-disagree", ["train", "good-params.yaml", "--dataset", "mixed.npz"], 2,
         ["mixed.npz", "x_test", "agree"], setup=lambda ws: _write_npz_own(ws, "mixed")),
    Case("imagefolder-empty", ["train", "good-params.yaml", "--dataset", "imagefolder:imgs"], 2,
         ["imagefolder:imgs", "train/", "no images"], setup=_write_empty_image_folder),
    # models by reference: imported, built and run on one dummy batch when the file loads
    Case("model-not-importable", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model", "nosuchpkg", "ModuleNotFoundError"],
         files={"bad.yaml": study(model="nosuchpkg.nets:build")}),
    Case("model-import-fails", ["train", "bad.yaml"], 2, ["bad.yaml", "training.model", "SyntaxError"],
         files={"bad.yaml": params("training", model="broken.py:build"), "broken.py": "def build(:\n"}),
    Case("model-file-missing", ["train", "bad.yaml"], 2, ["bad.yaml", "training.model", "nope.py", "not found"],
         files={"bad.yaml": params("training", model="nope.py:build")}),
    Case("model-no-such-name", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model", "no attribute", "missing"],
         files={"bad.yaml": study(model="mods.py:missing"), "mods.py": MODS}),
    Case("model-not-callable", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model", "not callable"],
         files={"bad.yaml": study(model="mods.py:VALUE"), "mods.py": MODS}),
    Case("model-not-a-module", ["train", "bad.yaml"], 2, ["bad.yaml", "training.model", "not a torch.nn.module"],
         files={"bad.yaml": params("training", model="mods.py:not_a_module"), "mods.py": MODS}),
    Case("model-forward-fails", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model", "forward pass", "2×3×32×32"],
         files={"bad.yaml": study(model="mods.py:bad_forward"), "mods.py": MODS}),
    Case("model-wrong-output", ["train", "bad.yaml"], 2, ["bad.yaml", "training.model", "(2, 7)", "(2, 10)"],
         files={"bad.yaml": params("training", model="mods.py:wrong_shape"), "mods.py": MODS}),
    Case("model-options-shape-key", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model_options.num_classes", "dataset"],
         files={"bad.yaml": study(model="mods.py:good", model_options={"num_classes": 3}), "mods.py": MODS}),
    Case("model-options-for-a-name", ["sweep", "bad.yaml"], 2, ["bad.yaml", "model_options", "reference"],
         files={"bad.yaml": study(model_options={"width": 3})}),
    # checkpoints
    Case("checkpoint-corrupt", ["train", "good-params.yaml", "--checkpoint", "corrupt.pt"], 1,
         ["corrupt.pt", "corrupt"], setup=_write_ckpt_corrupt),
    Case("checkpoint-tampered", ["train", "good-params.yaml", "--checkpoint", "tampered.pt"], 1,
         ["tampered.pt", "refused"], setup=_write_ckpt_tampered),
]


def snapshot(ws: Path) -> dict[str, object]:
    """Every file (path, size, digest) and the database's rows."""
    files = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        files[rel] = "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    db = ws / "tuner.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = list(conn.iterdump())
    return {"files": files, "db": rows}


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory) -> Path:
    from tuner.engine.sweep import prepare_study
    from tuner.storage.database import StorageURL
    from tuner.study.config import parse_study
    from tuner.study.settings import artifact_dir

    ws = tmp_path_factory.mktemp("bad-input-base")
    (ws / "good-study.yaml").write_text(study())
    (ws / "good-params.yaml").write_text(_yaml(GOOD_PARAMS))
    url = f"sqlite:///{ws / 'tuner.db'}"
    prepare_study(parse_study(GOOD_STUDY, file="good-study.yaml"), url, None).engine.dispose()
    store = artifact_dir(None, StorageURL.parse(url), env={})
    store.mkdir()
    (store / "00000000-0000-0000-0000-000000000000").write_bytes(b"a checkpoint artifact")
    return ws


def _run(case: Case, base: Path, root: Path) -> tuple[subprocess.CompletedProcess[str], dict, dict, Path]:
    ws = root / case.id
    shutil.copytree(base, ws)
    for name, text in case.files.items():
        (ws / name).write_text(text)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    env.update({"TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1", **case.env})
    run = subprocess.run([sys.executable, "-m", "tuner", *case.args], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=240)
    return run, before, snapshot(ws), ws


@pytest.fixture(scope="module")
def results(base_workspace, tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("bad-input-cases")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.id: pool.submit(_run, c, base_workspace, root) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


def test_there_are_enough_cases():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results):
    run, before, after, ws = results[case.id]
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1, run.stderr
    line = lines[0].lower()
    for part in case.says:
        assert part.lower() in line, (part, lines[0])
    assert run.returncode == case.code, (run.returncode, lines[0])
    assert after == before, "the workspace (database, artifact store, files) changed"
    assert not (ws / MARKER).exists(), "the tampered checkpoint ran code"
    assert "pw@" not in run.stderr  # a password in a storage URL is never shown
