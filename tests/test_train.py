"""The training engine: records, clipping, determinism, divergence, early stop, checkpoints, device settings."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tuner.errors import CheckpointError
from tuner.study.params import TrialParams, parse_params
from tuner.training.data import DeviceData, load_dataset
from tuner.training.models import build_model
from tuner.training.optim import LRSchedule
from tuner.training.train import (
    CHECKPOINT_FORMAT,
    EpochRecord,
    TrainResult,
    device_settings,
    load_checkpoint,
    save_checkpoint,
    train,
)

SPEC = "synthetic:200"  # 180 train / 20 val images: a fraction of a second per epoch with the tiny net
RECORD_KEYS = {f.name for f in dataclasses.fields(EpochRecord)}


def make_params(epochs: int = 2, **sections: dict[str, Any]) -> TrialParams:
    training = {"model": "tiny", "epochs": epochs, "batch_size": 32, "dataset": SPEC, "seed": 0,
                **sections.pop("training", {})}
    return parse_params({"training": training, **sections})


@pytest.fixture(scope="module")
def data() -> DeviceData:
    return load_dataset(SPEC)


def timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def weights_differ(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


# ---------------------------------------------------------------------------------------------
# A short run
# ---------------------------------------------------------------------------------------------

def test_short_run_records_every_epoch(data: DeviceData) -> None:
    params = make_params(epochs=2)
    seen: list[EpochRecord] = []
    steps: list[tuple[int, int]] = []
    result = train(params, data, on_epoch=lambda rec: seen.append(rec), evaluate_test=True,
                   on_step=lambda i, n: steps.append((i, n)))
    assert isinstance(result, TrainResult)
    assert result.outcome == "completed" and result.epochs == 2 and len(result.history) == 2
    assert result.diverged_at is None and result.resumed_from_epoch is None
    assert [rec.epoch for rec in seen] == [1, 2]
    assert [rec.to_dict() for rec in seen] == result.history
    per_epoch = math.ceil(len(data.y_train) / 32)
    assert steps == [(i, per_epoch) for i in range(1, per_epoch + 1)] * 2
    for epoch, rec in enumerate(result.history, start=1):
        assert set(rec) == RECORD_KEYS
        assert rec["epoch"] == epoch
        assert rec["grad_norm_p50"] <= rec["grad_norm_p90"] <= rec["grad_norm_max"]
        assert rec["grad_norm_p50"] > 0
        assert 0.0 <= rec["clip_fraction"] <= 1.0
        assert rec["clip_fraction"] == 0.0  # clipping is off by default
        assert 0.0 <= rec["val_accuracy"] <= 1.0
        assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["val_loss"])
        assert 0 < rec["lr"] <= params.optimizer.lr
        assert rec["seconds"] > 0
    assert result.history[1]["lr"] < result.history[0]["lr"]  # cosine decays
    assert result.val_accuracy == result.history[-1]["val_accuracy"]
    assert result.val_loss == result.history[-1]["val_loss"]
    assert result.test_accuracy is not None and 0.0 <= result.test_accuracy <= 1.0
    assert math.isfinite(result.test_loss)
    assert isinstance(result.model, torch.nn.Module)
    assert result.device == "cpu" and result.seconds > 0
    plain = result.to_dict()
    assert "model" not in plain and json.loads(json.dumps(plain))["history"] == result.history


def test_test_set_only_on_request(data: DeviceData) -> None:
    result = train(make_params(epochs=1), data)
    assert result.test_accuracy is None and result.test_loss is None
    assert result.val_accuracy is not None


def test_weights_start_from_the_seed_and_change(data: DeviceData) -> None:
    params = make_params(epochs=1)
    torch.manual_seed(params.training.seed)
    initial = build_model("tiny", data.num_classes)
    result = train(params, data)
    trained = result.model.state_dict()
    for key, value in initial.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert not torch.equal(value, trained[key]), key  # every weight was updated


def test_tiny_norm_threshold_clips_every_step(data: DeviceData) -> None:
    params = make_params(epochs=2, clipping={"mode": "norm", "threshold": 1e-3})
    result = train(params, data)
    assert result.outcome == "completed"
    assert [rec["clip_fraction"] for rec in result.history] == [1.0, 1.0]
    assert all(rec["grad_norm_p50"] > 1e-3 for rec in result.history)  # norms are measured before clipping


def test_value_clipping_fraction(data: DeviceData) -> None:
    result = train(make_params(epochs=1, clipping={"mode": "value", "threshold": 1e-6}), data)
    assert result.history[0]["clip_fraction"] == 1.0
    result = train(make_params(epochs=1, clipping={"mode": "value", "threshold": 1e6}), data)
    assert result.history[0]["clip_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_run_other_seed_differs(data: DeviceData) -> None:
    params = make_params(epochs=2)
    a = train(params, data)
    torch.manual_seed(12345)  # the global RNG state before a run does not matter
    b = train(params, data)
    assert timeless(a.history) == timeless(b.history)
    assert_same_weights(a.model, b.model)
    c = train(make_params(epochs=2, training={"seed": 1}), data)
    assert timeless(c.history) != timeless(a.history)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]
    assert weights_differ(a.model, c.model)


# ---------------------------------------------------------------------------------------------
# Divergence and early stopping
# ---------------------------------------------------------------------------------------------

def test_huge_lr_diverges(data: DeviceData) -> None:
    params = make_params(epochs=3, optimizer={"lr": 10})
    calls: list[EpochRecord] = []
    result = train(params, data, on_epoch=lambda rec: calls.append(rec), evaluate_test=True)
    assert result.outcome == "diverged"
    at = result.diverged_at
    assert at is not None and set(at) >= {"epoch", "step", "loss"}
    assert 1 <= at["epoch"] <= 3 and at["step"] >= 1
    assert not (at["loss"] < 10 * math.log(10))  # NaN/inf or above the limit
    assert result.epochs == len(result.history) == at["epoch"] - 1 == len(calls)
    assert result.test_accuracy is None


def test_on_epoch_true_stops(data: DeviceData) -> None:
    params = make_params(epochs=4)
    seen: list[int] = []

    def on_epoch(rec: EpochRecord) -> bool:
        seen.append(rec.epoch)
        return rec.epoch == 2

    result = train(params, data, on_epoch=on_epoch)
    assert result.outcome == "stopped"
    assert seen == [1, 2] and result.epochs == 2 and len(result.history) == 2
    assert result.val_accuracy == result.history[-1]["val_accuracy"]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def test_resume_gives_the_same_run(data: DeviceData, tmp_path: Path) -> None:
    params = make_params(epochs=3, schedule={"name": "step", "gamma": 0.5, "milestones": [0.4]},
                         clipping={"mode": "norm", "threshold": 1.0})
    full = train(params, data, evaluate_test=True)
    assert full.outcome == "completed"

    ckpt = tmp_path / "run" / "ckpt.pt"
    first = train(params, data, checkpoint_path=ckpt, on_epoch=lambda rec: rec.epoch == 1)
    assert first.outcome == "stopped" and first.epochs == 1 and ckpt.is_file()
    state = load_checkpoint(ckpt, params)
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 1 and state["history"] == first.history
    assert state["step"] == math.ceil(len(data.y_train) / 32)

    torch.manual_seed(999)
    resumed = train(params, data, checkpoint_path=ckpt, resume_from=ckpt, evaluate_test=True)
    assert resumed.outcome == "completed" and resumed.resumed_from_epoch == 1
    assert resumed.epochs == 3
    assert timeless(resumed.history) == timeless(full.history)
    assert resumed.history[0] == first.history[0]  # the first epoch's record comes from the checkpoint
    assert_same_weights(resumed.model, full.model)
    assert resumed.test_accuracy == full.test_accuracy and resumed.test_loss == full.test_loss
    assert load_checkpoint(ckpt, params)["epoch"] == 3
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt"]  # no temp files left behind


def test_checkpoint_holds_plain_values(data: DeviceData, tmp_path: Path) -> None:
    params = make_params(epochs=1)
    ckpt = tmp_path / "ckpt.pt"
    result = train(params, data, checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)  # loads without unpickling any class
    assert state["params"] == params.to_dict()
    assert state["epoch"] == 1 and state["history"] == result.history
    for key, value in state["model"].items():
        assert torch.equal(value, result.model.state_dict()[key])


class _Payload:
    """Pickles as a call to open(marker, 'w'): unpickling it without weights_only creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_without_running_code(data: DeviceData, tmp_path: Path) -> None:
    params = make_params(epochs=2)
    ckpt = tmp_path / "ckpt.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": CHECKPOINT_FORMAT, "params": params.to_dict(), "epoch": 1, "step": 1, "history": [],
                "payload": _Payload(marker)}, ckpt)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(ckpt, params)
    assert str(ckpt) in str(info.value) and info.value.exit_code == 1
    with pytest.raises(CheckpointError):
        train(params, data, resume_from=ckpt)
    assert not marker.exists()
    # the payload was live: an unsafe load would have run it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "missing", "foreign"])
def test_unusable_checkpoints(data: DeviceData, tmp_path: Path, kind: str) -> None:
    params = make_params(epochs=1)
    ckpt = tmp_path / "ckpt.pt"
    if kind == "random":
        for seed in range(30):  # random bytes trip the unpickler in many different ways
            ckpt.write_bytes(random.Random(seed).randbytes(64 + 97 * seed))
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(ckpt, params)
            assert str(ckpt) in str(info.value)
    elif kind in ("truncated", "empty"):
        good = tmp_path / "good.pt"
        train(params, data, checkpoint_path=good)
        blob = good.read_bytes()
        ckpt.write_bytes(blob[: len(blob) // 2] if kind == "truncated" else b"")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, params)
    assert str(ckpt) in str(info.value) and info.value.exit_code == 1
    with pytest.raises(CheckpointError):
        train(params, data, resume_from=ckpt)


def test_checkpoint_for_other_params_is_refused(data: DeviceData, tmp_path: Path) -> None:
    params = make_params(epochs=2)
    ckpt = tmp_path / "ckpt.pt"
    train(params, data, checkpoint_path=ckpt, on_epoch=lambda rec: True)
    assert load_checkpoint(ckpt)["epoch"] == 1  # fine without params to compare against
    for other in (make_params(epochs=2, optimizer={"name": "adamw"}), make_params(epochs=2, optimizer={"amsgrad": True}),
                  make_params(epochs=3), make_params(epochs=2, training={"seed": 5}),
                  make_params(epochs=2, schedule={"name": "linear"}), make_params(epochs=2, training={"batch_size": 16}),
                  make_params(epochs=2, clipping={"mode": "norm", "threshold": 1.0})):
        with pytest.raises(CheckpointError, match="other params"):
            load_checkpoint(ckpt, other)
        with pytest.raises(CheckpointError, match="other params"):
            train(other, data, resume_from=ckpt)


NEW_VALUES = {"lr": 3e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-3}


def test_checkpoint_resumes_under_new_mutable_values(data: DeviceData, tmp_path: Path) -> None:
    """A population-based segment: the checkpoint resumes under other lr, betas, eps, weight decay and
    clipping threshold, and the optimizer then holds the new values, not the checkpoint's."""
    params = make_params(epochs=4, clipping={"mode": "norm", "threshold": 1.0})
    ckpt = tmp_path / "ckpt.pt"
    first = train(params, data, checkpoint_path=ckpt, on_epoch=lambda rec: rec.epoch == 2)
    assert first.epochs == 2
    new = make_params(epochs=4, optimizer=NEW_VALUES, clipping={"mode": "norm", "threshold": 2.5})
    assert load_checkpoint(ckpt, new)["epoch"] == 2

    from tuner.training.train import SingleEngine

    engine = SingleEngine(data)
    engine.add(0, new, resume_from=ckpt)
    assert engine.trial is not None
    for group in engine.trial.optimizer.param_groups:
        assert (group["lr"], list(group["betas"]), group["eps"], group["weight_decay"]) == (
            3e-3, [0.8, 0.99], 1e-6, 1e-3)
    out = engine.run_epoch()[0]
    assert out.record is not None and out.record.epoch == 3
    group = engine.trial.optimizer.param_groups[0]
    assert list(group["betas"]) == [0.8, 0.99] and group["eps"] == 1e-6 and group["weight_decay"] == 1e-3

    resumed = train(new, data, resume_from=ckpt)
    assert resumed.outcome == "completed" and resumed.resumed_from_epoch == 2 and resumed.epochs == 4
    assert resumed.history[:2] == first.history
    # the lr in force is the new peak times the schedule's multiplier over all 4 epochs (cosine)
    steps = math.ceil(len(data.y_train) / 32)
    last = 4 * steps - 1
    assert math.isclose(resumed.history[3]["lr"], 3e-3 * 0.5 * (1 + math.cos(math.pi * last / (4 * steps))))


def with_intervals(base: dict[str, Any], intervals: list[dict[str, Any]], epochs: int) -> TrialParams:
    return make_params(epochs=epochs, **base, intervals=intervals)


INTERVALS = [
    {"from_epoch": 0, "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "clip_threshold": 1.0},
    {"from_epoch": 1, "lr": 4e-3, "betas": [0.8, 0.99], "weight_decay": 1e-3},
    {"from_epoch": 2, "lr": 1e-3, "eps": 1e-6, "clip_threshold": 0.5},
]
INTERVAL_BASE: dict[str, Any] = {
    "optimizer": {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "schedule": {"name": "cosine", "warmup_fraction": 0.2},
    "clipping": {"mode": "norm", "threshold": 1.0},
}


def test_intervals_apply_their_values_per_epoch(data: DeviceData) -> None:
    params = with_intervals(INTERVAL_BASE, INTERVALS, epochs=3)
    seen: list[tuple[float, list[float], float, float]] = []

    from tuner.training.train import SingleEngine

    engine = SingleEngine(data)
    engine.add(0, params)
    assert engine.trial is not None
    while (out := engine.run_epoch()):
        group = engine.trial.optimizer.param_groups[0]
        seen.append((out[0].record.lr if out[0].record else math.nan, list(group["betas"]), group["eps"],
                     group["weight_decay"]))
    assert [s[1:] for s in seen] == [([0.9, 0.999], 1e-8, 0.0), ([0.8, 0.99], 1e-8, 1e-3), ([0.8, 0.99], 1e-6, 1e-3)]
    steps = math.ceil(len(data.y_train) / 32)
    schedule_end = [LRSchedule(params.schedule, 3 * steps, steps)(e * steps - 1) for e in (1, 2, 3)]
    assert [s[0] for s in seen] == pytest.approx([p * m for p, m in zip((2e-3, 4e-3, 1e-3), schedule_end)])


def test_a_run_with_intervals_equals_the_run_resumed_in_pieces(data: DeviceData, tmp_path: Path) -> None:
    """What replaying a population-based winner relies on: one run with `intervals` is, epoch for epoch,
    the run trained in pieces, each piece resuming the previous one's checkpoint under its own values."""
    whole = with_intervals(INTERVAL_BASE, INTERVALS, epochs=3)
    full = train(whole, data)
    assert full.outcome == "completed"

    ckpt = tmp_path / "piece.pt"
    pieces: list[dict[str, Any]] = []
    for i, entry in enumerate(INTERVALS):
        piece = whole.at_epoch(entry["from_epoch"])
        assert not piece.intervals
        end = INTERVALS[i + 1]["from_epoch"] if i + 1 < len(INTERVALS) else 3
        torch.manual_seed(1234 + i)  # the pieces run in fresh processes in a study: the global RNG differs
        result = train(piece, data, checkpoint_path=ckpt, resume_from=ckpt if i else None,
                       on_epoch=lambda rec, end=end: rec.epoch >= end)
        pieces = result.history
    assert timeless(pieces) == timeless(full.history)  # bitwise: losses, accuracy, lr, gradient norms
    final = train(whole.at_epoch(2), data, resume_from=ckpt)  # nothing left to train: the checkpoint's weights
    assert_same_weights(final.model, full.model)


def test_save_checkpoint_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing write leaves the previous checkpoint intact and no temp file behind."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    params = make_params(epochs=2)
    ckpt = tmp_path / "ckpt.pt"
    kw = dict(params=params, model=model, optimizer=opt, generator=torch.Generator(), step=3, history=[])
    save_checkpoint(ckpt, epoch=1, **kw)
    original = ckpt.read_bytes()

    def broken_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(ckpt, epoch=2, **kw)
    assert ckpt.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# ---------------------------------------------------------------------------------------------
# Device settings (pure: the CUDA branch is checked without a GPU)
# ---------------------------------------------------------------------------------------------

def test_device_settings_cuda_fast_path() -> None:
    s = device_settings(torch.device("cuda"), "auto", compile=True, bf16_supported=True)
    assert s.autocast_dtype == torch.bfloat16
    assert s.cudnn_benchmark is True and s.fused_adam is True and s.compile is True
    assert s.channels_last is True
    assert s.divergence_check_every > 1  # no host sync every step on the GPU
    assert device_settings(torch.device("cuda:1"), "auto", bf16_supported=True).autocast_dtype == torch.bfloat16
    assert device_settings(torch.device("cuda"), "auto", compile=False, bf16_supported=True).compile is False
    # no bf16 support, or fp32 asked for: no autocast
    assert device_settings(torch.device("cuda"), "auto", bf16_supported=False).autocast_dtype is None
    assert device_settings(torch.device("cuda"), "fp32", bf16_supported=True).autocast_dtype is None


def test_device_settings_cpu() -> None:
    s = device_settings(torch.device("cpu"), "auto", compile=True, bf16_supported=True)
    assert s.autocast_dtype is None
    assert s.cudnn_benchmark is False and s.fused_adam is False and s.compile is False
    assert s.divergence_check_every == 1
    # bf16 only when asked for explicitly
    assert device_settings(torch.device("cpu"), "bf16").autocast_dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_subset_reaches_40_percent(subset_path: Path) -> None:
    data = load_dataset(str(subset_path))
    params = parse_params({"optimizer": {"name": "adam"}, "schedule": {"name": "cosine"},
                           "training": {"model": "fastcnn", "epochs": 4, "batch_size": 128,
                                        "dataset": str(subset_path)}})
    result = train(params, data, evaluate_test=True)
    assert result.outcome == "completed" and result.epochs == 4
    assert result.test_accuracy >= 0.40, result.history
