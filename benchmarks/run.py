"""Benchmark the tuner engine on this machine, in one run.

    python benchmarks/run.py [--quick] [--device auto|cpu|cuda] [--only NAME,...] [--dataset PATH]

Prints a table, then exactly one JSON line (the last line of stdout) holding every figure.
Progress goes to stderr. Exit status: 0, 1 if a figure raised (its keys are then null and the
error is in the JSON's `errors`), 2 for bad arguments.

Adding a figure: write `def my_figure(ctx: Context) -> Measurement` in a module of this package
and add one `Figure(...)` entry to FIGURES below. Sweep-level figures (Optuna study throughput,
pruning savings, ...) belong in a `benchmarks/sweep.py` module, registered here the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu, pipeline, precision, startup, sweep, system
from benchmarks.core import (
    SUBSET,
    Context,
    Figure,
    Measurement,
    OtherLoad,
    Target,
    cpu_name,
    load_average,
    log,
)

FIGURES: tuple[Figure, ...] = (
    Figure("pipeline_efficiency", pipeline.pipeline_efficiency, ("pipeline_efficiency",),
           units={"pipeline_efficiency": "ratio"},
           targets={"pipeline_efficiency": Target(0.95, 1.0, ">= 0.95, <= 1.0")}),
    Figure("pipeline_cost_ratio", pipeline.pipeline_cost_ratio, ("pipeline_cost_ratio",),
           units={"pipeline_cost_ratio": "ratio"},
           targets={"pipeline_cost_ratio": Target(None, 0.1, "<= 0.1")}),
    Figure("speedup_vs_naive", pipeline.speedup_vs_naive, ("speedup_vs_naive",),
           units={"speedup_vs_naive": "x"}),
    Figure("bf16_speedup", precision.bf16_speedup,
           ("bf16_speedup", "fp32_test_accuracy", "bf16_test_accuracy", "bf16_accuracy_delta"),
           units={"bf16_speedup": "x", "fp32_test_accuracy": "frac", "bf16_test_accuracy": "frac",
                  "bf16_accuracy_delta": "frac"}),
    Figure("cuda_throughput", gpu.cuda_throughput, gpu.THROUGHPUT_KEYS,
           units={"cuda_images_per_s": "img/s", "cuda_tflops": "TFLOP/s", "cuda_peak_bf16_tflops": "TFLOP/s",
                  "cuda_mfu": "frac", "cuda_peak_memory_mb": "MB"}),
    Figure("cuda_compiled_throughput", gpu.cuda_compiled_throughput, gpu.COMPILED_KEYS,
           units={"cuda_compiled_images_per_s": "img/s", "cuda_compiled_tflops": "TFLOP/s", "cuda_compiled_mfu": "frac",
                  "cuda_compiled_peak_memory_mb": "MB", "cuda_compiled_first_epoch_s": "s"}),
    Figure("cuda_full_trial", gpu.cuda_full_trial, ("cuda_trial_seconds",), units={"cuda_trial_seconds": "s"}),
    Figure("sweep_overhead", sweep.sweep_overhead,
           ("sweep_overhead_fraction", "sweep_trial_s", "sweep_overhead_ms_per_trial_sqlite",
            "sweep_overhead_ms_per_trial_postgres", "sweep_one_time_s_sqlite", "sweep_one_time_s_postgres"),
           units={"sweep_overhead_fraction": "ratio", "sweep_trial_s": "s", "sweep_overhead_ms_per_trial_sqlite": "ms",
                  "sweep_overhead_ms_per_trial_postgres": "ms", "sweep_one_time_s_sqlite": "s",
                  "sweep_one_time_s_postgres": "s"},
           targets={"sweep_overhead_fraction": Target(None, 0.05, "<= 0.05")}),
    Figure("pruning_savings", sweep.pruning_savings,
           ("pruning_savings", "best_val_accuracy_pruned", "best_val_accuracy_unpruned", "pruning_best_gap_points",
            "trials_per_hour_subset", *sweep.REPLAY_KEYS),
           units={"pruning_savings": "ratio", "best_val_accuracy_pruned": "frac", "best_val_accuracy_unpruned": "frac",
                  "pruning_best_gap_points": "points", "trials_per_hour_subset": "1/h",
                  **{k: "ratio" if "savings" in k else "points" for k in sweep.REPLAY_KEYS}},
           targets={"pruning_savings": Target(0.5, None, ">= 0.5"),
                    "pruning_best_gap_points": Target(None, 1.0, "<= 1")}),
    Figure("quickstart", sweep.quickstart,
           ("trials_per_hour_quickstart", "quickstart_wall_s", "quickstart_peak_rss_mb"),
           units={"trials_per_hour_quickstart": "1/h", "quickstart_wall_s": "s", "quickstart_peak_rss_mb": "MB"}),
    Figure("packed_ratio", sweep.packed_ratio,
           ("packed_trials_per_hour_ratio_quickstart", "packed_trials_per_hour_ratio_subset",
            "packed_same_results_subset"),
           units={"packed_trials_per_hour_ratio_quickstart": "x", "packed_trials_per_hour_ratio_subset": "x",
                  "packed_same_results_subset": "frac"}),
    Figure("startup", startup.startup, ("startup_help_seconds", "startup_export_seconds"),
           units={"startup_help_seconds": "s", "startup_export_seconds": "s"}),
    Figure("peak_rss_mb", system.peak_rss_mb, ("peak_rss_mb",), units={"peak_rss_mb": "MB"}, always=True),
)

RESERVED_KEYS = {"targets_met", "skipped", "errors", "details", "meta"}


def check_registry(figures: tuple[Figure, ...]) -> None:
    names, keys = [f.name for f in figures], [k for f in figures for k in f.keys]
    assert len(set(names)) == len(names), "duplicate figure name"
    assert len(set(keys)) == len(keys) and not RESERVED_KEYS & set(keys), "duplicate or reserved JSON key"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and epochs (a few minutes on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help=f"figures to run: {', '.join(f.name for f in FIGURES)}")
    parser.add_argument("--dataset", default=None, metavar="PATH",
                        help="dataset spec (an .npz path, cifar10, synthetic[:N]); default: the shared real "
                             f"CIFAR-10 subset ({SUBSET}), else synthetic")
    args = parser.parse_args(argv)
    if args.only is not None:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {f.name for f in FIGURES})
        if unknown or not wanted:
            parser.error(f"--only: unknown figure(s) {', '.join(unknown) or '(none given)'}; "
                         f"valid: {', '.join(f.name for f in FIGURES)}")
        args.only = set(wanted)
    return args


def make_context(args: argparse.Namespace) -> Context:
    from tuner.errors import TunerError
    from tuner.training.train import resolve_device

    try:
        device = resolve_device(args.device)
    except TunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    note = ""
    dataset = args.dataset
    if dataset is None:
        if SUBSET.is_file():
            dataset = str(SUBSET)
        else:
            dataset, note = "synthetic:5085", f"real CIFAR-10 subset not found at {SUBSET}; synthetic images used"
            log(f"warning: {note}")
    return Context(device=device, dataset=dataset, quick=args.quick, data_note=note)


def run_figures(ctx: Context, figures: tuple[Figure, ...]) -> tuple[dict[str, Measurement], dict[str, str]]:
    results: dict[str, Measurement] = {}
    errors: dict[str, str] = {}
    for fig in figures:
        t0 = time.perf_counter()
        log(f"{fig.name} ...")
        try:
            with OtherLoad() as other:
                m = fig.fn(ctx)
        except Exception as exc:  # noqa: BLE001 - one failing figure must not lose the others
            traceback.print_exc(file=sys.stderr)
            errors[fig.name] = f"{type(exc).__name__}: {exc}"
            results[fig.name] = Measurement(values=dict.fromkeys(fig.keys))
            continue
        m.details.setdefault("seconds", round(time.perf_counter() - t0, 1))
        if not m.skipped and m.details["seconds"] >= 1:
            m.details.setdefault("other_processes_cpu_cores", other.cores)
        results[fig.name] = m
        log(f"{fig.name}: {', '.join(f'{k}={m.values.get(k)}' for k in fig.keys)}"
            + (f" (skipped: {m.skipped})" if m.skipped else "") + f" in {time.perf_counter() - t0:.0f}s"
            + (f"; other processes used {other.cores} cores meanwhile" if other.cores else ""))
    return results, errors


def main(argv: list[str] | None = None) -> int:
    check_registry(FIGURES)
    args = parse_args(argv)
    ctx = make_context(args)
    import torch

    from benchmarks.report import json_line, print_table, rows

    figures = tuple(f for f in FIGURES if args.only is None or f.name in args.only or f.always)
    started, load_before = time.perf_counter(), load_average()
    with OtherLoad() as other:
        results, errors = run_figures(ctx, figures)
    meta = {
        "quick": args.quick, "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else cpu_name(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "dataset": ctx.dataset, "dataset_note": ctx.data_note or None,
        "train_images": len(ctx.data.y_train) if ctx._data is not None else None,
        "figures": [f.name for f in figures], "seconds": round(time.perf_counter() - started, 1),
        # CPU used by other processes during the run, in cores (of os.cpu_count()): well above 0,
        # they competed for the cores and every timed figure is noisier (and slower) for it
        "other_processes_cpu_cores": other.cores, "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, load_average()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    title = (f"tuner benchmarks on {meta['device_name']} ({meta['device']}, {meta['torch_threads']} threads)"
             f"{', quick' if args.quick else ''}: {ctx.dataset}, {meta['seconds']}s")
    print_table(title, rows(figures, results, errors))
    print(json_line(figures, results, errors, meta), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
