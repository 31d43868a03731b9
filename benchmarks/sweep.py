"""Sweep-level figures: what a whole `tuner sweep` costs beyond training, what pruning saves,
trials per hour, and the memory of a sweep process.

Every sweep here is a real `tuner sweep` subprocess on a real storage (a SQLite file, and the
local PostgreSQL when it is reachable), so process start, imports, dataset loading, sampling,
storage round trips and model building are all inside the measured wall time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from .core import ROOT, SUBSET, Context, Measurement, log, rounded

PG_ADMIN = os.environ.get("TUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# The knobs every benchmark sweep searches: quickstart's space.
SPACE = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())["space"]


def _study(folder: Path, name: str, **fields: Any) -> Path:
    data = {"name": name, "direction": "maximize", "seed": 0, "space": SPACE, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# `tuner sweep` exactly as the console script runs it, reporting its own peak RSS on exit.
_RUNNER = ("import atexit, resource, sys\n"
           "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
           "file=sys.stderr))\n"
           "sys.argv[0] = 'tuner'\n"
           "from tuner.cli import run\n"
           "run()\n")


def _sweep(study: Path, url: str, cwd: Path, extra: tuple[str, ...] = ()) -> tuple[float, float, float, float]:
    """Run `tuner sweep` in a fresh process, as a user would: (wall seconds, its peak RSS in MB,
    and the wall-clock times it started and ended, to place the trials' timestamps)."""
    env = {k: v for k, v in os.environ.items() if k != "TUNER_STORAGE"}
    started = time.time()
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _RUNNER, "sweep", str(study), "--storage", url, "--device", "cpu",
                          *extra],
                         cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    ended = time.time()
    if run.returncode != 0:
        raise RuntimeError(f"tuner sweep failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    rss = [line.split()[1] for line in run.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return wall, int(rss[-1]) / 1024, started, ended


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def _training_seconds(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Seconds inside training steps and validation passes: the sum of every epoch's `seconds`."""
    return sum(_trained(t) for t in trials)


def _trained(trial: optuna.trial.FrozenTrial) -> float:
    return sum(rec["seconds"] for rec in trial.user_attrs.get("history", []))


def _timeline(trials: list[optuna.trial.FrozenTrial], started: float, ended: float) -> dict[str, float]:
    """Where a sweep's time outside training went: before the first trial (process start, imports,
    storage, data), the first trial's one-time extras (lazy imports), after the last trial (exit),
    and per trial in between (sampling, storage round trips, model building, gaps between trials)."""
    ts = sorted(trials, key=lambda t: t.number)
    span = lambda t: (t.datetime_complete - t.datetime_start).total_seconds()  # noqa: E731
    first, last = ts[0], ts[-1]
    steady = sum(span(t) - _trained(t) for t in ts[1:])
    steady += sum((b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(ts, ts[1:]))
    return {"startup_s": first.datetime_start.timestamp() - started,
            "first_trial_extra_s": span(first) - _trained(first),
            "exit_s": ended - last.datetime_complete.timestamp(),
            "per_trial_ms": 1000 * steady / max(1, len(ts) - 1)}


def _pg_database() -> tuple[str, Any] | None:
    try:
        import sqlalchemy as sa

        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        name = f"tuner_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'create database "{name}"'))
    except Exception as exc:  # noqa: BLE001
        log(f"PostgreSQL not available ({type(exc).__name__}); skipping its overhead")
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()

    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", drop


def sweep_overhead(ctx: Context) -> Measurement:
    """A sweep whose trials last about 2 s (the tiny net, 4,000 synthetic images, 5 epochs, no
    pruning): the fraction of the sweep's wall time spent outside training steps and validation
    passes, start-up and exit included; and the overhead per trial in ms on SQLite and on
    PostgreSQL, with the one-time costs (start-up, first trial, exit) apart."""
    n = ctx.pick(64, 128)
    n_pg = ctx.pick(16, 64)  # per-trial figures only: one-time costs are reported apart
    fields = dict(dataset="synthetic", model="tiny", epochs=5, batch_size=128, sampler={"name": "tpe"},
                  pruner="none")
    values: dict[str, Any] = {}
    details: dict[str, Any] = {"n_trials": {"sqlite": n, "postgres": n_pg}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backends = [("sqlite", f"sqlite:///{folder / 'bench.db'}", n)]
        pg = _pg_database()
        if pg is not None:
            backends.append(("postgres", pg[0], n_pg))
        try:
            for backend, url, count in backends:
                study = _study(folder, f"overhead-{backend}", n_trials=count, **fields)
                log(f"sweep overhead: {count} trials on {backend}")
                wall, _rss, started, ended = _sweep(study, url, folder)
                trials = _trials(url, f"overhead-{backend}")
                train = _training_seconds(trials)
                parts = _timeline(trials, started, ended)
                details[backend] = {"wall_s": rounded(wall), "training_s": rounded(train),
                                    "trial_s": rounded(train / len(trials)), "trials": len(trials),
                                    **{k: rounded(v) for k, v in parts.items()}}
                values[f"sweep_overhead_ms_per_trial_{backend}"] = rounded(parts["per_trial_ms"])
                values[f"sweep_one_time_s_{backend}"] = rounded(
                    parts["startup_s"] + parts["first_trial_extra_s"] + parts["exit_s"])
                if backend == "sqlite":
                    values["sweep_overhead_fraction"] = rounded((wall - train) / wall)
                    values["sweep_trial_s"] = rounded(train / len(trials))
        finally:
            if pg is not None:
                pg[1]()
    values.setdefault("sweep_overhead_ms_per_trial_postgres", None)
    values.setdefault("sweep_one_time_s_postgres", None)
    return Measurement(values=values, details=details,
                       note=f"1 - Σ epoch seconds / wall of a {n}-trial `tuner sweep` subprocess on SQLite "
                            "(process start and exit included)")


def pruning_savings(ctx: Context) -> Measurement:
    """1 − epochs trained with the default pruner ÷ epochs without pruning, same sampler seed
    and trial count, on the real CIFAR-10 subset; with the best validation accuracy of each.

    The sampler is Optuna's RandomSampler: with the same seed both runs train exactly the same
    configurations, so the runs differ only by pruning, and the best-accuracy gap says whether the
    pruner stopped a would-be winner. (TPE's later samples depend on what it has seen, pruned
    curves included, so two TPE runs part ways after the start-up trials and their best values
    differ by luck as much as by pruning.)"""
    if not SUBSET.is_file():
        return Measurement(values={"pruning_savings": None}, skipped=f"real subset not found at {SUBSET}")
    n = ctx.pick(24, 40)
    fields = dict(dataset=str(SUBSET), model="tiny", epochs=ctx.pick(6, 8), batch_size=128, n_trials=n,
                  sampler={"name": "random"})
    values: dict[str, Any] = {}
    details: dict[str, Any] = {"n_trials": n, "epochs": fields["epochs"], "model": "tiny"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = {}
        curves: dict[int, list[optuna.trial.FrozenTrial]] = {}
        for label, pruner in (("pruned", None), ("unpruned", "none")):
            extra = {} if pruner is None else {"pruner": pruner}  # None: the study default
            study = _study(folder, label, **fields, **extra)
            url = f"sqlite:///{folder / (label + '.db')}"
            log(f"pruning savings: {n} trials, {label}")
            wall, *_ = _sweep(study, url, folder)
            trials = _trials(url, label)
            epochs = sum(len(t.intermediate_values) for t in trials)
            complete = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
            if label == "unpruned":
                curves = {0: trials}  # replayed below
            runs[label] = {"epochs": epochs, "best": max(complete) if complete else None, "wall_s": rounded(wall),
                           "pruned": sum(t.state == TrialState.PRUNED for t in trials), "trials": len(trials)}
        details.update(runs)
    savings = 1 - runs["pruned"]["epochs"] / runs["unpruned"]["epochs"]
    values["pruning_savings"] = rounded(savings)
    values["best_val_accuracy_pruned"] = rounded(runs["pruned"]["best"])
    values["best_val_accuracy_unpruned"] = rounded(runs["unpruned"]["best"])
    if runs["pruned"]["best"] is not None and runs["unpruned"]["best"] is not None:
        values["pruning_best_gap_points"] = rounded(100 * (runs["unpruned"]["best"] - runs["pruned"]["best"]))
    values["trials_per_hour_subset"] = rounded(3600 * n / runs["pruned"]["wall_s"])
    # Schedule-aware pruning, replayed: the unpruned curves of this seed and of seed 1 (the seed whose
    # winner, a one-cycle trial, median pruning stopped: benchmarks/RESULTS.md, 2026-11 "Pruning") go
    # through the default pruner with its hold on and off; each trial's curve is the same with or
    # without pruning, so pruning only truncates it. One more unpruned sweep (seed 1); the replay itself trains nothing.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in (0, 1):
            if seed in curves:
                continue
            study = _study(folder, f"unpruned-{seed}", **{**fields, "seed": seed}, pruner="none")
            url = f"sqlite:///{folder / f'unpruned-{seed}.db'}"
            log(f"pruning savings: {n} trials unpruned, seed {seed}, for the schedule-aware replay")
            _sweep(study, url, folder)
            curves[seed] = _trials(url, f"unpruned-{seed}")
        for seed, trials in curves.items():
            for aware in (False, True):
                replay = replay_pruning(trials, fields["epochs"], aware)
                tag = f"seed{seed}_{'aware' if aware else 'naive'}"
                values[f"replay_savings_{tag}"] = rounded(replay["savings"])
                values[f"replay_best_gap_points_{tag}"] = rounded(replay["gap_points"])
                details[f"replay_{tag}"] = replay
    return Measurement(values=values, details=details,
                       note="default pruner (median) vs none, the same random-sampled trials; tiny net, real subset; "
                            "replay: the unpruned curves of seeds 0 and 1 through the default pruner, "
                            "schedule-aware hold off (naive) and on (aware)")


REPLAY_KEYS = tuple(f"replay_{what}_seed{seed}_{mode}" for seed in (0, 1) for mode in ("naive", "aware")
                    for what in ("savings", "best_gap_points"))


def replay_pruning(trials: list[optuna.trial.FrozenTrial], epochs: int, aware: bool) -> dict[str, Any]:
    """Replay unpruned trials, in order, through the study default pruner (Optuna's MedianPruner as
    tuner builds it) in an in-memory study: each trial reports its recorded epochs until the pruner
    stops it; with `aware`, the pruner is not asked before the trial's first epoch past its lr warm-up
    (the trial runner's rule, `optim.first_judged_epoch`). Returns the epochs saved against the unpruned
    run, and the points of best accuracy lost."""
    import warnings

    from tuner.study.params import parse_params
    from tuner.study.registry import build_pruner
    from tuner.training.data import load_dataset
    from tuner.training.optim import first_judged_epoch
    from tuner.training.train import epoch_steps

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=build_pruner("median", {}, epochs))
    full = kept = 0
    best_all: float | None = None
    best_kept: float | None = None
    stopped_numbers: list[int] = []
    data = None
    for t in sorted(trials, key=lambda t: t.number):
        curve = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        if not curve:
            continue
        judged = 1
        if aware:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params = parse_params(t.user_attrs["params"], file=f"trial {t.number}")
            if data is None:
                data = load_dataset(params.training.dataset, "cpu", val_fraction=params.training.val_fraction)
            judged = first_judged_epoch(params.schedule, params.training.epochs, epoch_steps(params, data))
        trial = study.ask()
        stopped = False
        for e, value in enumerate(curve, start=1):
            trial.report(value, e)
            kept += 1
            if e >= judged and e < len(curve) and trial.should_prune():
                stopped = True
                break
        full += len(curve)
        final = curve[-1]
        if t.state == TrialState.COMPLETE and t.value is not None:
            best_all = final if best_all is None else max(best_all, final)
        if stopped:
            study.tell(trial, state=TrialState.PRUNED)
            stopped_numbers.append(t.number)
        else:
            study.tell(trial, final)
            if t.state == TrialState.COMPLETE:
                best_kept = final if best_kept is None else max(best_kept, final)
    gap = 100 * ((best_all or 0.0) - (best_kept or 0.0))
    return {"epochs_full": full, "epochs_kept": kept, "savings": 1 - kept / full if full else 0.0,
            "best_unpruned": best_all, "best_kept": best_kept, "gap_points": gap, "pruned": stopped_numbers}


def quickstart(ctx: Context) -> Measurement:
    """`tuner sweep studies/quickstart.yaml` as shipped: trials per hour and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'quickstart.db'}"
        log("quickstart sweep")
        wall, rss, *_ = _sweep(ROOT / "studies" / "quickstart.yaml", url, folder)
        trials = _trials(url, "quickstart")
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
    return Measurement(
        values={"trials_per_hour_quickstart": rounded(3600 * len(trials) / wall), "quickstart_wall_s": rounded(wall),
                "quickstart_peak_rss_mb": rounded(rss)},
        details={"trials": len(trials), "pruned": pruned},
        note="the shipped quickstart study in a subprocess, SQLite")


def packed_ratio(ctx: Context) -> Measurement:
    """Trial packing on this machine: trials per hour of `tuner sweep --pack 4` ÷ the same sweep with
    `--pack 1`, for the quickstart study as shipped (synthetic, TPE) and for a real-subset budget
    (tiny net, random sampler: both runs train the same configs, so their per-trial results are
    compared too). Runs alternate (1, 4, 1, 4 in full mode) and the median wall time is used."""
    rounds = ctx.pick(1, 2)
    n = ctx.pick(12, 24)
    budgets: list[tuple[str, Path | None, dict[str, Any]]] = [("quickstart", ROOT / "studies" / "quickstart.yaml", {})]
    if SUBSET.is_file():
        budgets.append(("subset", None, dict(dataset=str(SUBSET), model="tiny", epochs=ctx.pick(3, 6), batch_size=128,
                                             n_trials=n, sampler={"name": "random"})))
    values: dict[str, Any] = {}
    details: dict[str, Any] = {"rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, shipped, fields in budgets:
            walls: dict[int, list[float]] = {1: [], 4: []}
            results: dict[int, list[tuple[int, str, float | None]]] = {}
            for r in range(rounds):
                for k in (1, 4):
                    name = f"{label}-k{k}-r{r}"
                    study = _study(folder, name, **fields) if shipped is None else shipped
                    url = f"sqlite:///{folder / (name + '.db')}"
                    log(f"packed ratio: {label}, --pack {k}, round {r + 1}")
                    wall, rss, *_ = _sweep(study, url, folder, ("--pack", str(k), "--study-name", name))
                    trials = _trials(url, name)
                    walls[k].append(3600 * len(trials) / wall)
                    results[k] = sorted((t.number, t.state.name, t.value) for t in trials)
                    details[f"{label}_k{k}_peak_rss_mb"] = rounded(rss)
            ratio = statistics.median(walls[4]) / statistics.median(walls[1])
            values[f"packed_trials_per_hour_ratio_{label}"] = rounded(ratio)
            details[f"{label}_trials_per_hour"] = {str(k): [rounded(w) for w in v] for k, v in walls.items()}
            best = {k: max((v for _, s, v in res if s == "COMPLETE" and v is not None), default=None)
                    for k, res in results.items()}
            details[f"{label}_best"] = best
            if shipped is None:  # random sampler: the same configs, so the same results
                same = sum(1 for a, b in zip(results[1], results[4]) if a == b)
                values["packed_same_results_subset"] = rounded(same / max(1, len(results[1])))
    values.setdefault("packed_trials_per_hour_ratio_subset", None)
    values.setdefault("packed_same_results_subset", None)
    return Measurement(values=values, details=details,
                       note="trials per hour with --pack 4 / --pack 1 (CPU: auto picks 1); same-results is the share "
                            "of trials with the same state and value")
