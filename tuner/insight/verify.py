"""`tuner verify`: retrain the top configs of a study with new seeds, to tell luck from a good config.

The configs of the top-K COMPLETE trials are trained again at the study's full budget, without
pruning, once per new seed (1000, 1001, ...; never the sweep's own seed). The training seed sets
the initialisation, the batch order and the augmentation; the validation split stays the same.

Each run is stored as it finishes, as its own study user attr `tuner_verify:<trial>:<seed>` holding
the validation accuracy (`keys.verify_key`). One key per record, never a read-modify-write of a
shared value: verify runs on the same study, at the same time, cannot overwrite each other's
records. `keys.verify_records` reads them back, with the records of the older single
`tuner_verify` dict. A diverged run counts as accuracy 0. Runs already stored for a trial and seed
are skipped, so an interrupted verify continues where it stopped. `tuner export` then picks the
config with the best mean (see `export.choose_best`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner.errors import ConfigError, TunerError
from tuner.storage import keys
from tuner.storage.database import require_study
from tuner.study.params import TrialParams, parse_params

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

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


def summary(by_seed: dict[int, float]) -> dict[str, Any]:
    """The statistics of one trial's records ({seed: value}): mean, std, values and seeds (by seed), n."""
    seeds = sorted(by_seed)
    values = [by_seed[s] for s in seeds]
    mean, std = stats(values) if values else (0.0, 0.0)
    return {"mean": mean, "std": std, "values": values, "seeds": seeds, "n": len(values)}


def read_records(storage: optuna.storages.BaseStorage, study_id: int) -> dict[int, dict[int, float]]:
    """Every stored verify record of a study: {trial number: {seed: value}}."""
    return keys.verify_records(storage.get_study_user_attrs(study_id))


def record(storage: optuna.storages.BaseStorage, study_id: int, trial: int, seed: int, value: float) -> None:
    """Store one run: its own study attr, so concurrent writers of other records are untouched."""
    storage.set_study_user_attr(study_id, keys.verify_key(trial, seed), float(value))


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
    # the statistics over all stored records (`summary`), plus `test_values` (aligned with `seeds`;
    # known for this invocation's runs only, None for others) and `diverged` (the seeds of this
    # invocation's runs that diverged); None when nothing is stored for the trial
    entry: dict[str, Any] | None


@dataclass
class VerifyResult:
    rows: list[VerifyRow]
    ran: int  # runs done now
    skipped: int  # runs found already stored
    seeds: list[int] = field(default_factory=list)


def plan(trials: list[FrozenTrial], seeds: list[int],
         records: dict[int, dict[int, float]]) -> list[tuple[FrozenTrial, int]]:
    """The (trial, seed) runs still to do."""
    return [(t, s) for t in trials for s in seeds if s not in records.get(t.number, {})]


def trial_params(t: FrozenTrial, seed: int | None) -> TrialParams:
    """The trial's stored params, with the training seed replaced (None: kept)."""
    raw = t.user_attrs.get(keys.PARAMS)
    if not isinstance(raw, dict):
        raise TunerError(f"trial {t.number} has no stored params (user attr {keys.PARAMS!r}); "
                         "was it made by `tuner sweep`?")
    return parse_params(raw).with_training(seed=seed)


def run_verify(storage: optuna.storages.BaseStorage, name: str, *, top: int = 3, n_seeds: int = 3,
               device: str = "auto", data_dir: str | None = None,
               on_run: Callable[[Run], None] | None = None,
               on_start: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Train the top-`top` COMPLETE trials' configs with `n_seeds` new seeds each; store as it goes.

    `on_start(todo, skipped)` is called once with the number of runs to do; `on_run(run)` after each.
    """
    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--top")
    if n_seeds < 1:
        raise ConfigError(f"must be >= 1, got {n_seeds}", key="--seeds")
    study_id = require_study(storage, name)
    trials = keys.completed(storage.get_all_trials(study_id, deepcopy=False))[:top]
    if not trials:
        raise TunerError(f"study {name!r} has no COMPLETE trial to verify yet")
    config = storage.get_study_user_attrs(study_id).get(keys.CONFIG) or {}
    sweep_seeds = {trial_params(t, None).training.seed for t in trials}  # checks the params early, too
    if isinstance(config.get("seed"), int):
        sweep_seeds.add(config["seed"])
    seeds = verify_seeds(n_seeds, sweep_seeds)
    todo = plan(trials, seeds, read_records(storage, study_id))
    skipped = len(trials) * len(seeds) - len(todo)
    if on_start is not None:
        on_start(len(todo), skipped)
    runs: dict[tuple[int, int], Run] = {}
    if todo:
        from tuner.training.data import load_dataset  # torch: only when there is something to train
        from tuner.training.train import resolve_device, train  # torch: as above

        dev = resolve_device(device)
        cache: dict[tuple[str, float], Any] = {}
        for i, (t, seed) in enumerate(todo, start=1):
            params = trial_params(t, seed)
            key = (params.training.dataset, params.training.val_fraction)
            if key not in cache:
                cache[key] = load_dataset(params.training.dataset, dev, data_dir=data_dir,
                                          val_fraction=params.training.val_fraction,
                                          image_size=params.training.image_size)
            result = train(params, cache[key], evaluate_test=True)
            diverged = result.outcome == "diverged"
            value = 0.0 if diverged or result.val_accuracy is None else float(result.val_accuracy)
            record(storage, study_id, t.number, seed, value)
            run = Run(t.number, seed, value, result.test_accuracy, diverged, result.seconds, i, len(todo))
            runs[(t.number, seed)] = run
            if on_run is not None:
                on_run(run)
    final = read_records(storage, study_id)
    rows = []
    for t in trials:
        entry = summary(final[t.number]) if final.get(t.number) else None
        if entry is not None:
            now = [runs.get((t.number, s)) for s in entry["seeds"]]
            entry["test_values"] = [None if r is None else r.test_value for r in now]
            entry["diverged"] = [r.seed for r in now if r is not None and r.diverged]
        rows.append(VerifyRow(t.number, float(t.value), entry))  # type: ignore[arg-type]
    return VerifyResult(rows=rows, ran=len(todo), skipped=skipped, seeds=seeds)
