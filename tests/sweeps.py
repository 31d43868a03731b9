"""Helpers for tests that run real sweeps: small study files and storage inspection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

SMALL_SPACE = {
    "lr": {"low": 1.0e-4, "high": 1.0, "log": True},
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},
    "optimizer": {"choices": ["adam", "adamw"]},
    "schedule": {"choices": ["constant", "cosine"]},
    "clipping": {"choices": ["none", "norm"]},
    "clip_threshold": {"low": 0.1, "high": 10.0, "log": True},
}


def study_file(folder: Path, name: str = "small", **changes: Any) -> Path:
    """A CPU-sized study: the tiny net on 1,000 synthetic images, ~0.1 s per epoch."""
    data: dict[str, Any] = {
        "name": name, "direction": "maximize", "dataset": "synthetic:1000", "model": "tiny", "epochs": 3,
        "batch_size": 64, "seed": 0, "n_trials": 8,
        "sampler": {"name": "tpe", "options": {"n_startup_trials": 4}},
        "pruner": {"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
        "space": SMALL_SPACE,
    }
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def states(url: str, name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials(url, name):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def assert_clean_finish(url: str, name: str, n_trials: int) -> None:
    """Exactly n_trials trials, unique numbers, all finished, none RUNNING or WAITING."""
    ts = trials(url, name)
    numbers = [t.number for t in ts]
    assert len(ts) == n_trials, states(url, name)
    assert sorted(numbers) == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in ts), states(url, name)
