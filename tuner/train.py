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

import ctypes
import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import DeviceData, eval_batches, train_batches
from .errors import CheckpointError
from .models import build_model
from .optim import LRSchedule, build_optimizer, clip_gradients
from .params import TrialParams

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
    """`auto` picks CUDA when it is there; `cuda:N` pins a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import TunerError

        raise TunerError("--device cuda was asked for, but no CUDA device is available")
    return device


@dataclass(frozen=True)
class DeviceSettings:
    """What the fast path turns on for a device. Pure, so the CUDA branch is testable on a CPU."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    cudnn_benchmark: bool
    fused_adam: bool
    compile: bool
    divergence_check_every: int  # steps between loss syncs; 1 = every step


def device_settings(device: torch.device, precision: str = "auto", compile: bool = False,
                    bf16_supported: bool | None = None) -> DeviceSettings:
    cuda = device.type == "cuda"
    if bf16_supported is None:
        bf16_supported = cuda and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        dtype: torch.dtype | None = torch.bfloat16
    elif precision == "fp32":
        dtype = None
    else:  # auto: bf16 on CUDA. On a CPU with native bf16 it is faster but cost ~1.6 points of
        # accuracy in benchmarks (fastcnn, subset, 3 seeds), so the CPU default stays fp32
        dtype = torch.bfloat16 if cuda and bf16_supported else None
    return DeviceSettings(autocast_dtype=dtype, channels_last=True, cudnn_benchmark=cuda, fused_adam=cuda,
                          compile=compile and cuda, divergence_check_every=1 if not cuda else 16)


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


def _model_for(params: TrialParams, data: DeviceData, device: torch.device,
               settings: DeviceSettings) -> tuple[torch.nn.Module, Callable]:
    """A freshly initialised model (from the global seed), and the callable to run it.

    With `compile`, the compiled module is built once per process and re-initialised for each
    trial, so torch.compile does not recompile per trial.
    """
    name = params.training.model
    fn: Callable
    if settings.compile:
        key = (name, data.num_classes, str(device))
        if key in _COMPILED:
            model, fn = _COMPILED[key]
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
            return model, fn
    model = build_model(name, data.num_classes).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fn = model
    if settings.compile:
        fn = torch.compile(model)
        _COMPILED[(name, data.num_classes, str(device))] = (model, fn)
    return model, fn


def evaluate(fn: Callable, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: DeviceData,
             settings: DeviceSettings) -> tuple[float, float]:
    """(mean loss, accuracy) over x, y in large batches."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with torch.inference_mode(), _autocast(x.device, settings):
        for xb, yb in eval_batches(x, y, data, EVAL_BATCH):
            out = fn(xb).float()
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
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train one trial on `data` (already on its device). See the module docstring.

    `on_epoch(record) -> stop?` runs after each epoch (and after its checkpoint is saved).
    With `checkpoint_path`, the checkpoint is written after every epoch, or only after those for
    which `checkpoint_when(record)` is true.
    `on_step(step_in_epoch, steps_per_epoch)` is for progress bars.
    """
    device = data.device
    t = params.training
    settings = device_settings(device, t.precision, t.compile)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        retain_cpu_memory()
    torch.manual_seed(t.seed)
    model, fn = _model_for(params, data, device, settings)
    optimizer = build_optimizer(model.parameters(), params.optimizer, device)
    param_list = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(t.seed)

    steps_per_epoch = _steps_per_epoch(len(data.y_train), t.batch_size)
    schedule = LRSchedule(params.schedule, t.epochs * steps_per_epoch, steps_per_epoch)
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    resumed_from: int | None = None
    if resume_from is not None:
        state = load_checkpoint(resume_from, params)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["rng_data"])
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
        for i, (xb, yb) in enumerate(train_batches(data, t.batch_size, gen, t.augment)):
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
        norm_t = torch.stack(norms).float().cpu()
        record = EpochRecord(
            epoch=epoch, train_loss=loss_sum.item() / max(1, n_steps), val_loss=val_loss, val_accuracy=val_acc,
            lr=lr, seconds=time.perf_counter() - t0,
            grad_norm_p50=float(norm_t.quantile(0.5)), grad_norm_p90=float(norm_t.quantile(0.9)),
            grad_norm_max=float(norm_t.max()), clip_fraction=float(torch.stack(clipped).float().mean().cpu()),
        )
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
    result.model = model
    return result


def _steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


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
