"""Evidence for the defaults: search strategies compared at equal compute on the real subset.

    python benchmarks/search.py [--quick] [--seeds N] [--out DIR] [--dataset PATH] [--smoke]

Every strategy runs the same study (quickstart's search space, `model: tiny`, the same epochs per
trial and the same trial budget) with several sampler seeds, as real `tuner` sweeps on a SQLite
file in this process:

    tpe+median        the default: TPE, the median pruner (schedule-aware pruning off)
    tpe+median/aware  the same with schedule-aware pruning on
    random+median     Optuna's RandomSampler with the same pruner
    qmc+median        scrambled Halton (QMCSampler) with the same pruner
    staged            the default sampler and pruner over playbook stages (lr, +β1, +ε/wd, +β2/schedule/rest)
    tpe+asha          TPE with Optuna's SuccessiveHalvingPruner (asynchronous successive halving)
    random+asha       RandomSampler with the same
    tpe+hyperband     TPE with Optuna's HyperbandPruner
    pbt               population-based training: a population as large as the trial budget, each member
                      as long as a trial (equal epochs), exploit/explore after every epoch
    pbt/sampler       the same, with the study's sampler (TPE) proposing the explored values (PB2's idea)
    warm              the default, warm-started with the top configs of a study on `synthetic` data
                      (that source study is run once; its compute is not counted: it is the point of
                      a warm start to reuse an earlier study)

The training seed is the study's (0) in every run: only the sampler seed changes between seeds
(`Flags.worker_index`, tuner/study/settings.py), so runs differ only by which configs they try and what they prune.

It prints a table and writes `search-curves.html` (best validation accuracy against cumulative
epochs trained, the anytime curve, one line per strategy: the mean over seeds, and each seed faint)
and `search-table.md` into --out. The last line of stdout is one JSON object holding every figure.

    best@E*        the best val accuracy once E* epochs were trained, E* the fewest epochs any run
                   used in all (so every strategy is compared at the same compute), mean over seeds
    final best     the best val accuracy at the end of the run, mean ± sd over seeds
    epochs to -1pt cumulative epochs until the run was within 1 point of the best any strategy found
                   (median over seeds; "—" for seeds that never got there, counted in "reached")
    winner test    the test accuracy of the strategy's exported winner (its best trial over all
                   seeds, through `tuner.export_best`), re-trained from scratch on 3 new seeds

The default `--dataset` is the real CIFAR-10 subset, which does not ship with the project
(`../shared/data/cifar10-subset/cifar10-subset.npz` beside the clone, or `TUNER_SUBSET`): without
it the script exits 2 with one line saying so; `--dataset synthetic` or any `.npz` in the subset's
layout runs anywhere. Arguments are checked before the data.

Quick mode (`--quick`): 12 trials of 3 epochs, 3 seeds (about 15 minutes on 2 idle cores).
Full mode: 24 trials of 4 epochs, 5 seeds. `--smoke` is for the test suite: synthetic data, 1 seed,
a few 2-epoch trials; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.core import SUBSET, load_average, log

SPACE: dict[str, Any] = {
    "lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},
    "one_minus_beta2": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
    "eps": {"low": 1.0e-10, "high": 1.0e-4, "log": True},
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "optimizer": {"choices": ["adam", "adamw"]},
    "schedule": {"choices": ["constant", "cosine", "onecycle"]},
    "warmup_fraction": {"low": 0.0, "high": 0.2},
    "clipping": {"choices": ["none", "norm"]},
    "clip_threshold": {"low": 0.1, "high": 10.0, "log": True},
}
RETRAIN_SEEDS = (1001, 1002, 1003)


@dataclass(frozen=True)
class Mode:
    trials: int
    epochs: int
    seeds: int
    warm_top: int
    dataset: str
    batch_size: int = 128


def modes(dataset: str) -> dict[str, Mode]:
    return {"quick": Mode(12, 3, 3, 4, dataset), "full": Mode(24, 4, 5, 5, dataset),
            "smoke": Mode(4, 2, 1, 2, "synthetic")}


def stages_for(trials: int) -> list[dict[str, Any]]:
    """The playbook's order, its trials split over four stages (a third to lr alone); the last one
    also takes the knobs the playbook leaves out (optimizer, warm-up, clipping), so the staged search
    covers the same space as the others."""
    first = max(1, round(trials / 3))
    rest = trials - first
    sizes = [first, rest - 2 * (rest // 3), rest // 3, rest // 3]
    knobs = [["lr"], ["lr", "one_minus_beta1"], ["lr", "one_minus_beta1", "eps", "weight_decay"],
             ["lr", "one_minus_beta2", "schedule", "warmup_fraction", "optimizer", "clipping", "clip_threshold"]]
    return [{"name": f"s{i + 1}", "knobs": k, "trials": n} for i, (k, n) in enumerate(zip(knobs, sizes)) if n > 0]


def base_study(mode: Mode, name: str) -> dict[str, Any]:
    return {"name": name, "direction": "maximize", "dataset": mode.dataset, "model": "tiny", "epochs": mode.epochs,
            "batch_size": mode.batch_size, "seed": 0, "n_trials": mode.trials,
            "sampler": {"name": "tpe", "options": {"n_startup_trials": max(2, mode.trials // 3)}},
            "pruner": {"name": "median", "options": {"n_startup_trials": 4, "n_warmup_steps": 1}},
            "space": SPACE}


def strategies(mode: Mode) -> dict[str, dict[str, Any]]:
    """Each strategy: the study-file keys it changes, and whether it is warm-started."""
    aware = {"name": "median", "options": {"n_startup_trials": 4, "n_warmup_steps": 1}, "schedule_aware": True}
    return {
        "tpe+median": {},
        "tpe+median/aware": {"pruner": aware},
        "random+median": {"sampler": {"name": "random"}},
        "qmc+median": {"sampler": {"name": "qmc"}},
        "staged": {"stages": stages_for(mode.trials)},
        "warm": {"warm": True},
        # Optuna's SuccessiveHalvingPruner (asynchronous successive halving) and HyperbandPruner as
        # tuner builds them from the study file (tuner.study.registry: min_resource 1, Optuna's reduction factors)
        "tpe+asha": {"pruner": {"name": "successive_halving"}},
        "random+asha": {"sampler": {"name": "random"}, "pruner": {"name": "successive_halving"}},
        "tpe+hyperband": {"pruner": {"name": "hyperband"}},
        # population-based training at the same epochs: trials × epochs = population × epochs, each member
        # as long as a trial, exploit/explore after every epoch (population.py defaults otherwise)
        "pbt": {"strategy": "pbt", "population": {"size": mode.trials, "interval": 1}},
        "pbt/sampler": {"strategy": "pbt", "population": {"size": mode.trials, "interval": 1, "explore": "sampler"}},
    }


@dataclass
class Run:
    strategy: str
    seed: int
    curve: list[tuple[int, float | None]] = field(default_factory=list)  # (cumulative epochs, best so far)
    best: float | None = None
    epochs: int = 0
    wall_s: float = 0.0
    study: str = ""
    url: str = ""


def run_file(folder: Path, name: str) -> Path:
    return folder / "runs" / f"{name}.json"


def load_run(folder: Path, name: str) -> Run | None:
    """A run kept by an earlier invocation with the same --out (--reuse), or None."""
    path = run_file(folder, name)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["curve"] = [tuple(p) for p in data["curve"]]
    return Run(**data)


def run_one(mode: Mode, strategy: str, change: dict[str, Any], seed: int, folder: Path,
            warm_source: tuple[str, str] | None, reuse: bool = False) -> Run:
    from optuna.trial import TrialState

    from tuner.engine.sweep import run_sweep
    from tuner.engine.warmstart import WarmStart
    from tuner.storage import keys
    from tuner.study.config import parse_study
    from tuner.study.settings import Flags

    name = f"{strategy.replace('+', '-').replace('/', '-')}-s{seed}"
    if reuse and (kept := load_run(folder, name)) is not None:
        log(f"  reusing {run_file(folder, name)}")
        return kept
    data = {**base_study(mode, name), **{k: v for k, v in change.items() if k != "warm"}}
    if "stages" in data or "population" in data:
        data.pop("n_trials")
    if "population" in data:
        data.pop("pruner")
    config = parse_study(data, file=f"{name}.yaml")
    for stale in folder.glob(f"{name}.db*"):  # an interrupted earlier attempt: start afresh
        stale.unlink()
    url = f"sqlite:///{folder / (name + '.db')}"
    warm = None
    if change.get("warm") and warm_source is not None:
        warm = WarmStart([f"{warm_source[0]}#{warm_source[1]}"], mode.warm_top)
    flags = Flags(storage=url, device="cpu", worker_index=seed, checkpoint_every=1e9)
    started = time.perf_counter()
    result = run_sweep(config, flags, handle_signals=False, warm_start=warm)
    run = Run(strategy, seed, wall_s=time.perf_counter() - started, study=name, url=url)
    done = sorted((t for t in result.trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    best: float | None = None
    for t in done:
        span = t.user_attrs.get(keys.PBT_EPOCHS)  # a PBT segment re-reports its lineage's earlier epochs
        trained = [e for e in t.intermediate_values if e >= span[0]] if span else t.intermediate_values
        run.epochs += len(trained)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = t.value if best is None else max(best, t.value)
        run.curve.append((run.epochs, best))
    run.best = best
    run_file(folder, name).parent.mkdir(parents=True, exist_ok=True)
    run_file(folder, name).write_text(json.dumps(asdict(run)))
    return run


def warm_source_study(mode: Mode, folder: Path, reuse: bool = False) -> tuple[str, str]:
    """A finished study on `synthetic` data, same space: what a user tuned before on other data."""
    from tuner.engine.sweep import run_sweep
    from tuner.study.config import parse_study
    from tuner.study.settings import Flags

    data = {**base_study(mode, "warm-source"), "dataset": "synthetic", "n_trials": mode.trials}
    url = f"sqlite:///{folder / 'warm-source.db'}"
    if reuse and (folder / "warm-source.db").is_file():
        return url, "warm-source"
    run_sweep(parse_study(data, file="warm-source.yaml"),
              Flags(storage=url, device="cpu", worker_index=0, checkpoint_every=1e9), handle_signals=False)
    return url, "warm-source"


def best_at(run: Run, budget: int) -> float | None:
    best = None
    for epochs, value in run.curve:
        if epochs > budget:
            break
        best = value
    return best


def epochs_to(run: Run, target: float) -> int | None:
    for epochs, value in run.curve:
        if value is not None and value >= target:
            return epochs
    return None


def retrain(run: Run, seeds: tuple[int, ...]) -> list[float]:
    """The run's best trial, exported as `tuner export` writes it (a PBT winner: its lineage as
    intervals), re-trained from scratch with each of `seeds`: the test accuracies."""
    import optuna
    import yaml

    import tuner
    from tuner.storage.database import open_storage
    from tuner.study.params import parse_params
    from tuner.training.data import load_dataset
    from tuner.training.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=run.study, storage=open_storage(run.url))
    params = parse_params(yaml.safe_load(tuner.export_best(study)), file=f"{run.study} export")
    data = load_dataset(params.training.dataset, "cpu", val_fraction=params.training.val_fraction)
    tests = []
    for seed in seeds:
        result = train(replace(params, training=replace(params.training, seed=seed)), data, evaluate_test=True)
        tests.append(float(result.test_accuracy) if result.test_accuracy is not None else float("nan"))
    return tests


def retrain_winner(runs: list[Run]) -> dict[str, Any]:
    """The strategy's best trial over all its seeds, re-trained from scratch on 3 new seeds."""
    finished = [r for r in runs if r.best is not None]
    if not finished:
        return {"winner_val": None, "winner_test_mean": None, "winner_test_sd": None}
    top = max(finished, key=lambda r: r.best or 0.0)
    tests = retrain(top, RETRAIN_SEEDS)
    return {"winner_val": top.best, "winner_study": top.study, "winner_test": tests,
            "winner_test_mean": statistics.fmean(tests), "winner_test_sd": statistics.pstdev(tests)}


def retrain_each(runs: list[Run], k: int) -> dict[str, Any]:
    """Every seed's own winner re-trained on `k` new seeds: what a user of the strategy would get
    (the best of one search, validated on seed 0, is optimistic; this is its test accuracy)."""
    per_run = [retrain(r, RETRAIN_SEEDS[:k]) for r in runs if r.best is not None]
    tests = [t for ts in per_run for t in ts]
    return {"each_test": per_run, "each_test_mean": statistics.fmean(tests) if tests else None,
            "each_test_sd": statistics.pstdev([statistics.fmean(ts) for ts in per_run]) if len(per_run) > 1 else 0.0}


def summarize(runs: dict[str, list[Run]]) -> tuple[dict[str, dict[str, Any]], int, float]:
    every = [r for rs in runs.values() for r in rs]
    budget = min(r.epochs for r in every)
    top = max((r.best for r in every if r.best is not None), default=0.0)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        finals = [r.best for r in rs if r.best is not None]
        at = [v for v in (best_at(r, budget) for r in rs) if v is not None]
        reach = [epochs_to(r, top - 0.01) for r in rs]
        got = [e for e in reach if e is not None]
        out[name] = {
            "best_at_budget": statistics.fmean(at) if at else None,
            "final_best_mean": statistics.fmean(finals) if finals else None,
            "final_best_sd": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "epochs_mean": statistics.fmean(r.epochs for r in rs),
            "epochs_to_within_1pt_median": statistics.median(got) if got else None,
            "reached": f"{len(got)}/{len(rs)}",
            "wall_s": sum(r.wall_s for r in rs),
        }
    return out, budget, top


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(summary: dict[str, dict[str, Any]], budget: int, top: float, mode_name: str, mode: Mode) -> str:
    head = (f"search strategies, {mode_name} mode: {mode.trials} trials × {mode.epochs} epochs, tiny net, "
            f"{mode.seeds} sampler seeds, data {Path(mode.dataset).name}; E* = {budget} epochs; best any = {top:.4f}")
    cols = ("strategy", "best@E*", "final best", "± sd", "epochs", "epochs to -1pt", "reached", "winner val",
            "winner test (3 seeds)", "each winner test", "wall s")
    rows = [cols, tuple("---" for _ in cols)]
    for name, s in summary.items():
        test = "—" if s.get("winner_test_mean") is None else \
            f"{s['winner_test_mean']:.4f} ± {s['winner_test_sd']:.4f}"
        each = "—" if s.get("each_test_mean") is None else f"{s['each_test_mean']:.4f} ± {s['each_test_sd']:.4f}"
        rows.append((name, fmt(s["best_at_budget"], 4), fmt(s["final_best_mean"], 4), fmt(s["final_best_sd"], 4),
                     fmt(s["epochs_mean"], 1), fmt(s["epochs_to_within_1pt_median"], 1), s["reached"],
                     fmt(s.get("winner_val"), 4), test, each, fmt(s["wall_s"], 0)))
    lines = ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return head + "\n\n" + "\n".join(lines) + "\n"


def anytime(runs: dict[str, list[Run]], marks: tuple[int, ...]) -> str:
    """The anytime curves as a table: mean over seeds of the best val accuracy once `mark` epochs were
    trained ("—" where a seed had found nothing by then)."""
    cols = ("strategy", *(f"{m} epochs" for m in marks))
    rows = [cols, tuple("---" for _ in cols)]
    for name, rs in runs.items():
        cells = []
        for m in marks:
            vals = [best_at(r, m) for r in rs]
            cells.append(fmt(statistics.fmean(v for v in vals if v is not None), 4)
                         if all(v is not None for v in vals) else "—")
        rows.append((name, *cells))
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows) + "\n"


def curves_html(runs: dict[str, list[Run]], path: Path, title: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000")
    for i, (name, rs) in enumerate(runs.items()):
        color = palette[i % len(palette)]
        grid = sorted({e for r in rs for e, _ in r.curve})
        for r in rs:
            xs = [e for e, v in r.curve if v is not None]
            ys = [v for _, v in r.curve if v is not None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "width": 1, "shape": "hv"},
                                     opacity=0.3, legendgroup=name, showlegend=False,
                                     name=f"{name} seed {r.seed}"))
        mean = []
        for e in grid:
            vals = [best_at(r, e) for r in rs]
            mean.append(statistics.fmean(vals) if all(v is not None for v in vals) else None)
        fig.add_trace(go.Scatter(x=grid, y=mean, mode="lines", line={"color": color, "width": 3, "shape": "hv"},
                                 legendgroup=name, name=f"{name} (mean of {len(rs)} seeds)"))
    fig.update_layout(title=title, xaxis_title="cumulative epochs trained", yaxis_title="best validation accuracy",
                      template="plotly_white")
    fig.write_html(path, include_plotlyjs=True, full_html=True)


def main(argv: list[str] | None = None) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 trials × 3 epochs, 3 seeds (the default is full)")
    ap.add_argument("--smoke", action="store_true", help="a few 2-epoch trials on synthetic data (for tests)")
    ap.add_argument("--seeds", type=int, default=None, help="sampler seeds per strategy")
    ap.add_argument("--only", default=None, help="comma-separated strategies")
    ap.add_argument("--dataset", default=None,
                    help=f"an .npz in the subset's layout, or synthetic (default: the real CIFAR-10 subset, {SUBSET})")
    ap.add_argument("--out", default="search-results",
                    help="folder for search-curves.html, search-table.md, and each run's study (studies/) "
                         "and curve (runs/)")
    ap.add_argument("--each-winner", type=int, default=0, metavar="K",
                    help="also re-train every seed's own winner on K new seeds (1-3; the table's 'each winner test')")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the runs an earlier invocation kept in --out (same mode and dataset): only "
                         "missing runs train")
    args = ap.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = modes(args.dataset or str(SUBSET))[mode_name]
    if args.seeds is not None:
        if args.seeds < 1:
            print("error: --seeds must be >= 1", file=sys.stderr)
            return 2
        mode = replace(mode, seeds=args.seeds)
    if not 0 <= args.each_winner <= len(RETRAIN_SEEDS):
        print(f"error: --each-winner must be 0 to {len(RETRAIN_SEEDS)}, got {args.each_winner}", file=sys.stderr)
        return 2
    chosen = strategies(mode)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = [s for s in wanted if s not in chosen]
        if unknown:
            print(f"error: --only: unknown strategy {unknown[0]!r} (valid: {', '.join(chosen)})", file=sys.stderr)
            return 2
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    # the data is checked after every argument: a typo in --only is reported on any machine
    if mode.dataset != "synthetic" and not Path(mode.dataset).is_file():
        where = ("the real CIFAR-10 subset is not on this machine; pass --dataset FILE.npz or --dataset synthetic"
                 if args.dataset is None else "no such file")
        print(f"error: --dataset {mode.dataset}: {where}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    started = time.perf_counter()
    runs: dict[str, list[Run]] = {}
    folder = out / "studies"
    folder.mkdir(exist_ok=True)
    if not args.reuse:
        for old in [*folder.glob("*.db*"), *(out / "runs").glob("*.json")]:
            old.unlink()
    source = None
    if any(c.get("warm") for c in chosen.values()):
        log("warm-start source: a study on synthetic data")
        source = warm_source_study(mode, folder, args.reuse)
    for seed in range(mode.seeds):
        for name, change in chosen.items():
            log(f"{name}, sampler seed {seed}")
            runs.setdefault(name, []).append(run_one(mode, name, change, seed, folder, source, args.reuse))
    summary, budget, top = summarize(runs)
    for name, rs in runs.items():
        log(f"{name}: re-training the winner on {len(RETRAIN_SEEDS)} new seeds")
        summary[name].update(retrain_winner(rs))
        if args.each_winner:
            log(f"{name}: re-training each seed's winner on {args.each_winner} new seeds")
            summary[name].update(retrain_each(rs, args.each_winner))
    wall = time.perf_counter() - started
    text = table(summary, budget, top, mode_name, mode)
    full = mode.trials * mode.epochs
    marks = tuple(sorted({max(1, full // 8), full // 4, full // 2, 3 * full // 4, full}))
    text += "\nanytime: mean best val accuracy after E epochs trained\n\n" + anytime(runs, marks)
    title = (f"Best validation accuracy against epochs trained ({mode_name}: {mode.trials} trials × "
             f"{mode.epochs} epochs)")
    curves_html(runs, out / "search-curves.html", title)
    (out / "search-table.md").write_text(text)
    print(text)
    print(f"wall {wall:.0f} s; load average before {load_before}, after {load_average()}")
    record = {"mode": mode_name, "trials": mode.trials, "epochs": mode.epochs, "seeds": mode.seeds,
              "budget_epochs": budget, "best_any": top, "wall_s": round(wall, 1),
              "load_before": load_before, "load_after": load_average(), "strategies": summary,
              "curves": {n: [{"seed": r.seed, "curve": r.curve} for r in rs] for n, rs in runs.items()}}
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
