"""The training engine: one Adam trial, independent of Optuna.

`train(params, data, on_epoch=...)` runs the epoch loop and returns the history and final
metrics. The callback sees each epoch's record (after the epoch's checkpoint is written) and
returns True to stop: that is how a sweep prunes. A non-finite loss, or a step loss above
DIVERGENCE_FACTOR × the chance loss ln(K), stops the run at once with outcome "diverged" (with
batch norm, a huge lr often gives finite but absurd losses rather than NaN). Checkpoints hold only
tensors and plain values, are written atomically, and load with `torch.load(weights_only=True)`, so
a tampered file cannot run code.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tuner.errors import CheckpointError, ConfigError, TunerError
from tuner.study.params import TrialParams
from tuner.training.data import DeviceData, eval_batches, train_batches
from tuner.training.models import build_model
from tuner.training.optim import LRSchedule, build_optimizer, clip_gradients

CHECKPOINT_FORMAT = "tuner-checkpoint-v1"
EVAL_BATCH = 1024  # evaluation batches are large: no gradients, so memory allows it
DIVERGENCE_FACTOR = 10.0  # a step loss above 10 × chance loss (ln K) counts as diverged, like NaN/inf


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch measured. Gradient norms are global L2 norms taken before clipping."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_accuracy: float  # fraction, 0..1
    lr: float  # the lr of the epoch's last step
    seconds: float  # wall time of the epoch's training and validation
    grad_norm_p50: float
    grad_norm_p90: float
    grad_norm_max: float
    clip_fraction: float  # fraction of the epoch's steps that were clipped

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class TrainResult:
    outcome: str  # "completed", "stopped" (the callback asked) or "diverged"
    history: list[dict[str, Any]]
    epochs: int  # epochs completed
    seconds: float
    device: str
    val_accuracy: float | None = None  # of the last completed epoch
    val_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    resumed_from_epoch: int | None = None
    diverged_at: dict[str, Any] | None = None
    model: Any = field(default=None, repr=False)  # the trained module, for callers that keep it

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (no model): JSON-ready."""
        return {k: v for k, v in asdict(replace(self, model=None)).items() if k != "model"}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when it is there; `cuda:N` pins a GPU (N counts the visible ones)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"not a device: {name!r} (auto, cpu, cuda or cuda:N)", key="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunerError("--device cuda was asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"{name} does not exist: {n} CUDA device{'s' if n != 1 else ''} visible "
                          f"(indices count the devices CUDA_VISIBLE_DEVICES leaves, from 0)", key="--device")
    return device


@dataclass(frozen=True)
class DeviceSettings:
    """What the fast path turns on for a device and precision. `device_settings` makes it (pure, so
    the CUDA branch is testable on a CPU); `apply()` sets the process-wide backend flags it implies.
    `train()` and the benchmarks both go through it, so "fp32" means the same thing in both."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    cudnn_benchmark: bool
    fused_adam: bool
    compile: bool
    divergence_check_every: int  # steps between loss syncs; 1 = every step
    tf32: bool = False  # TF32 tensor cores for the float32 matmuls and convolutions that remain
    static_shapes: bool = False  # every batch the same shape (drop the partial training batch, pad eval)

    def apply(self, device: torch.device) -> None:
        """Set the backend flags (process-wide, so set at the start of every run): cuDNN autotuning,
        and TF32 on or off for float32 math. `precision: fp32` is IEEE float32 on CUDA, not TF32."""
        if device.type != "cuda":
            return
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        mode = "tf32" if self.tf32 else "ieee"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
            torch.backends.cuda.matmul.fp32_precision = mode
            torch.backends.cudnn.conv.fp32_precision = mode  # type: ignore[attr-defined]
        else:
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32


def bf16_native() -> bool:
    """Whether the current CUDA device computes bf16 in hardware (Ampere and later). Emulated bf16
    (V100, T4) counts as no: it is slower than float32 there."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def device_settings(device: torch.device, precision: str = "auto", compile: bool = False,
                    bf16_supported: bool | None = None) -> DeviceSettings:
    """The settings for a run of `precision` on `device`:

    - fp32: float32, IEEE on CUDA too (no TF32);
    - bf16: bf16 autocast; what stays float32 may use TF32;
    - auto: bf16 autocast on a CUDA device with native bf16, else float32; TF32 allowed on CUDA.
      On a CPU it is float32: native CPU bf16 is faster but cost ~1.6 points of accuracy in
      benchmarks (fastcnn, subset, 3 seeds).

    `compile` applies on CUDA only, and with it every batch has the same shape (static shapes: one
    compiled graph for training, one for evaluation, no recompiles)."""
    cuda = device.type == "cuda"
    if bf16_supported is None:
        bf16_supported = cuda and bf16_native()
    if precision == "bf16":
        dtype: torch.dtype | None = torch.bfloat16
    elif precision == "fp32":
        dtype = None
    else:
        dtype = torch.bfloat16 if cuda and bf16_supported else None
    compiled = compile and cuda
    return DeviceSettings(autocast_dtype=dtype, channels_last=True, cudnn_benchmark=cuda, fused_adam=cuda,
                          compile=compiled, divergence_check_every=1 if not cuda else 16,
                          tf32=cuda and precision != "fp32", static_shapes=compiled)


_COMPILED: dict[tuple[str, int, str], tuple[torch.nn.Module, Callable]] = {}
_CPU_MEMORY_RETAINED = False


def retain_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (once per process).

    PyTorch's CPU allocator is plain malloc/free, and glibc serves every block above its mmap
    threshold (at most 32 MB) with a fresh mmap and unmaps it on free: each training step's large
    activations (50 MB for fastcnn's first layer at batch 512) come back as new pages that the
    kernel faults in and zeroes, ~1.6 million page faults per epoch on the CIFAR-10 subset. With
    mmap off and a high trim threshold, freed blocks are reused like a caching allocator would;
    the process keeps its peak heap. Returns whether it was applied (Linux with glibc only).
    """
    global _CPU_MEMORY_RETAINED
    if _CPU_MEMORY_RETAINED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _CPU_MEMORY_RETAINED = ok
    return ok


COMPILE_BACKEND: Any = "inductor"  # torch.compile's backend; tests count graphs with "eager" (no C compiler)


def initial_model(name: str, num_classes: int, device: torch.device, settings: DeviceSettings, *,
                  options: Mapping[str, Any] | None = None, in_channels: int = 3,
                  image_size: int | tuple[int, int] = 32) -> torch.nn.Module:
    """A freshly initialised model from the current global seed: built on the CPU with the model's
    own initialisation (torchvision's for resnet18), then moved. So a seed gives the same weights
    on every device, in every trial of a worker, and in `tuner train` and `tuner verify`. `name` is a
    registry name or a model reference (called with `options` and the shape keywords it accepts)."""
    model = build_model(name, num_classes, options=options, in_channels=in_channels,
                        image_size=image_size).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _compiled_key(name: str, data: DeviceData, device: torch.device,
                  options: Mapping[str, Any] | None = None) -> tuple[str, int, str]:
    shape = f"{data.in_channels}x{data.image_size}"
    return f"{name}{sorted(options.items()) if options else ''}@{shape}", data.num_classes, str(device)


def _model_for(params: TrialParams, data: DeviceData, device: torch.device,
               settings: DeviceSettings) -> tuple[torch.nn.Module, Callable]:
    """(the module to train, the callable that runs it), starting from `initial_model`'s weights.

    With `compile`, the compiled module is built once per process and each later trial loads a
    fresh build's weights and buffers into it (`load_state_dict` copies in place: the compiled
    graph, its guards and channels_last stay as they are), so torch.compile does not recompile.
    """
    name, options = params.training.model, params.training.model_options
    fresh = initial_model(name, data.num_classes, device, settings, options=options,
                          in_channels=data.in_channels, image_size=data.image_size)
    if not settings.compile:
        return fresh, fresh
    key = _compiled_key(name, data, device, options)
    if key in _COMPILED:
        model, fn = _COMPILED[key]
        model.load_state_dict(fresh.state_dict())
        return model, fn
    fn = torch.compile(fresh, dynamic=False, backend=COMPILE_BACKEND)
    _COMPILED[key] = (fresh, fn)
    return fresh, fn


def evaluate(fn: Callable, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: DeviceData,
             settings: DeviceSettings) -> tuple[float, float]:
    """(mean loss, accuracy) over x, y in large batches. With static shapes every batch is padded to
    EVAL_BATCH rows and only the real rows count (in eval mode batch norm uses its running
    statistics, so the padding changes nothing else)."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with torch.inference_mode(), autocast(x.device, settings):
        for xb, yb in eval_batches(x, y, data, EVAL_BATCH, pad=settings.static_shapes):
            out = fn(xb)[:len(yb)].float()
            total_loss += F.cross_entropy(out, yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
    model.train()
    n = max(1, len(y))
    return total_loss.item() / n, correct.item() / n


def autocast(device: torch.device, settings: DeviceSettings) -> Any:
    return torch.autocast(device.type, dtype=settings.autocast_dtype or torch.float32,
                          enabled=settings.autocast_dtype is not None)


@dataclass
class SlotEpoch:
    """What one epoch of an engine did for one trial: its record (None when it diverged in this
    epoch), whether it has now trained all its epochs, and whether it diverged."""

    record: EpochRecord | None
    finished: bool
    diverged: bool = False


@dataclass
class TrialProgress:
    """One trial's epoch accounting, the same in every engine: epochs and optimizer steps done, the
    history of epoch records, where it resumed, whether it diverged, its training seconds."""

    params: TrialParams
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    diverged_at: dict[str, Any] | None = None
    seconds: float = 0.0
    last_lr: float = 0.0

    @property
    def live(self) -> bool:
        return self.diverged_at is None and self.epoch < self.params.training.epochs

    def resume(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's counters and history."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.resumed_from = self.epoch
        if self.history:
            self.last_lr = float(self.history[-1]["lr"])

    def diverge(self, at: dict[str, Any]) -> SlotEpoch:
        self.diverged_at = at
        self.step = int(at["step"])
        return SlotEpoch(None, finished=True, diverged=True)

    def advance(self, record: EpochRecord, steps: int) -> SlotEpoch:
        self.epoch = record.epoch
        self.step += steps
        self.last_lr = record.lr
        self.history.append(record.to_dict())
        return SlotEpoch(record, finished=self.epoch >= self.params.training.epochs)

    def result(self, device: torch.device, outcome: str | None = None) -> TrainResult:
        """The trial's TrainResult: "diverged", "completed" (all epochs) or "stopped" (taken out
        earlier, e.g. pruned); `outcome` overrides it (a caller that stopped after the last epoch)."""
        if outcome is None:
            outcome = ("diverged" if self.diverged_at is not None else
                       "completed" if self.epoch >= self.params.training.epochs else "stopped")
        result = TrainResult(outcome=outcome, history=list(self.history), epochs=len(self.history),
                             seconds=self.seconds, device=str(device), resumed_from_epoch=self.resumed_from,
                             diverged_at=self.diverged_at)
        if self.history:
            result.val_accuracy = self.history[-1]["val_accuracy"]
            result.val_loss = self.history[-1]["val_loss"]
        return result


class EpochEngine(Protocol):
    """What a loop drives: trials added by key, trained one epoch at a time. `SingleEngine` (one
    trial) and `tuner.packing.runtime.Pack` (K trials as one model) implement it.

        engine.add(key, params, resume_from=None)    # a fresh trial, or one resumed from a checkpoint
        for key, out in engine.run_epoch().items():  # one epoch of every live trial
            engine.save_checkpoint(key, path)        # train.save_checkpoint's format
        engine.result(key)                           # a TrainResult
        engine.remove(key)                           # frees the slot
    """

    @property
    def free(self) -> int: ...

    def add(self, key: Hashable, params: TrialParams, resume_from: str | Path | None = None) -> None: ...

    def run_epoch(self) -> dict[Hashable, SlotEpoch]: ...

    def epoch(self, key: Hashable) -> int: ...

    def save_checkpoint(self, key: Hashable, path: str | Path) -> None: ...

    def result(self, key: Hashable, *, outcome: str | None = None, evaluate_test: bool = False,
               keep_model: bool = False) -> TrainResult: ...

    def remove(self, key: Hashable) -> None: ...


@dataclass
class _Trial:
    """The one trial a SingleEngine trains: its model, optimizer, data order and accounting."""

    key: Hashable
    progress: TrialProgress
    model: torch.nn.Module
    fn: Callable
    optimizer: torch.optim.Optimizer
    param_list: list[torch.nn.Parameter]
    generator: torch.Generator
    schedule: LRSchedule
    steps_per_epoch: int


class SingleEngine:
    """The epoch engine for one trial at a time (capacity 1): the model as built, torch's Adam.

    `settings` overrides `device_settings(device, precision, compile)` (tests and benchmarks);
    `on_step(step_in_epoch, steps_per_epoch)` is for progress bars."""

    capacity = 1

    def __init__(self, data: DeviceData, *, settings: DeviceSettings | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.data = data
        self.device = data.device
        self.fixed_settings = settings
        self.on_step = on_step
        self.trial: _Trial | None = None
        self.settings: DeviceSettings | None = None

    @property
    def free(self) -> int:
        return 0 if self.trial is not None else 1

    def _trial(self, key: Hashable) -> _Trial:
        if self.trial is None or self.trial.key != key:
            raise KeyError(key)
        return self.trial

    def epoch(self, key: Hashable) -> int:
        return self._trial(key).progress.epoch

    def add(self, key: Hashable, params: TrialParams, resume_from: str | Path | None = None) -> None:
        if self.trial is not None:
            raise ValueError(f"the engine trains one trial at a time (trial {self.trial.key!r} is in it)")
        data, device, t = self.data, self.device, params.training
        settings = self.fixed_settings or device_settings(device, t.precision, t.compile)
        settings.apply(device)
        if device.type != "cuda":
            retain_cpu_memory()
        torch.manual_seed(t.seed)
        model, fn = _model_for(params, data, device, settings)
        try:
            optimizer = build_optimizer(model.parameters(), params.optimizer, device, fused=settings.fused_adam)
            gen = torch.Generator(device=device).manual_seed(t.seed)
            steps = epoch_steps(params, data, settings)
            progress = TrialProgress(params)
            if resume_from is not None:
                state = load_checkpoint(resume_from, params)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(optimizer_state_for(optimizer, state["optimizer"]))
                set_hyperparameters(optimizer, params.at_epoch(int(state["epoch"])))  # not the checkpoint's
                restore_generator(gen, state["rng_data"], t.seed, int(state["epoch"]))
                torch.set_rng_state(state["rng_cpu"])
                if device.type == "cuda" and "rng_cuda" in state:
                    torch.cuda.set_rng_state(state["rng_cuda"], device)
                progress.resume(state)
        except Exception:
            self._evict(params, settings)
            raise
        self.settings = settings
        self.trial = _Trial(key, progress, model, fn, optimizer, [p for p in model.parameters() if p.requires_grad],
                            gen, LRSchedule(params.schedule, t.epochs * steps, steps), steps)
        model.train()

    def _evict(self, params: TrialParams, settings: DeviceSettings) -> None:
        if settings.compile:  # a compile that failed (no C compiler, ...) must not stay cached
            t = params.training
            _COMPILED.pop(_compiled_key(t.model, self.data, self.device, t.model_options), None)

    def run_epoch(self) -> dict[Hashable, SlotEpoch]:
        """One epoch of the trial (nothing when it has no epoch left to train)."""
        tr = self.trial
        if tr is None or not tr.progress.live:
            return {}
        assert self.settings is not None
        try:
            return {tr.key: self._epoch(tr, self.settings)}
        except Exception:
            self._evict(tr.progress.params, self.settings)
            raise

    def _epoch(self, tr: _Trial, settings: DeviceSettings) -> SlotEpoch:
        data, device, progress = self.data, self.device, tr.progress
        params = progress.params.at_epoch(progress.epoch)  # the values in force this epoch (intervals:)
        if progress.params.intervals:
            set_hyperparameters(tr.optimizer, params)
        t = params.training
        optimizer, fn = tr.optimizer, tr.fn
        loss_limit = DIVERGENCE_FACTOR * math.log(data.num_classes)
        epoch, step = progress.epoch + 1, progress.step
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        loss_max = torch.zeros((), device=device)  # NaN propagates through maximum
        norms: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        lr = params.optimizer.lr
        n_steps = 0
        diverged: dict[str, Any] | None = None
        batches = train_batches(data, t.batch_size, tr.generator, t.augmentation, drop_last=settings.static_shapes)
        for i, (xb, yb) in enumerate(batches):
            lr = tr.schedule.apply(optimizer, step, params.optimizer.lr)
            with autocast(device, settings):
                loss = F.cross_entropy(fn(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm, was_clipped = clip_gradients(tr.param_list, params.clipping)
            optimizer.step()
            step += 1
            n_steps += 1
            loss_sum += loss.detach()
            loss_max = torch.maximum(loss_max, loss.detach())
            norms.append(norm)
            clipped.append(was_clipped)
            if step % settings.divergence_check_every == 0 and not loss_max.item() < loss_limit:
                diverged = {"epoch": epoch, "step": step, "loss": float(loss_max.item())}
                break
            if self.on_step is not None:
                self.on_step(i + 1, tr.steps_per_epoch)
        if diverged is None and not loss_max.item() < loss_limit:
            diverged = {"epoch": epoch, "step": step, "loss": float(loss_max.item())}
        if diverged is not None:
            progress.seconds += time.perf_counter() - t0
            return progress.diverge(diverged)
        val_loss, val_acc = evaluate(fn, tr.model, data.x_val, data.y_val, data, settings)
        seconds = time.perf_counter() - t0
        progress.seconds += seconds
        if not math.isfinite(val_loss):
            return progress.diverge({"epoch": epoch, "step": step, "loss": val_loss})
        record = epoch_record(epoch, loss_sum.item(), n_steps, val_loss, val_acc, lr, seconds,
                              torch.stack(norms).float().cpu(), torch.stack(clipped).float().cpu())
        return progress.advance(record, n_steps)

    def save_checkpoint(self, key: Hashable, path: str | Path) -> None:
        tr = self._trial(key)
        p = tr.progress
        save_checkpoint(path, params=p.params, model=tr.model, optimizer=tr.optimizer, generator=tr.generator,
                        epoch=p.epoch, step=p.step, history=p.history)

    def result(self, key: Hashable, *, outcome: str | None = None, evaluate_test: bool = False,
               keep_model: bool = False) -> TrainResult:
        tr = self._trial(key)
        result = tr.progress.result(self.device, outcome)
        if evaluate_test and result.outcome != "diverged":
            assert self.settings is not None
            result.test_loss, result.test_accuracy = evaluate(tr.fn, tr.model, self.data.x_test, self.data.y_test,
                                                              self.data, self.settings)
        if keep_model:
            # the caller's own copy: a compiled module is shared with the worker's next trial
            result.model = copy.deepcopy(tr.model) if self.settings and self.settings.compile else tr.model
        return result

    def remove(self, key: Hashable) -> None:
        self._trial(key)
        self.trial = None


def train(params: TrialParams, data: DeviceData, *,
          on_epoch: Callable[[EpochRecord], bool | None] | None = None,
          checkpoint_path: str | Path | None = None,
          resume_from: str | Path | None = None,
          checkpoint_when: Callable[[EpochRecord], bool] | None = None,
          evaluate_test: bool = False,
          on_step: Callable[[int, int], None] | None = None,
          settings: DeviceSettings | None = None) -> TrainResult:
    """Train one trial on `data` (already on its device): a SingleEngine driven to the end. See the
    module docstring.

    `on_epoch(record) -> stop?` runs after each epoch (and after its checkpoint is saved).
    With `checkpoint_path`, the checkpoint is written after every epoch, or only after those for
    which `checkpoint_when(record)` is true.
    `on_step(step_in_epoch, steps_per_epoch)` is for progress bars. `settings` overrides
    `device_settings(device, precision, compile)` (tests and benchmarks).
    """
    engine = SingleEngine(data, settings=settings, on_step=on_step)
    engine.add(0, params, resume_from=resume_from)
    started = time.perf_counter()
    outcome = None
    while True:
        out = engine.run_epoch().get(0)
        if out is None or out.record is None:  # nothing left to train, or diverged
            break
        if checkpoint_path is not None and (checkpoint_when is None or checkpoint_when(out.record)):
            engine.save_checkpoint(0, checkpoint_path)
        if on_epoch is not None and on_epoch(out.record):
            outcome = "stopped"
            break
        if out.finished:
            break
    result = engine.result(0, outcome=outcome, evaluate_test=evaluate_test, keep_model=True)
    result.seconds = time.perf_counter() - started
    return result


def epoch_record(epoch: int, loss_sum: float, n_steps: int, val_loss: float, val_acc: float, lr: float,
                 seconds: float, norms: torch.Tensor, clipped: torch.Tensor) -> EpochRecord:
    """An epoch's record from its summed step losses and its steps' gradient norms (before clipping)
    and clip flags (1-D CPU float tensors, one entry per step). Packed trials (tuner.packing.runtime) use it too."""
    return EpochRecord(
        epoch=epoch, train_loss=loss_sum / max(1, n_steps), val_loss=val_loss, val_accuracy=val_acc,
        lr=lr, seconds=seconds,
        grad_norm_p50=float(norms.quantile(0.5)), grad_norm_p90=float(norms.quantile(0.9)),
        grad_norm_max=float(norms.max()), clip_fraction=float(clipped.mean()),
    )


def epoch_steps(params: TrialParams, data: DeviceData, settings: DeviceSettings | None = None) -> int:
    """Optimizer steps per epoch of `train(params, data)`: with static shapes (compile on CUDA)
    the partial batch is dropped. The schedule and schedule-aware pruning both count with it."""
    t = params.training
    settings = settings or device_settings(data.device, t.precision, t.compile)
    return _steps_per_epoch(len(data.y_train), t.batch_size, settings.static_shapes)


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    full, rest = divmod(n, batch_size)
    return max(1, full) if drop_last else full + (1 if rest >= 2 else 0)


def optimizer_state_for(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state, with the implementation flags of `optimizer` (fused on CUDA,
    foreach on the CPU) instead of those of the device that saved it, so a checkpoint resumes on
    another device type. (Optimizer.load_state_dict would keep the saved flags, and fused CUDA
    Adam state would then be loaded as fused on a CPU.)"""
    groups = []
    for group, now in zip(saved["param_groups"], optimizer.param_groups):
        group = dict(group)
        for flag in ("fused", "foreach", "capturable", "differentiable"):
            if flag in now:
                group[flag] = now[flag]
        groups.append(group)
    return {**saved, "param_groups": groups}


def set_hyperparameters(optimizer: torch.optim.Optimizer, params: TrialParams) -> None:
    """Write `params`' Adam hyperparameters (betas, eps, weight_decay, and the peak lr until the schedule
    sets the step's lr) into every param group: after loading a checkpoint written under other values,
    and at an interval's start."""
    opt = params.optimizer
    for group in optimizer.param_groups:
        group["betas"] = (opt.betas[0], opt.betas[1])
        group["eps"] = opt.eps
        group["weight_decay"] = opt.weight_decay
        group["lr"] = opt.lr


def restore_generator(gen: torch.Generator, saved: torch.Tensor, seed: int, epoch: int) -> bool:
    """Restore the data generator (shuffles, crops, flips). A state saved by a generator of another
    device type (a CUDA generator's state is 16 bytes, a CPU one's 5,056) cannot load: the resumed
    trial then draws its data order from a generator seeded by (seed, epoch), so the resume still
    works but is not bit-identical to an uninterrupted run. Returns whether the state was restored."""
    try:
        gen.set_state(saved)
        return True
    except (RuntimeError, ValueError):
        gen.manual_seed(seed * 1_000_003 + epoch)
        return False


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, *, params: TrialParams, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int, step: int,
                    history: list[dict[str, Any]]) -> None:
    """Write the full training state atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "params": params.to_dict(),
        "epoch": epoch,
        "step": step,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_data": generator.get_state(),
    }
    if generator.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(generator.device)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, params: TrialParams | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); check it belongs to `params`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path}: refused, it holds objects other than tensors and plain "
                              "values (a tampered or foreign file)") from None
    except Exception as exc:  # noqa: BLE001 - random bytes can fail the unpickler in many ways (IndexError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: corrupt or unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a tuner checkpoint")
    if params is not None and not resumable_under(state.get("params"), params):
        raise CheckpointError(f"checkpoint {path}: was written for other params; refusing to resume")
    return state


MUTABLE = {"optimizer": ("lr", "betas", "eps", "weight_decay"), "clipping": ("threshold",)}  # may change on resume


def _fixed_part(params: Any) -> Any:
    """A params dict without the knobs that may change along a run (`MUTABLE`, and `intervals`)."""
    if not isinstance(params, Mapping):
        return params
    out = {k: v for k, v in params.items() if k != "intervals"}
    for section, names in MUTABLE.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in names}
    return out


def resumable_under(saved: Any, params: TrialParams) -> bool:
    """Whether a checkpoint written with the params dict `saved` resumes under `params`: everything but
    the mutable knobs (Adam's lr, betas, eps and weight decay, the clipping threshold, `intervals`) is
    the same. A population-based study's segment resumes its parent's checkpoint under new values."""
    return _fixed_part(saved) == _fixed_part(params.to_dict())
