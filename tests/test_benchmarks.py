"""The benchmark harness, not its figures: the registry, the arguments, how a sweep's time is
split, the FLOP count the CUDA figures use (run here on the CPU), and one real run of
`benchmarks/run.py` whose CUDA-only figures must say why they are skipped. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from benchmarks.core import Context
from benchmarks.run import FIGURES, check_registry, parse_args
from benchmarks.sweep import _timeline
from conftest import ROOT


def test_registry_and_arguments(capsys):
    check_registry(FIGURES)
    assert parse_args(["--quick", "--only", "sweep_overhead,pruning_savings"]).only == {"sweep_overhead",
                                                                                         "pruning_savings"}
    with pytest.raises(SystemExit) as exc:
        parse_args(["--only", "warp_speed"])
    assert exc.value.code == 2 and "warp_speed" in capsys.readouterr().err


def test_startup_figures_are_registered():
    by_name = {f.name: f for f in FIGURES}
    fig = by_name["startup"]
    assert fig.keys == ("startup_help_seconds", "startup_export_seconds")
    assert all(fig.units[k] == "s" for k in fig.keys)
    assert parse_args(["--only", "startup"]).only == {"startup"}
    assert [f.name for f in FIGURES][-1] == "peak_rss_mb"  # measured last, after every figure


def test_startup_study_is_one_export_reads(tmp_path):
    """The study the start-up figure exports is one `tuner export` accepts (nothing timed here)."""
    from benchmarks.startup import STUDY, make_study
    from tuner.export import export_text
    from tuner.storage import open_storage

    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    make_study(url)
    assert "selected_by: best single run" in export_text(open_storage(url), STUDY)


def _trial(number: int, start: datetime, seconds: float, epochs: list[float]) -> FrozenTrial:
    return FrozenTrial(number=number, state=TrialState.COMPLETE, value=0.5, datetime_start=start,
                       datetime_complete=start + timedelta(seconds=seconds), params={}, distributions={},
                       user_attrs={"history": [{"seconds": s} for s in epochs]}, system_attrs={},
                       intermediate_values={}, trial_id=number)


def test_timeline_splits_one_time_costs_from_the_per_trial_overhead():
    t0 = datetime(2026, 11, 24, 12, 0, 0)
    started = t0.timestamp() - 3.0  # the process started 3 s before the first trial
    trials = [
        _trial(0, t0, 3.5, [1.0, 1.0]),  # 1.5 s outside its epochs: the first trial's lazy imports
        _trial(1, t0 + timedelta(seconds=3.52), 2.05, [1.0, 1.0]),  # 20 ms gap, 50 ms inside
        _trial(2, t0 + timedelta(seconds=5.60), 2.04, [1.0, 1.0]),  # 30 ms gap, 40 ms inside
    ]
    ended = (t0 + timedelta(seconds=7.64 + 0.25)).timestamp()
    parts = _timeline(trials, started, ended)
    assert parts["startup_s"] == pytest.approx(3.0)
    assert parts["first_trial_extra_s"] == pytest.approx(1.5)
    assert parts["exit_s"] == pytest.approx(0.25)
    assert parts["per_trial_ms"] == pytest.approx((20 + 50 + 30 + 40) / 2)


def test_flops_per_image_counts_forward_and_backward_on_the_cpu():
    from benchmarks.gpu import flops_per_image
    from tuner.models import build_model

    ctx = Context(device=torch.device("cpu"), dataset="synthetic:600", quick=True)
    both = flops_per_image(ctx)
    model = build_model(ctx.params().training.model, num_classes=10)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(8, 3, 32, 32))
    forward = counter.get_total_flops() / 8
    assert forward > 1e7  # fastcnn: tens of MFLOPs per 32×32 image
    assert 2.5 * forward < both < 3.5 * forward  # backward ≈ twice the forward


def test_run_on_the_cpu_skips_the_cuda_figures_with_a_reason():
    run = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--device", "cpu", "--dataset",
                          "synthetic:600", "--only", "cuda_throughput,cuda_full_trial"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("cuda_images_per_s", "cuda_tflops", "cuda_mfu", "cuda_trial_peak_memory_mb", "cuda_trial_seconds"):
        assert key in out and out[key] is None
    assert "CUDA only" in out["skipped"]["cuda_throughput"] and "CUDA only" in out["skipped"]["cuda_full_trial"]
    assert out["peak_rss_mb"] > 0 and out["meta"]["device"] == "cpu"
