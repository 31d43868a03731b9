"""`tuner verify`: retrain the top configs of a study with new seeds, to tell luck from a good config.

The configs of the top-K COMPLETE trials are trained again at the study's full budget, without
pruning, once per new seed (1000, 1001, ...; never the sweep's own seed). The training seed sets
the initialisation, the batch order and the augmentation; the validation split stays the same.
After each run the study user attr `tuner_verify` is updated:

    {"<trial number>": {"mean": .., "std": .., "values": [..], "seeds": [..], "n": .., "test_values": [..],
                        "diverged": [seeds that diverged]}}

`std` is the sample standard deviation (0 for one run). A diverged run counts as accuracy 0. Runs
already stored for a trial and seed are skipped, so an interrupted verify continues where it
stopped. `tuner export` then picks the config with the best mean (see `export.choose_best`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from .errors import ConfigError, TunerError
from .export import ATTR_VERIFY, completed
from .objective import ATTR_PARAMS
from .params import TrialParams, parse_params
from .storage import require_study
from .sweep import ATTR_CONFIG

SEED_BASE = 1000


def verify_seeds(n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """n seeds from SEED_BASE upwards, skipping `exclude` (the seeds the sweep trained with)."""
    seeds: list[int] = []
    s = SEED_BASE
    while len(seeds) < n:
        if s not in exclude:
            seeds.append(s)
        s += 1
    return seeds


def stats(values: list[float]) -> tuple[float, float]:
    """(mean, sample std); the std of one value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Run:
    trial: int
    seed: int
    value: float  # val accuracy (0 if diverged)
    test_value: float | None
    diverged: bool
    seconds: float
    index: int  # 1-based, over this invocation's runs
    total: int


@dataclass
class VerifyRow:
    trial: int
    single: float  # the sweep's single-run value
    entry: dict[str, Any] | None  # the stored statistics


@dataclass
class VerifyResult:
    rows: list[VerifyRow]
    ran: int  # runs done now
    skipped: int  # runs found already stored
    seeds: list[int] = field(default_factory=list)


def read_entries(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, dict[str, Any]]:
    raw = storage.get_study_user_attrs(study_id).get(ATTR_VERIFY) or {}
    return {str(k): dict(v) for k, v in raw.items() if isinstance(v, dict)}


def _record(storage: optuna.storages.BaseStorage, study_id: int, trial: int, seed: int, value: float,
            test_value: float | None, diverged: bool) -> dict[str, Any]:
    """Add one run to the stored statistics (read, update, write back: one attr per study)."""
    entries = read_entries(storage, study_id)
    e = entries.get(str(trial)) or {"values": [], "seeds": [], "test_values": [], "diverged": []}
    values, seeds = list(e.get("values", [])), list(e.get("seeds", []))
    tests = list(e.get("test_values", [None] * len(values)))
    if seed in seeds:  # a concurrent verify stored it meanwhile
        return e
    values.append(float(value))
    seeds.append(int(seed))
    tests.append(None if test_value is None else float(test_value))
    mean, std = stats(values)
    e = {"mean": mean, "std": std, "values": values, "seeds": seeds, "n": len(values), "test_values": tests,
         "diverged": sorted(set(e.get("diverged", [])) | ({int(seed)} if diverged else set()))}
    entries[str(trial)] = e
    storage.set_study_user_attr(study_id, ATTR_VERIFY, entries)
    return e


def plan(trials: list[FrozenTrial], seeds: list[int],
         entries: dict[str, dict[str, Any]]) -> list[tuple[FrozenTrial, int]]:
    """The (trial, seed) runs still to do."""
    todo = []
    for t in trials:
        done = set((entries.get(str(t.number)) or {}).get("seeds", []))
        todo += [(t, s) for s in seeds if s not in done]
    return todo


def trial_params(t: FrozenTrial, seed: int | None) -> TrialParams:
    """The trial's stored params, with the training seed replaced (None: kept)."""
    raw = t.user_attrs.get(ATTR_PARAMS)
    if not isinstance(raw, dict):
        raise TunerError(f"trial {t.number} has no stored params (user attr {ATTR_PARAMS!r}); "
                         "was it made by `tuner sweep`?")
    return parse_params(raw).with_training(seed=seed)


def run_verify(storage: optuna.storages.BaseStorage, name: str, *, top: int = 3, n_seeds: int = 3,
               device: str = "auto", data_dir: str | None = None,
               on_run: Callable[[Run], None] | None = None,
               on_start: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Train the top-`top` COMPLETE trials' configs with `n_seeds` new seeds each; store as it goes.

    `on_start(todo, skipped)` is called once with the number of runs to do; `on_run(run)` after each.
    """
    from .data import load_dataset
    from .train import resolve_device, train

    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--top")
    if n_seeds < 1:
        raise ConfigError(f"must be >= 1, got {n_seeds}", key="--seeds")
    study_id = require_study(storage, name)
    trials = completed(storage, name)[:top]
    if not trials:
        raise TunerError(f"study {name!r} has no COMPLETE trial to verify yet")
    config = storage.get_study_user_attrs(study_id).get(ATTR_CONFIG) or {}
    sweep_seeds = {trial_params(t, None).training.seed for t in trials}  # checks the params early, too
    if isinstance(config.get("seed"), int):
        sweep_seeds.add(config["seed"])
    seeds = verify_seeds(n_seeds, sweep_seeds)
    entries = read_entries(storage, study_id)
    todo = plan(trials, seeds, entries)
    skipped = len(trials) * len(seeds) - len(todo)
    if on_start is not None:
        on_start(len(todo), skipped)
    dev = resolve_device(device)
    cache: dict[tuple[str, float], Any] = {}
    for i, (t, seed) in enumerate(todo, start=1):
        params = trial_params(t, seed)
        key = (params.training.dataset, params.training.val_fraction)
        if key not in cache:
            cache[key] = load_dataset(params.training.dataset, dev, data_dir=data_dir,
                                      val_fraction=params.training.val_fraction)
        result = train(params, cache[key], evaluate_test=True)
        diverged = result.outcome == "diverged"
        value = 0.0 if diverged or result.val_accuracy is None else float(result.val_accuracy)
        _record(storage, study_id, t.number, seed, value, result.test_accuracy, diverged)
        if on_run is not None:
            on_run(Run(t.number, seed, value, result.test_accuracy, diverged, result.seconds, i, len(todo)))
    final = read_entries(storage, study_id)
    rows = [VerifyRow(t.number, float(t.value), final.get(str(t.number))) for t in trials]  # type: ignore[arg-type]
    return VerifyResult(rows=rows, ran=len(todo), skipped=skipped, seeds=seeds)
