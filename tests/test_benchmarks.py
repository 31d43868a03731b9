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
    from tuner.insight.export import export_text
    from tuner.storage.database import open_storage

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
    from tuner.training.models import build_model

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
    from benchmarks.gpu import COMPILED_KEYS, THROUGHPUT_KEYS

    figures = ("cuda_throughput", "cuda_compiled_throughput", "cuda_full_trial")
    run = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--device", "cpu", "--dataset",
                          "synthetic:600", "--only", ",".join(figures)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for key in (*THROUGHPUT_KEYS, *COMPILED_KEYS, "cuda_trial_seconds"):
        assert key in out and out[key] is None
    for name in figures:
        assert "CUDA only" in out["skipped"][name]
    assert out["peak_rss_mb"] > 0 and out["meta"]["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# The bf16 peak table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("device_name", "part", "tflops"), [
    ("NVIDIA H100 NVL", "H100 NVL", 835.0),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200 SXM", 989.0),
    ("NVIDIA H200 NVL", "H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA B200", "B200", 2250.0),
    ("NVIDIA GB200", "GB200", 2500.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.0),
    ("Tesla V100-SXM2-16GB", "V100", None),
    ("Tesla T4", "T4", None),
])
def test_peak_table_matches_real_device_names(device_name, part, tflops):
    from benchmarks.gpu import peak_entry, peak_tflops

    row = peak_entry(device_name)
    assert row is not None and row.part == part
    assert peak_tflops(device_name) == (tflops, "bf16" if tflops else "")


def test_peak_table_rows_are_reachable_and_sourced():
    """Each row's own example name resolves to that row, so no earlier (less specific) row shadows
    it; every row says where its figure comes from; unknown parts get no peak."""
    from benchmarks.gpu import PEAKS, peak_entry, peak_tflops

    assert len({r.part for r in PEAKS}) == len(PEAKS)
    for row in PEAKS:
        assert peak_entry(row.example) is row, row.part
        assert row.source and (row.tflops is None or 50 < row.tflops < 5000)
    assert peak_tflops("NVIDIA RTX A6000") == (None, "")
    assert peak_tflops("AMD Instinct MI300X") == (None, "")


def test_training_throughput_reports_a_consistent_row_on_the_cpu():
    """The throughput measurement's bookkeeping (not its speed): images and steps per timed epoch,
    TFLOP/s from the FLOP count and images/s, no MFU without a bf16 peak."""
    from benchmarks.gpu import count_flops_per_image, training_throughput
    from tuner.training.data import load_dataset

    data = load_dataset("synthetic:300")  # 270 training images: 4 full batches of 64 and one of 14
    gflops = count_flops_per_image("tiny", torch.device("cpu"), 64) / 1e9
    row = training_throughput(data, "tiny", batch_size=64, warmup_epochs=1, epochs=2)
    assert row["train_images"] == 270 and row["images_per_epoch"] == 270 and row["steps_per_epoch"] == 5
    assert row["last_batch"] == 270 % 64 and len(row["epoch_seconds"]) == 2 and row["compile"] is False
    assert row["gflops_per_image"] == pytest.approx(gflops, rel=1e-3)
    assert row["tflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_s"] / 1e3, rel=1e-2)
    assert row["mfu"] is None and row["peak_tflops"] is None and row["precision"] == "float32"
    with pytest.raises(ValueError):
        training_throughput(data, "tiny", batch_size=64, warmup_epochs=0, epochs=1)


# ---------------------------------------------------------------------------------------------
# gpu_check: the one-shot script for a bare GPU machine
# ---------------------------------------------------------------------------------------------

def test_gpu_check_dry_run_writes_its_report(tmp_path):
    """`--cpu-dry-run` runs every part at tiny sizes on the CPU: the CUDA-only ones say why they
    were skipped, the others report, and the JSON and Markdown files are written."""
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["env", "tests", "graphs", "syncs_kernels", "pack", "throughput"]
    assert report["meta"]["cpu_dry_run"] is True and report["meta"]["failed_parts"] == []
    assert parts["env"]["status"] == "ok" and parts["env"]["result"]["torch"] == torch.__version__
    assert parts["env"]["result"]["packages"]["optuna"]
    tests = parts["tests"]
    assert tests["status"] == "ok" and tests["result"]["counts"].get("skipped", 0) >= 4
    assert not tests["result"]["counts"].get("failed") and not tests["result"]["counts"].get("passed")
    assert all("CUDA device" in c["message"] for c in tests["result"]["cases"])
    assert parts["graphs"]["status"] == "skipped" and "CUDA only" in parts["graphs"]["reason"]
    eager, compiled = parts["syncs_kernels"]["result"]["rows"]
    assert eager["aten_ops_per_step"] > 0 and eager["kernels_per_step"] is None and eager["syncs_per_epoch"] is None
    assert "CUDA only" in compiled["skipped"]
    eager, compiled = parts["throughput"]["result"]["rows"]
    assert eager["model"] == "tiny" and eager["images_per_s"] > 0 and eager["gflops_per_image"] > 0
    assert eager["images_per_epoch"] == parts["throughput"]["result"]["train_images"]
    assert "CUDA only" in compiled["skipped"]
    pack = parts["pack"]["result"]
    assert parts["pack"]["status"] == "ok" and pack["exactness"]["passed"] and len(pack["exactness"]["rows"]) == 4
    assert [r["k"] for r in pack["k_table"]["rows"]] == [1, 2] and pack["k_table"]["rows"][1]["images_per_s"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert md in run.stdout and "| part | status |" in md and "| tiny | no | 64 |" in md
    assert (tmp_path / "gpu_check.log").is_file()


def test_gpu_check_sh_runs_the_script_and_records_the_skipped_install(tmp_path):
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT).returncode == 0
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--only", "env", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["env"] and report["parts"]["env"]["status"] == "ok"
    assert report["install"]["status"] == "skipped" and "--cpu-dry-run" in report["install"]["log_tail"]
    assert report["meta"]["budget_s"] <= 450


def test_gpu_check_parts_and_arguments(capsys):
    from benchmarks.gpu_check import PARTS, parse_args

    assert [p[0] for p in PARTS] == ["env", "tests", "graphs", "syncs_kernels", "pack", "throughput"]
    args = parse_args(["--only", "env,throughput", "--models", "fastcnn,resnet18"])
    assert args.only == {"env", "throughput"} and args.models == ["fastcnn", "resnet18"]
    for bad in (["--only", "warp"], ["--models", "alexnet"], ["--part", "env"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2
    assert "warp" in capsys.readouterr().err


def test_wheel_plan_pins_what_is_installed_here_and_leaves_torch_behind():
    """What `--fetch-wheels` downloads (no download here): the project's requirements and the
    test tools with everything they need, at this environment's versions, for CPython 3.12."""
    from importlib.metadata import version

    from benchmarks.gpu_check import pip_download_command, wheel_plan

    plan = wheel_plan("3.12")
    pins = dict(d.split("==") for d in plan["downloads"] if "==" in d)
    for name in ("optuna", "sqlalchemy", "alembic", "colorlog", "tqdm", "plotly", "pyyaml", "typer", "rich", "mako",
                 "cmaes", "optuna-dashboard", "pytest", "setuptools"):
        assert pins.get(name) == version(name), name
    assert not any(n.startswith(("torch", "nvidia", "triton", "cuda")) for n in pins)
    assert {"numpy", "scipy"} == set(plan["left_to_the_device_image"]) and "numpy" not in pins
    assert "optuna>=5.0,<5.2" in plan["requirements"] and not any(r.startswith("torch") for r in plan["requirements"])
    cmd = pip_download_command("/tmp/w", plan)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[-len(plan["downloads"]):] == plan["downloads"]


def test_pruning_replay_holds_a_warming_up_winner_only_when_schedule_aware():
    """The replay behind the schedule-aware figures, on hand-made curves: four constant-lr trials
    around 0.30 after epoch 1, then a one-cycle trial (its lr still rising during epoch 1) at 0.28
    after epoch 1 that ends best. Median pruning stops it after epoch 1; with the hold it is first
    judged at epoch 2, where it is above the median, and it wins."""
    from benchmarks.sweep import replay_pruning
    from tuner.study.params import ClippingParams, OptimizerParams, ScheduleParams, TrainingParams, TrialParams

    training = TrainingParams(dataset="synthetic", model="tiny", epochs=6, batch_size=128)

    def trial(number: int, schedule: str, curve: list[float]) -> FrozenTrial:
        params = TrialParams(optimizer=OptimizerParams(), schedule=ScheduleParams(name=schedule),
                             clipping=ClippingParams(), training=training)
        return FrozenTrial(number=number, state=TrialState.COMPLETE, value=curve[-1], datetime_start=None,
                           datetime_complete=None, params={}, distributions={},
                           user_attrs={"params": params.to_dict()}, system_attrs={},
                           intermediate_values=dict(enumerate(curve, start=1)), trial_id=number)

    trials = [trial(i, "constant", [0.29 + 0.01 * i] + [0.35 + 0.01 * i] * 5) for i in range(4)]
    trials.append(trial(4, "onecycle", [0.28, 0.45, 0.5, 0.55, 0.58, 0.6]))
    naive = replay_pruning(trials, 6, aware=False)
    aware = replay_pruning(trials, 6, aware=True)
    assert 4 in naive["pruned"] and naive["best_kept"] < 0.6 and naive["gap_points"] > 20
    assert 4 not in aware["pruned"] and aware["best_kept"] == 0.6 and aware["gap_points"] == 0
    assert naive["epochs_full"] == aware["epochs_full"] == 30 and aware["epochs_kept"] > naive["epochs_kept"]
