"""One check of the CUDA path on a bare GPU machine with no network, in under 8 minutes.

    benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [options below]   # installs from DIR, then runs this
    python benchmarks/gpu_check.py [--out DIR] [--budget-s S] [--only PART,...] [--models NAME,...]
    python benchmarks/gpu_check.py --cpu-dry-run [--out DIR]     # tiny sizes on the CPU: checks the script itself
    python benchmarks/gpu_check.py --fetch-wheels DIR [--python-version 3.12]   # here, with network

Parts, in order, each in its own process with its own time box (a part that fails or runs out of
time is recorded and the next one runs):

  env            torch/CUDA/device facts, the peak-table row, package versions, a bf16 matmul ceiling
  tests          `pytest tests/test_cuda.py` (fused vs foreach Adam, syncs per epoch, compiled
                 re-initialisation, resume on CUDA)
  graphs         torch._dynamo's unique graphs after one compiled trial with a partial last batch,
                 and how many a second trial adds (should be 0)
  syncs_kernels  host syncs per epoch (torch.cuda.set_sync_debug_mode("warn")) and, from
                 torch.profiler, CUDA kernels (and aten ops) per training step; eager and compiled
  pack           trial packing (tuner/packing/): 4 mixed trials packed against each alone (bf16, 2 epochs,
                 epoch-1 losses and final val accuracy within a stated tolerance), then images/s,
                 trials-per-hour ratio, TFLOP/s, MFU and peak memory of a packed step for K = 1, 4, 16, 64
  throughput     steady-state images/s, TFLOP/s, MFU and peak memory of train() epochs
                 (benchmarks.gpu.training_throughput), eager and compiled, per model while time allows

Writes gpu_check.json and gpu_check.md (the Markdown tables, also printed) and gpu_check.log (the
parts' own output) under --out (default: $OUT, else /tmp/gpu-check-out). Exit status 0 when no part
failed or timed out, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tuner` importable from the repo root
    sys.path.insert(0, str(ROOT))

FULL_SPEC = "synthetic:50000"  # full CIFAR-10 size, made in memory (no download)
KERNEL_SPEC = "synthetic:10000"  # 9,000 training images: 18 steps at batch 512, a short profile
DRY_SPEC = "synthetic:600"
GPU_MODELS = ("fastcnn", "fastcnn-wide", "resnet18")
BATCH = 512
DRY_BATCH = 64


# Part name, the most seconds it may take, and the seconds it keeps back for the parts after it
# (so one slow part cannot starve the rest). The throughput part takes what is left.
PARTS: tuple[tuple[str, float, float], ...] = (
    ("env", 40, 15),
    ("tests", 140, 60),
    ("graphs", 110, 45),
    ("syncs_kernels", 80, 30),
    ("pack", 120, 45),
    ("throughput", 10_000, 90),
)
DEFAULT_BUDGET_S = 430.0  # the sh script passes what is left of 450 s after installing


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """Atomically, so a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def _cuda_ready(args: argparse.Namespace) -> str | None:
    """None when this part may use CUDA, else why not."""
    if args.cpu_dry_run:
        return "CUDA only (--cpu-dry-run)"
    import torch

    if not torch.cuda.is_available():
        return "CUDA only (no CUDA device available)"
    return None


def _device(args: argparse.Namespace):
    import torch

    return torch.device("cpu" if args.cpu_dry_run else "cuda")


def _params(**training: Any):
    from tuner.study.params import TrialParams

    return TrialParams().with_training(**training)


def _left(args: argparse.Namespace) -> float:
    return args.deadline - time.time() if args.deadline else float("inf")


# ---------------------------------------------------------------------------------------------
# Parts (each runs in a child process: `--part NAME --part-out FILE`)
# ---------------------------------------------------------------------------------------------

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "optuna", "optuna-dashboard", "sqlalchemy", "alembic",
            "colorlog", "tqdm", "plotly", "pyyaml", "typer", "rich", "pydantic", "cmaes", "packaging", "pytest",
            "pytest-timeout", "tuner")


def part_env(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from benchmarks.gpu import peak_entry

    out: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(), "cpu_dry_run": args.cpu_dry_run,
    }
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out["packages"] = versions
    try:
        import tuner.cli  # noqa: F401  (imports optuna, sqlalchemy, typer, rich: the install worked)

        out["tuner_cli_import"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the engine itself needs none of it
        out["tuner_cli_import"] = f"{type(exc).__name__}: {exc}"
    emit(out)
    if torch.cuda.is_available() and not args.cpu_dry_run:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        name = torch.cuda.get_device_name(dev)
        row = peak_entry(name)
        out.update({
            "device_name": name, "capability": list(torch.cuda.get_device_capability(dev)),
            "multiprocessors": props.multi_processor_count, "memory_gib": _round(props.total_memory / 2**30),
            "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
            "peak_part": row.part if row else None, "peak_bf16_tflops": row.tflops if row else None,
            "peak_source": row.source if row else None,
        })
        emit(out)
        out.update(_matmul_ceiling(dev, row.tflops if row else None))
    else:
        out["device_name"] = None
    return out


def _matmul_ceiling(dev, peak: float | None) -> dict[str, Any]:
    """TFLOP/s of an 8192³ bf16 matrix product (mean of 10 after 3 warm-ups, CUDA events): the
    ceiling this machine actually reaches, next to the data sheet's."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    tflops = 2 * n**3 * 10 / (start.elapsed_time(end) / 1000) / 1e12
    return {"matmul_bf16_tflops": _round(tflops), "matmul_fraction_of_peak": _round(tflops / peak) if peak else None}


def part_tests(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    """pytest tests/test_cuda.py in a child process; the JUnit XML gives the per-test outcome."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "tests/test_cuda.py"]
        log(" ".join(cmd))
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=max(10.0, _left(args) - 5))
        out: dict[str, Any] = {"returncode": run.returncode, "command": " ".join(cmd[2:]),
                               "output_tail": run.stdout[-3000:] + run.stderr[-1000:]}
        if not junit.is_file():
            out["error"] = f"pytest wrote no JUnit XML (exit {run.returncode})"
            return out
        cases = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or el.text or "")[:500]
                    break
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": _round(float(case.get("time", 0))),
                          "message": message})
    counts = Counter(c["outcome"] for c in cases)
    out.update({"counts": dict(counts), "cases": cases})
    if run.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        out["error"] = f"{counts['failed']} failed, {counts['error']} errors (pytest exit {run.returncode})"
    return out


def _counter_snapshot() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {k: {str(kk): int(vv) for kk, vv in v.items()} for k, v in counters.items() if v}


def part_graphs(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    reason = _cuda_ready(args)
    if reason:
        return {"skipped": f"{reason}: train() compiles on CUDA only"}
    from torch._dynamo.utils import counters

    from tuner.training.data import load_dataset
    from tuner.training.train import train

    data = load_dataset(FULL_SPEC, _device(args))
    n_train, n_val = len(data.y_train), len(data.y_val)
    params = _params(model="fastcnn", batch_size=BATCH, epochs=1, compile=True)
    out: dict[str, Any] = {"model": "fastcnn", "batch_size": BATCH, "train_images": n_train,
                           "train_last_batch": n_train % BATCH, "val_images": n_val}
    counters.clear()
    t0 = time.perf_counter()
    first = train(params, data)
    out["first_trial_s"] = _round(time.perf_counter() - t0)
    snap1 = _counter_snapshot()
    out["unique_graphs_first_trial"] = snap1.get("stats", {}).get("unique_graphs", 0)
    out["graph_breaks_first_trial"] = sum(snap1.get("graph_break", {}).values())
    out["first_trial_outcome"] = first.outcome
    emit(out)
    t0 = time.perf_counter()
    second = train(params.with_training(seed=1), data)
    out["second_trial_s"] = _round(time.perf_counter() - t0)
    snap2 = _counter_snapshot()
    out["unique_graphs_after_second_trial"] = snap2.get("stats", {}).get("unique_graphs", 0)
    out["graphs_added_by_second_trial"] = out["unique_graphs_after_second_trial"] - out["unique_graphs_first_trial"]
    out["graph_breaks"] = snap2.get("graph_break", {})
    out["second_trial_outcome"] = second.outcome
    out["counters"] = {k: v for k, v in snap2.items() if k in ("stats", "frames", "recompiles", "graph_break",
                                                                  "inductor", "aot_autograd")}
    return out


def _is_sync_warning(w: Any) -> bool:
    return "synchroniz" in str(w.message).lower()


def count_syncs(params: Any, data: Any) -> list[int]:
    """Host syncs in each epoch of one train() call (from the end of the previous epoch's callback
    to the end of this one's: training, validation, the epoch record), caught as the warnings of
    torch.cuda.set_sync_debug_mode("warn"). Epoch 1 also holds the trial's set-up."""
    import warnings

    import torch

    from tuner.training.train import train

    marks: list[int] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            def on_epoch(record: Any = None, *_: Any) -> bool:
                marks.append(sum(1 for w in caught if _is_sync_warning(w)))
                return False

            train(params, data, on_epoch=on_epoch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [b - a for a, b in zip([0, *marks], marks)]


def count_kernels(params: Any, data: Any) -> dict[str, Any]:
    """torch.profiler over epoch 2's training (from the end of epoch 1 to epoch 2's last step):
    CUDA kernels, memcpys and memsets per step (on the GPU), and aten ops per step (every nesting
    level; the host's dispatch work). Epoch 1 (autotuning, compilation) is not profiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tuner.training.train import train

    cuda = data.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    state = {"on": False, "steps": 0, "window": "epoch 2 training"}

    def on_epoch(record: Any = None, *_: Any) -> bool:
        if getattr(record, "epoch", None) == 1 and not state["on"]:
            if cuda:
                torch.cuda.synchronize()
            prof.start()
            state["on"] = True
        return False

    def on_step(i: int, per_epoch: int | None = None, *_: Any) -> None:
        if state["on"]:
            state["steps"] = i
            if per_epoch is not None and i == per_epoch:
                if cuda:
                    torch.cuda.synchronize()
                prof.stop()
                state["on"] = False

    train(params.with_training(epochs=2), data, on_epoch=on_epoch, on_step=on_step)
    if state["on"]:  # the engine's step count did not reach per_epoch: the window ran to the end
        if cuda:
            torch.cuda.synchronize()
        prof.stop()
        state["window"] = "epoch 2 training and validation"
    kinds: Counter[str] = Counter()
    names: Counter[str] = Counter()
    events, source = _profiler_events(prof)
    for dev_type, name in events:
        if dev_type == "cuda":
            low = name.lower()
            kind = "memcpy" if "memcpy" in low else "memset" if "memset" in low else "kernel"
            kinds[kind] += 1
            if kind == "kernel":
                names[name[:90]] += 1
        elif name.startswith("aten::"):
            kinds["aten_op"] += 1
    steps = max(1, int(state["steps"]))
    per = lambda k: _round(kinds[k] / steps) if cuda or k == "aten_op" else None  # noqa: E731
    return {"steps": steps, "window": state["window"], "events_from": source,
            "kernels": kinds["kernel"] if cuda else None, "kernels_per_step": per("kernel"),
            "memcpy_per_step": per("memcpy"), "memset_per_step": per("memset"), "aten_ops_per_step": per("aten_op"),
            "top_kernels": dict(names.most_common(12)) if cuda else None}


def _profiler_events(prof: Any) -> tuple[list[tuple[str, str]], str]:
    """(device type "cuda" or "cpu", name) of every profiled event, and where they came from: the
    raw Kineto results where this torch has them, else the parsed events."""
    from torch.autograd import DeviceType

    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is not None:
        try:
            return ([("cuda" if e.device_type() == DeviceType.CUDA else "cpu", e.name()) for e in raw.events()],
                    "kineto_results")
        except (AttributeError, RuntimeError, TypeError):
            pass
    return [("cuda" if e.device_type == DeviceType.CUDA else "cpu", e.name) for e in prof.events()], "events()"


def part_syncs_kernels(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    from tuner.training.data import load_dataset

    device = _device(args)
    cuda = device.type == "cuda"
    if not cuda and not args.cpu_dry_run:
        return {"skipped": "CUDA only (no CUDA device available)"}
    model, bs = ("tiny", DRY_BATCH) if args.cpu_dry_run else ("fastcnn", BATCH)
    sync_data = load_dataset(DRY_SPEC if args.cpu_dry_run else FULL_SPEC, device)
    kernel_data = load_dataset(DRY_SPEC if args.cpu_dry_run else KERNEL_SPEC, device)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"rows": rows}
    for compiled in (False, True):
        row: dict[str, Any] = {"model": model, "compile": compiled, "batch_size": bs}
        rows.append(row)
        if compiled and not cuda:
            row["skipped"] = "CUDA only: train() compiles on CUDA only"
            continue
        if compiled and _left(args) < 45:
            row["skipped"] = f"time box: {_left(args):.0f} s left"
            continue
        params = _params(model=model, batch_size=bs, epochs=3, compile=compiled)
        steps = -(-len(sync_data.y_train) // bs)
        row.update({"sync_train_images": len(sync_data.y_train), "sync_steps_per_epoch": steps,
                    "syncs_expected_about": steps // 16 + 6})
        if cuda:
            per_epoch = count_syncs(params, sync_data)
            row.update({"syncs_per_epoch": per_epoch, "syncs_steady_epoch": per_epoch[-1] if per_epoch else None})
        else:
            row["syncs_per_epoch"] = None
            row["syncs_note"] = "CUDA only (torch.cuda.set_sync_debug_mode)"
        emit(out)
        row.update({f"profile_{k}" if k in ("steps", "window") else k: v
                    for k, v in count_kernels(params, kernel_data).items()})
        emit(out)
    return out


def part_throughput(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks.gpu import count_flops_per_image, training_throughput
    from tuner.training.data import load_dataset

    device = _device(args)
    cuda = device.type == "cuda"
    if not cuda and not args.cpu_dry_run:
        return {"skipped": "CUDA only (no CUDA device available)"}
    if args.cpu_dry_run:
        models, spec, bs, warmup, epochs = ("tiny",), DRY_SPEC, DRY_BATCH, 1, 1
    else:
        models, spec, bs, warmup, epochs = tuple(args.models), FULL_SPEC, BATCH, 1, 3
    data = load_dataset(spec, device)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"dataset": spec, "train_images": len(data.y_train), "rows": rows}
    # every model eager first, then compiled: compiling costs a minute or more per model
    plan = [(models[0], False), (models[0], True)] + [(m, False) for m in models[1:]] + [(m, True) for m in models[1:]]
    flops: dict[str, float] = {}
    for i, (model, compiled) in enumerate(plan):
        row: dict[str, Any] = {"model": model, "compile": compiled, "batch_size": bs}
        need = (60 if i == 1 else 150) if compiled else 35  # fastcnn's graphs are in the inductor cache by now
        if compiled and not cuda:
            row["skipped"] = "CUDA only: train() compiles on CUDA only"
        elif _left(args) < need:
            row["skipped"] = f"time box: {_left(args):.0f} s left, about {need} s needed"
        else:
            log(f"throughput: {model}{' compiled' if compiled else ''}, batch {bs}, {warmup}+{epochs} epochs")
            try:
                if model not in flops:
                    flops[model] = count_flops_per_image(model, device, bs, "auto", data.num_classes) / 1e9
                row.update(training_throughput(data, model, batch_size=bs, compile=compiled, warmup_epochs=warmup,
                                               epochs=epochs, gflops_per_image=flops[model]))
            except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        emit(out)
    if any("error" in r for r in rows):
        out["error"] = "; ".join(f"{r['model']}{' compiled' if r['compile'] else ''}: {r['error']}"
                                 for r in rows if "error" in r)
    return out


PACK_MIX: tuple[dict[str, Any], ...] = (  # tests/test_pack.py's MIXED: adam/adamw, amsgrad, warm-up, clipping
    {"optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 1e-3},
     "schedule": {"name": "cosine", "warmup_fraction": 0.2}, "clipping": {"mode": "none"}},
    {"optimizer": {"name": "adamw", "lr": 5e-3, "weight_decay": 5e-2, "amsgrad": True},
     "schedule": {"name": "linear", "warmup_fraction": 0.1}, "clipping": {"mode": "norm", "threshold": 0.5}},
    {"optimizer": {"name": "adam", "lr": 2e-3, "betas": [0.8, 0.99], "eps": 1e-6, "amsgrad": True},
     "schedule": {"name": "step", "warmup_fraction": 0.15}, "clipping": {"mode": "value", "threshold": 0.01}},
    {"optimizer": {"name": "adamw", "lr": 1e-3},
     "schedule": {"name": "onecycle"}, "clipping": {"mode": "norm", "threshold": 2.0}},
)
# packed vs alone: bf16 on CUDA (cuDNN picks its own algorithms; nothing is bitwise), fp32 on the CPU
PACK_TOL = {"bf16": {"loss_rtol": 2e-2, "acc_points": 2.0}, "fp32": {"loss_rtol": 1e-4, "acc_points": 0.5}}
PACK_KS, DRY_PACK_KS = (1, 4, 16, 64), (1, 2)


def _pack_trials(k: int, *, model: str, batch_size: int, epochs: int, precision: str,
                 dataset: str) -> list[Any]:
    """K trials of one study: PACK_MIX's configurations in turn, seeds 0..K-1."""
    from tuner.study.params import parse_params

    return [parse_params({**PACK_MIX[i % len(PACK_MIX)],
                          "training": {"model": model, "epochs": epochs, "batch_size": batch_size, "seed": i,
                                       "dataset": dataset, "precision": precision, "compile": False}})
            for i in range(k)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def _pack_exactness(trials: list[Any], data: Any, precision: str) -> dict[str, Any]:
    """The K trials packed (Pack's default: exact on the CPU, not on CUDA) against each alone."""
    from tuner.packing.runtime import Pack
    from tuner.training.train import train

    pack = Pack(data, len(trials), trials[0].training)
    for i, params in enumerate(trials):
        pack.add(i, params)
    t0 = time.perf_counter()
    while pack.run_epoch():
        pass
    packed_s = time.perf_counter() - t0
    tol = PACK_TOL[precision]
    rows, alone_s = [], 0.0
    for i, params in enumerate(trials):
        t0 = time.perf_counter()
        single = train(params, data)
        alone_s += time.perf_counter() - t0
        p, s = pack.result(i).history, single.history
        e1 = {key: _rel(s[0][key], p[0][key]) for key in ("train_loss", "val_loss")}
        acc = 100 * abs(p[-1]["val_accuracy"] - s[-1]["val_accuracy"])
        rows.append({"trial": i, "optimizer": params.optimizer.name, "amsgrad": params.optimizer.amsgrad,
                     "schedule": params.schedule.name, "clipping": params.clipping.mode,
                     "epochs_packed": len(p), "epochs_alone": len(s),
                     "epoch1_train_loss_rel": _round(e1["train_loss"]), "epoch1_val_loss_rel": _round(e1["val_loss"]),
                     "epoch1_loss_rel_max": _round(max(e1.values())),
                     "val_acc_packed": _round(p[-1]["val_accuracy"]), "val_acc_alone": _round(s[-1]["val_accuracy"]),
                     "val_acc_diff_points": _round(acc),
                     "passed": len(p) == len(s) and max(e1.values()) <= tol["loss_rtol"] and acc <= tol["acc_points"]})
    return {"k": len(trials), "exact": pack.exact, "precision": precision, "tolerance": tol,
            "passed": all(r["passed"] for r in rows), "packed_s": _round(packed_s), "alone_s": _round(alone_s),
            "rows": rows}


def _pack_k_row(k: int, data: Any, cuda: bool, *, model: str, bs: int, precision: str, dataset: str,
                warmup: int, steps: int) -> dict[str, Any]:
    """Seconds per packed step of K trials (after `warmup` steps), and the peak memory."""
    import torch

    from tuner.packing.runtime import Pack

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trials = _pack_trials(k, model=model, batch_size=bs, epochs=1, precision=precision, dataset=dataset)
    pack = Pack(data, k, trials[0].training)
    for i, params in enumerate(trials):
        pack.add(i, params)
    try:
        pack.probe(steps=warmup)  # its own first step, then `warmup` more: cuDNN's autotuning, the allocator
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pack.probe(steps=steps - 1)  # probe adds one untimed-by-it step: all `steps` are inside the events
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000 / steps
        else:
            seconds = pack.probe(steps=steps)
        row: dict[str, Any] = {"k": k, "seconds_per_step": _round(seconds), "images_per_s": _round(k * bs / seconds)}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_memory_mb=_round(peak / 2**20), pack_memory_mb=_round((peak - base) / 2**20))
        return row
    finally:
        del pack


def part_pack(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict[str, Any]:
    """Trial packing (tuner/packing/) on this device: K mixed trials packed against each alone, then
    step throughput, FLOP/s and memory for K = 1, 4, 16, 64."""
    import torch

    from benchmarks.gpu import count_flops_per_image, peak_tflops
    from tuner.packing.sizing import is_oom
    from tuner.training.data import load_dataset

    device = _device(args)
    cuda = device.type == "cuda"
    if not cuda and not args.cpu_dry_run:
        return {"skipped": "CUDA only (no CUDA device available)"}
    if args.cpu_dry_run:
        model, bs, precision, exact_spec, table_spec, ks, warmup, steps = (
            "tiny", 32, "fp32", DRY_SPEC, DRY_SPEC, DRY_PACK_KS, 1, 2)
    else:
        model, bs, precision, exact_spec, table_spec, ks, warmup, steps = (
            "fastcnn", BATCH, "bf16", KERNEL_SPEC, FULL_SPEC, PACK_KS, 3, 10)
    out: dict[str, Any] = {"model": model, "batch_size": bs, "precision": precision}

    # 1. exactness: 4 mixed trials, 2 epochs, packed against each alone
    data = load_dataset(exact_spec, device)
    log(f"pack: exactness, {len(PACK_MIX)} mixed {model} trials on {exact_spec}, {precision}, 2 epochs")
    trials = _pack_trials(len(PACK_MIX), model=model, batch_size=bs, epochs=2, precision=precision,
                          dataset=exact_spec)
    try:
        out["exactness"] = {"dataset": exact_spec, "train_images": len(data.y_train),
                            **_pack_exactness(trials, data, precision)}
    except Exception as exc:  # noqa: BLE001 - recorded; the K table still runs
        out["exactness"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    emit(out)
    del data
    if cuda:
        torch.cuda.empty_cache()

    # 2. the K table
    data = load_dataset(table_spec, device)
    gflops = count_flops_per_image(model, device, bs, precision, data.num_classes) / 1e9
    peak, _ = peak_tflops(torch.cuda.get_device_name(device)) if cuda else (None, "")
    rows: list[dict[str, Any]] = []
    out["k_table"] = {"dataset": table_spec, "warmup_steps": warmup + 1, "timed_steps": steps,
                      "gflops_per_image": _round(gflops), "peak_bf16_tflops": peak,
                      "timing": "CUDA events" if cuda else "time.perf_counter", "rows": rows}
    one: float | None = None
    last_s = 0.0
    for k in ks:
        need = 10 + 2.5 * last_s * (k / max(1, rows[-1]["k"])) if rows else 10
        if _left(args) < need + 15:
            rows.append({"k": k, "skipped": f"time box: {_left(args):.0f} s left, about {need:.0f} s needed"})
            break
        log(f"pack: K = {k}, {model} batch {bs}, {warmup + 1}+{steps} steps")
        t0 = time.perf_counter()
        try:
            row = _pack_k_row(k, data, cuda, model=model, bs=bs, precision=precision, dataset=table_spec,
                              warmup=warmup, steps=steps)
        except Exception as exc:  # noqa: BLE001 - out of memory ends the table; anything else is recorded too
            oom = is_oom(exc) or "out of memory" in str(exc).lower()
            rows.append({"k": k, "oom" if oom else "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            if cuda:
                torch.cuda.empty_cache()
            emit(out)
            break
        last_s = time.perf_counter() - t0
        row["wall_s"] = _round(last_s)
        rate = k / row["seconds_per_step"]
        one = one or rate
        tflops = row["images_per_s"] * gflops / 1e3
        row.update(trials_per_hour_ratio=_round(rate / one), tflops=_round(tflops),
                   mfu=_round(tflops / peak) if peak else None)
        rows.append(row)
        emit(out)
    if any("error" in r for r in rows):
        out["error"] = "; ".join(f"K={r['k']}: {r['error']}" for r in rows if "error" in r)

    # 3. CUDA graphs for a pack's step
    out["cuda_graphs"] = {"skipped": "not measured: Pack._step rebinds the stacked [K, ...] tensors into the "
                                     "skeleton's modules and indexes per-slot schedule tables every step, so "
                                     "torch.compile(mode='reduce-overhead') would need a static-input rewrite of "
                                     "the step first; out of this part's time box"}
    ex = out["exactness"]
    if "error" in ex:
        out["error"] = "; ".join(filter(None, [out.get("error"), f"exactness: {ex['error']}"]))
    elif not ex["passed"]:
        out["error"] = "; ".join(filter(None, [out.get("error"),
                                               f"packed vs alone outside the {precision} tolerance {ex['tolerance']}"]))
    return out


PART_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Callable[[dict], None]], dict[str, Any]]] = {
    "env": part_env, "tests": part_tests, "graphs": part_graphs, "syncs_kernels": part_syncs_kernels,
    "pack": part_pack, "throughput": part_throughput,
}


def run_part(args: argparse.Namespace) -> int:
    """In the child: run one part, writing its result (also partial ones) to --part-out."""
    path = Path(args.part_out)
    try:
        import torch

        # one thread in the dry run: on a small shared machine, torch's spinning threads slow tiny models ~50×
        torch.set_num_threads(1 if args.cpu_dry_run else min(os.cpu_count() or 1, 16))
        result = PART_FUNCTIONS[args.part](args, lambda partial: write_json(path, partial))
    except Exception as exc:  # noqa: BLE001 - recorded for the report
        traceback.print_exc()
        previous = json.loads(path.read_text()) if path.is_file() else {}
        write_json(path, {**previous, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]})
        return 1
    write_json(path, result)
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

def _child(args: argparse.Namespace, name: str, timeout: float, deadline: float, tmp: Path,
           logfile: Any) -> dict[str, Any]:
    out_file = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out_file),
           "--deadline", f"{deadline:.1f}", "--models", ",".join(args.models)]
    if args.cpu_dry_run:
        cmd.append("--cpu-dry-run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    logfile.write(f"\n===== part {name} (time box {timeout:.0f} s) =====\n")
    logfile.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and whatever it started (pytest)
        except ProcessLookupError:
            pass
        rc = proc.wait()
    seconds = round(time.perf_counter() - t0, 1)
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    entry: dict[str, Any] = {"seconds": seconds, "time_box_s": round(timeout), "returncode": rc}
    if timed_out:
        entry.update(status="timeout", reason=f"stopped after its {timeout:.0f} s time box")
    elif result.get("skipped"):
        entry.update(status="skipped", reason=result.pop("skipped"))
    elif rc != 0 or "error" in result:
        entry.update(status="failed", reason=result.get("error") or f"exit status {rc}")
    else:
        entry["status"] = "ok"
    entry["result"] = result
    return entry


def _install_entry(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return {"status": "missing", "reason": f"{path} not found"}
    text = p.read_text(errors="replace")
    status = re.findall(r"^install status: (\S+)", text, flags=re.MULTILINE)
    return {"status": status[-1] if status else "unknown", "log_tail": text[-3000:]}


def orchestrate(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.budget_s
    wanted = [p for p in PARTS if args.only is None or p[0] in args.only]
    report: dict[str, Any] = {
        "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_dry_run": args.cpu_dry_run,
                 "budget_s": args.budget_s, "models": args.models, "python": platform.python_version(),
                 "host": platform.node(), "root": str(ROOT)},
        "install": _install_entry(args.install_log),
        "parts": {},
    }
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp, open(out_dir / "gpu_check.log", "w") as logfile:
        for i, (name, cap, _) in enumerate(wanted):
            keep_back = sum(p[2] for p in wanted[i + 1:])
            timeout = min(cap, deadline - time.time() - keep_back)
            if timeout < 10:
                report["parts"][name] = {"status": "skipped", "seconds": 0,
                                         "reason": f"time budget spent ({args.budget_s:.0f} s in all)", "result": {}}
            else:
                log(f"part {name}: time box {timeout:.0f} s")
                part_deadline = time.time() + timeout
                report["parts"][name] = _child(args, name, timeout, part_deadline, Path(tmp), logfile)
                entry = report["parts"][name]
                log(f"part {name}: {entry['status']} in {entry['seconds']} s"
                    + (f" ({entry.get('reason')})" if entry.get("reason") else ""))
            report["meta"]["seconds"] = round(time.time() - started, 1)
            write_json(json_path, report)
            md_path.write_text(markdown(report))
    report["meta"]["seconds"] = round(time.time() - started, 1)
    bad = [n for n, e in report["parts"].items() if e["status"] in ("failed", "timeout")]
    report["meta"]["failed_parts"] = bad
    write_json(json_path, report)
    text = markdown(report)
    md_path.write_text(text)
    print(text, flush=True)
    log(f"wrote {json_path} and {md_path}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _summary(name: str, entry: dict[str, Any]) -> str:
    r = entry.get("result") or {}
    if entry["status"] not in ("ok", "failed", "timeout"):
        return entry.get("reason", "")
    if name == "env":
        bits = [r.get("device_name") or "no CUDA device", f"torch {r.get('torch')} (CUDA {r.get('torch_cuda')})"]
        if r.get("device_name"):
            bits.append(f"table peak {r.get('peak_bf16_tflops')} TFLOP/s ({r.get('peak_part')})")
        if r.get("matmul_bf16_tflops"):
            bits.append(f"8192³ bf16 matmul {r['matmul_bf16_tflops']} TFLOP/s")
        return "; ".join(bits + [f"tuner.cli import: {r.get('tuner_cli_import')}"])
    if name == "tests":
        c = r.get("counts", {})
        return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or r.get("error", "")
    if name == "graphs":
        return (f"{r.get('unique_graphs_first_trial')} unique graphs after one compiled trial (last train batch "
                f"{r.get('train_last_batch')}), +{r.get('graphs_added_by_second_trial')} from a second; "
                f"{r.get('graph_breaks_first_trial')} graph breaks")
    if name == "pack":
        ex, kt = r.get("exactness") or {}, (r.get("k_table") or {}).get("rows", [])
        bits = []
        if "passed" in ex:
            worst = max((x["epoch1_loss_rel_max"] for x in ex["rows"]), default=None)
            acc = max((x["val_acc_diff_points"] for x in ex["rows"]), default=None)
            bits.append(f"packed vs alone {'within' if ex['passed'] else 'OUTSIDE'} {ex['precision']} tolerance "
                        f"(epoch-1 loss rel {_fmt(worst)}, val acc {_fmt(acc)} points)")
        elif ex.get("error"):
            bits.append(f"exactness: {ex['error']}")
        done = [x for x in kt if "seconds_per_step" in x]
        if done:
            best = max(done, key=lambda x: x["trials_per_hour_ratio"])
            bits.append(f"K = {', '.join(str(x['k']) for x in done)} measured; best {best['trials_per_hour_ratio']}x "
                        f"trials/hour at K = {best['k']}")
        bits += [f"K = {x['k']}: {x.get('oom') and 'out of memory' or x.get('skipped') or x.get('error')}"
                 for x in kt if "seconds_per_step" not in x]
        return "; ".join(bits) or entry.get("reason", "")
    text = entry.get("reason", "") if entry["status"] != "ok" else ""
    rows = r.get("rows", [])
    done = sum(1 for x in rows if "skipped" not in x and "error" not in x)
    return f"{done} of {len(rows)} configurations measured" + (f"; {text}" if text else "")


def markdown(report: dict[str, Any]) -> str:
    parts = report["parts"]
    env = (parts.get("env") or {}).get("result") or {}
    title = env.get("device_name") or ("CPU dry run" if report["meta"]["cpu_dry_run"] else "no CUDA device")
    lines = [f"# tuner GPU check: {title}", "",
             f"torch {env.get('torch')}, Python {report['meta']['python']}, started {report['meta']['started']}, "
             f"{report['meta'].get('seconds')} s of a {report['meta']['budget_s']:.0f} s budget"
             + (" (--cpu-dry-run: tiny sizes on the CPU)" if report["meta"]["cpu_dry_run"] else ""), ""]
    install = report.get("install")
    rows = [["install", install["status"], None, "see install.log"]] if install else []
    rows += [[n, e["status"], e.get("seconds"), _summary(n, e)] for n, e in parts.items()]
    lines += _table(["part", "status", "s", "summary"], rows)
    thr = (parts.get("throughput") or {}).get("result") or {}
    if thr.get("rows"):
        lines += [f"## Throughput: steady-state `train()` epochs ({thr.get('dataset')}, "
                  f"{thr.get('train_images')} training images)", ""]
        lines += _table(
            ["model", "compile", "batch", "precision", "img/s", "TFLOP/s", "MFU", "peak mem MB", "epoch s",
             "first epoch s", "note"],
            [[r["model"], r["compile"], r["batch_size"], r.get("precision"), r.get("images_per_s"), r.get("tflops"),
              r.get("mfu"), r.get("peak_memory_mb"), r.get("epoch_seconds"), r.get("first_epoch_s"),
              r.get("skipped") or r.get("error") or ""] for r in thr["rows"]])
        peak = next((r for r in thr["rows"] if r.get("peak_tflops")), None)
        if peak:
            lines += [f"MFU is against the {peak['peak_part']} dense bf16 peak of {peak['peak_tflops']:g} TFLOP/s "
                      f"(benchmarks/gpu.py PEAKS); the 8192³ bf16 matmul reached {env.get('matmul_bf16_tflops')}.", ""]
    pk = (parts.get("pack") or {}).get("result") or {}
    ex = pk.get("exactness") or {}
    if ex.get("rows"):
        tol = ex["tolerance"]
        lines += [f"## Trial packing: {ex['k']} mixed trials packed vs each alone ({pk.get('model')}, "
                  f"{ex['precision']}, exact={ex['exact']}, {ex.get('train_images')} training images, 2 epochs)", ""]
        lines += _table(
            ["trial", "optimizer", "amsgrad", "schedule", "clipping", "epoch-1 train loss rel", "epoch-1 val loss rel",
             "val acc packed", "val acc alone", "diff (points)", "passed"],
            [[x["trial"], x["optimizer"], x["amsgrad"], x["schedule"], x["clipping"], x["epoch1_train_loss_rel"],
              x["epoch1_val_loss_rel"], x["val_acc_packed"], x["val_acc_alone"], x["val_acc_diff_points"],
              x["passed"]] for x in ex["rows"]])
        lines += [f"Tolerance: epoch-1 losses within {tol['loss_rtol']:g} relative, val accuracy within "
                  f"{tol['acc_points']:g} points; packed {ex['packed_s']} s, alone {ex['alone_s']} s in all.", ""]
    kt = pk.get("k_table") or {}
    if kt.get("rows"):
        lines += [f"## Trial packing: K trials per step ({pk.get('model')}, batch {pk.get('batch_size')}, "
                  f"{kt['timed_steps']} timed steps after {kt['warmup_steps']}, {kt['timing']})", ""]
        lines += _table(
            ["K", "s/step", "img/s (all slots)", "trials/hour vs K=1", "TFLOP/s", "MFU", "peak mem MB",
             "pack mem MB", "note"],
            [[x["k"], x.get("seconds_per_step"), x.get("images_per_s"), x.get("trials_per_hour_ratio"),
              x.get("tflops"), x.get("mfu"), x.get("peak_memory_mb"), x.get("pack_memory_mb"),
              x.get("oom") or x.get("skipped") or x.get("error") or ""] for x in kt["rows"]])
        lines += [f"FLOPs: {kt['gflops_per_image']} GFLOP per image (forward + backward of one model, "
                  "torch.utils.flop_counter; the optimizer step is not counted); MFU against "
                  f"{kt.get('peak_bf16_tflops') or '–'} TFLOP/s bf16. CUDA graphs: "
                  f"{(pk.get('cuda_graphs') or {}).get('skipped', '–')}", ""]
    sk = (parts.get("syncs_kernels") or {}).get("result") or {}
    if sk.get("rows"):
        lines += ["## Syncs per epoch and kernels per step", ""]
        lines += _table(
            ["model", "compile", "steps/epoch", "syncs per epoch (1, 2, 3)", "about expected", "kernels/step",
             "memcpy/step", "memset/step", "aten ops/step", "note"],
            [[r["model"], r["compile"], r.get("sync_steps_per_epoch"), r.get("syncs_per_epoch"),
              r.get("syncs_expected_about"), r.get("kernels_per_step"), r.get("memcpy_per_step"),
              r.get("memset_per_step"), r.get("aten_ops_per_step"),
              r.get("skipped") or r.get("syncs_note") or ""] for r in sk["rows"]])
    tests = (parts.get("tests") or {}).get("result") or {}
    bad = [c for c in tests.get("cases", []) if c["outcome"] in ("failed", "error")]
    if bad:
        lines += ["## Failed tests", ""]
        lines += _table(["test", "outcome", "message"], [[c["test"], c["outcome"], c["message"][:300]] for c in bad])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Wheels for a machine without network
# ---------------------------------------------------------------------------------------------

NOT_WHEELED = {"torch", "torchvision"}  # the GPU machine's own builds are used; never downloaded
ON_DEVICE_IMAGE = {"numpy", "scipy"}  # large, and in the GPU image already (.library/device/KINDS.md)
EXTRA_ROOTS = ("pytest>=8.0", "pytest-timeout>=2.3", "setuptools>=68", "wheel")  # the tests; the editable build
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux_2_39_x86_64")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[str]:
    """The project's runtime requirements (pyproject.toml), as written there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from importlib.metadata import requires

        return [r for r in requires("tuner") or [] if "extra ==" not in r]
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def wheel_plan(python_version: str = "3.12") -> dict[str, Any]:
    """What to download for `pip install --no-index` on a Python `python_version` machine: the
    project's requirements (less torch and torchvision) and the test tools, with everything they
    need, at the versions installed here (known to work with the project), less what the GPU image
    has and is too big to carry. Requirements not installed here are fetched by their spec."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    install = [r for r in project_requirements() if _canon(Requirement(r).name) not in NOT_WHEELED]
    install += list(EXTRA_ROOTS[:2])
    todo = [Requirement(r) for r in install] + [Requirement(r) for r in EXTRA_ROOTS[2:]]
    pinned: dict[str, str] = {}
    for_spec: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = _canon(req.name)
        if name in pinned or name in for_spec or name in NOT_WHEELED:
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            for_spec[name] = str(Requirement(f"{req.name}{req.specifier}"))
            continue
        pinned[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or []]
    downloads = sorted(f"{n}=={v}" for n, v in pinned.items() if n not in ON_DEVICE_IMAGE)
    downloads += sorted(s for n, s in for_spec.items() if n not in ON_DEVICE_IMAGE)
    return {"python_version": python_version, "requirements": install, "downloads": downloads,
            "left_to_the_device_image": sorted(ON_DEVICE_IMAGE & (set(pinned) | set(for_spec)))}


def pip_download_command(dest: str, plan: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", plan["python_version"], "--implementation", "cp",
           "--dest", dest]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + plan["downloads"]


def fetch_wheels(dest: str, python_version: str) -> int:
    """Fill `dest` with the wheels (and a requirements.txt) that gpu_check.sh installs offline."""
    plan = wheel_plan(python_version)
    Path(dest).mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(dest, plan)
    log(" ".join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        log(f"pip download failed (exit {rc}); a wheel missing for Python {python_version} on x86-64 Linux is named "
            "above")
        return rc
    (Path(dest) / "requirements.txt").write_text("\n".join(plan["requirements"]) + "\n")
    wheels = sorted(Path(dest).glob("*.whl"))
    names = Counter(_canon(w.name.split("-")[0]) for w in wheels)
    for name, count in names.items():
        if count > 1:
            log(f"warning: {count} wheels of {name} in {dest}: delete all but one (the --no-deps fallback "
                "installs every file)")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    log(f"{len(wheels)} wheels, {size:.1f} MiB in {dest}; left to the GPU image: "
        f"{', '.join(plan['left_to_the_device_image']) or 'nothing'}")
    return 0


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-check-out",
                        help="folder for gpu_check.json, gpu_check.md, gpu_check.log (default: $OUT, else "
                             "/tmp/gpu-check-out)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", default=None, metavar="PART,...", help=f"parts: {', '.join(p[0] for p in PARTS)}")
    parser.add_argument("--models", default=",".join(GPU_MODELS), metavar="NAME,...",
                        help="throughput models, in order, while time allows")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny sizes on the CPU, CUDA-only parts skipped: checks this script runs")
    parser.add_argument("--install-log", default=None, help=argparse.SUPPRESS)  # written by gpu_check.sh
    parser.add_argument("--fetch-wheels", default=None, metavar="DIR",
                        help="download the wheels gpu_check.sh installs offline into DIR, and exit")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --fetch-wheels")
    parser.add_argument("--part", default=None, choices=sorted(PART_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from tuner.training.models import MODELS

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(sorted(MODELS))}")
    if args.only is not None:
        args.only = {p.strip() for p in args.only.split(",") if p.strip()}
        bad = args.only - {p[0] for p in PARTS}
        if bad or not args.only:
            parser.error(f"--only: unknown part(s) {', '.join(sorted(bad)) or '(none given)'}")
    if args.part and not args.part_out:
        parser.error("--part needs --part-out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels, args.python_version)
    if args.part:
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
