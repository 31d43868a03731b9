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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tuner.errors import CheckpointError
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
    from tuner.errors import ConfigError, TunerError

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
    with torch.inference_mode(), _autocast(x.device, settings):
        for xb, yb in eval_batches(x, y, data, EVAL_BATCH, pad=settings.static_shapes):
            out = fn(xb)[:len(yb)].float()
            total_loss += F.cross_entropy(out, yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
    model.train()
    n = max(1, len(y))
    return total_loss.item() / n, correct.item() / n


def _autocast(device: torch.device, settings: DeviceSettings) -> Any:
    return torch.autocast(device.type, dtype=settings.autocast_dtype or torch.float32,
                          enabled=settings.autocast_dtype is not None)


def train(params: TrialParams, data: DeviceData, *,
          on_epoch: Callable[[EpochRecord], bool | None] | None = None,
          checkpoint_path: str | Path | None = None,
          resume_from: str | Path | None = None,
          checkpoint_when: Callable[[EpochRecord], bool] | None = None,
          evaluate_test: bool = False,
          on_step: Callable[[int, int], None] | None = None,
          settings: DeviceSettings | None = None) -> TrainResult:
    """Train one trial on `data` (already on its device). See the module docstring.

    `on_epoch(record) -> stop?` runs after each epoch (and after its checkpoint is saved).
    With `checkpoint_path`, the checkpoint is written after every epoch, or only after those for
    which `checkpoint_when(record)` is true.
    `on_step(step_in_epoch, steps_per_epoch)` is for progress bars. `settings` overrides
    `device_settings(device, precision, compile)` (tests and benchmarks).
    """
    device = data.device
    t = params.training
    settings = settings or device_settings(device, t.precision, t.compile)
    settings.apply(device)
    if device.type != "cuda":
        retain_cpu_memory()
    torch.manual_seed(t.seed)
    model, fn = _model_for(params, data, device, settings)
    try:
        return _train(params, data, model, fn, settings, on_epoch=on_epoch, checkpoint_path=checkpoint_path,
                      resume_from=resume_from, checkpoint_when=checkpoint_when, evaluate_test=evaluate_test,
                      on_step=on_step)
    except Exception:
        if settings.compile:  # a compile that failed (no C compiler, ...) must not stay cached
            _COMPILED.pop(_compiled_key(t.model, data, device, t.model_options), None)
        raise


def _train(params: TrialParams, data: DeviceData, model: torch.nn.Module, fn: Callable, settings: DeviceSettings, *,
           on_epoch: Callable[[EpochRecord], bool | None] | None, checkpoint_path: str | Path | None,
           resume_from: str | Path | None, checkpoint_when: Callable[[EpochRecord], bool] | None,
           evaluate_test: bool, on_step: Callable[[int, int], None] | None) -> TrainResult:
    device = data.device
    t = params.training
    optimizer = build_optimizer(model.parameters(), params.optimizer, device, fused=settings.fused_adam)
    param_list = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(t.seed)

    drop_last = settings.static_shapes
    steps_per_epoch = epoch_steps(params, data, settings)
    schedule = LRSchedule(params.schedule, t.epochs * steps_per_epoch, steps_per_epoch)
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    resumed_from: int | None = None
    if resume_from is not None:
        state = load_checkpoint(resume_from, params)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(_optimizer_state_for(optimizer, state["optimizer"]))
        _restore_generator(gen, state["rng_data"], t.seed, int(state["epoch"]))
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        resumed_from = start_epoch

    loss_limit = DIVERGENCE_FACTOR * math.log(data.num_classes)
    started = time.perf_counter()
    outcome = "completed"
    diverged: dict[str, Any] | None = None
    model.train()
    for epoch in range(start_epoch + 1, t.epochs + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        loss_max = torch.zeros((), device=device)  # NaN propagates through maximum
        norms: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        lr = params.optimizer.lr
        n_steps = 0
        for i, (xb, yb) in enumerate(train_batches(data, t.batch_size, gen, t.augment, drop_last=drop_last)):
            lr = schedule.apply(optimizer, step, params.optimizer.lr)
            with _autocast(device, settings):
                loss = F.cross_entropy(fn(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm, was_clipped = clip_gradients(param_list, params.clipping)
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
            if on_step is not None:
                on_step(i + 1, steps_per_epoch)
        if diverged is None and not loss_max.item() < loss_limit:
            diverged = {"epoch": epoch, "step": step, "loss": float(loss_max.item())}
        if diverged is not None:
            outcome = "diverged"
            break
        val_loss, val_acc = evaluate(fn, model, data.x_val, data.y_val, data, settings)
        if not math.isfinite(val_loss):
            diverged, outcome = {"epoch": epoch, "step": step, "loss": val_loss}, "diverged"
            break
        record = epoch_record(epoch, loss_sum.item(), n_steps, val_loss, val_acc, lr, time.perf_counter() - t0,
                              torch.stack(norms).float().cpu(), torch.stack(clipped).float().cpu())
        history.append(record.to_dict())
        if checkpoint_path is not None and (checkpoint_when is None or checkpoint_when(record)):
            save_checkpoint(checkpoint_path, params=params, model=model, optimizer=optimizer, generator=gen,
                            epoch=epoch, step=step, history=history)
        if on_epoch is not None and on_epoch(record):
            outcome = "stopped"
            break

    result = TrainResult(outcome=outcome, history=history, epochs=len(history),
                         seconds=time.perf_counter() - started, device=str(device),
                         resumed_from_epoch=resumed_from, diverged_at=diverged)
    if history:
        result.val_accuracy = history[-1]["val_accuracy"]
        result.val_loss = history[-1]["val_loss"]
    if evaluate_test and outcome != "diverged":
        result.test_loss, result.test_accuracy = evaluate(fn, model, data.x_test, data.y_test, data, settings)
    # the caller's own copy: a compiled module is shared with the worker's next trial
    result.model = copy.deepcopy(model) if settings.compile else model
    return result


def epoch_record(epoch: int, loss_sum: float, n_steps: int, val_loss: float, val_acc: float, lr: float,
                 seconds: float, norms: torch.Tensor, clipped: torch.Tensor) -> EpochRecord:
    """An epoch's record from its summed step losses and its steps' gradient norms (before clipping)
    and clip flags (1-D CPU float tensors, one entry per step). Packed trials (pack.py) use it too."""
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


def _optimizer_state_for(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
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


def _restore_generator(gen: torch.Generator, saved: torch.Tensor, seed: int, epoch: int) -> bool:
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
    if params is not None and state.get("params") != params.to_dict():
        raise CheckpointError(f"checkpoint {path}: was written for other params; refusing to resume")
    return state
