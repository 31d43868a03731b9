"""CUDA-only figures: steady-state training throughput (eager and `torch.compile`d), achieved
TFLOP/s against the device's dense bf16 peak, peak GPU memory, and the wall time of one default
trial on full CIFAR-10. On a machine without CUDA (or with --device cpu) they are skipped with a
reason and report null.

The throughput is that of `tuner.training.train.train` itself, in steady state: one call trains
`warmup + timed` epochs of the full-size training set (`synthetic:50000`: 45,000 training images,
no download), and each timed epoch runs from the end of the previous epoch (its `on_epoch`
callback) to the epoch's last optimizer step, read off CUDA events recorded on the stream (no
extra host syncs). Model building, the dataset's host-to-device copy, optimizer set-up, the first
epochs' cuDNN autotuning and compilation, and the validation passes are outside the timed span;
the per-epoch shuffle and augmentation, the per-step bookkeeping and the engine's own syncs are
inside it. FLOPs per image come from `torch.utils.flop_counter.FlopCounterMode` on one forward +
backward step of the same model, batch and precision, counted once per model.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .core import Context, Measurement, log, rounded

FULL_SIZE_SPEC = "synthetic:50000"  # CIFAR-10's size (45,000 train + 5,000 val after the split); needs no download


# ---------------------------------------------------------------------------------------------
# Peak table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    """One row of the peak table: a part, how `torch.cuda.get_device_name()` names it, and its
    dense (not 2:4-sparse) bf16 tensor-core peak in TFLOP/s (None: no bf16 tensor cores, or no
    vendor figure)."""

    part: str
    pattern: str  # regex, case-insensitive, searched in the device name
    tflops: float | None
    example: str  # a real torch.cuda.get_device_name() string of the part
    source: str

    @property
    def precision(self) -> str:
        return "bf16" if self.tflops is not None else ""


# Most specific first: the first row whose pattern is found in the device name wins. Patterns match
# whole tokens (\b), so "A10" never matches "A100" nor "L4" "L40"; the order matters where one
# part's name extends another's (H100 NVL / H100 PCIe before the plain H100, which is the SXM part;
# likewise H200 NVL before H200). Vendor data sheets quote bf16 "with sparsity"; the dense figure
# is half of that.
PEAKS: tuple[Peak, ...] = (
    # Blackwell
    Peak("GB200", r"\bGB200\b", 2500.0, "NVIDIA GB200",
         "NVIDIA GB200 NVL72 spec sheet: FP16/BF16 tensor 5 PFLOPS per GPU with sparsity (1,200 W)"),
    Peak("B200", r"\bB200\b", 2250.0, "NVIDIA B200",
         "NVIDIA HGX B200 spec sheet: FP16/BF16 tensor 4.5 PFLOPS per GPU with sparsity (1,000 W)"),
    Peak("B100", r"\bB100\b", 1750.0, "NVIDIA B100",
         "NVIDIA HGX B100 spec sheet: FP16/BF16 tensor 3.5 PFLOPS per GPU with sparsity (700 W)"),
    # Hopper
    Peak("GH200", r"\bGH200\b", 989.0, "NVIDIA GH200 480GB",
         "NVIDIA GH200 Grace Hopper Superchip data sheet: BF16 tensor 1,979 TFLOPS with sparsity"),
    Peak("H200 NVL", r"\bH200\b.*\bNVL\b", 835.0, "NVIDIA H200 NVL",
         "NVIDIA H200 data sheet: H200 NVL BF16 tensor 1,671 TFLOPS with sparsity"),
    Peak("H200 SXM", r"\bH200\b", 989.0, "NVIDIA H200",
         "NVIDIA H200 data sheet: H200 SXM BF16 tensor 1,979 TFLOPS with sparsity"),
    Peak("H100 NVL", r"\bH100\b.*\bNVL\b", 835.0, "NVIDIA H100 NVL",
         "NVIDIA H100 data sheet: H100 NVL BF16 tensor 1,671 TFLOPS with sparsity"),
    Peak("H100 PCIe", r"\bH100\b.*\bPCIe\b", 756.0, "NVIDIA H100 PCIe",
         "NVIDIA H100 data sheet: H100 PCIe BF16 tensor 1,513 TFLOPS with sparsity"),
    Peak("H100 SXM", r"\bH100\b", 989.0, "NVIDIA H100 80GB HBM3",
         "NVIDIA H100 data sheet: H100 SXM BF16 tensor 1,979 TFLOPS with sparsity"),
    # Ampere
    Peak("A100", r"\bA100\b", 312.0, "NVIDIA A100-SXM4-80GB",
         "NVIDIA A100 data sheet: BF16 tensor 312 TFLOPS dense, 624 with sparsity (SXM and PCIe)"),
    Peak("A10G", r"\bA10G\b", None, "NVIDIA A10G",
         "AWS's variant of the A10: no vendor data sheet figure, so unknown rather than the A10's"),
    Peak("A10", r"\bA10\b", 125.0, "NVIDIA A10",
         "NVIDIA A10 data sheet: BF16 tensor 125 TFLOPS dense, 250 with sparsity"),
    Peak("A30", r"\bA30\b", 165.0, "NVIDIA A30",
         "NVIDIA A30 data sheet: BF16 tensor 165 TFLOPS dense, 330 with sparsity"),
    Peak("A40", r"\bA40\b", 149.7, "NVIDIA A40",
         "NVIDIA A40 data sheet: BF16 tensor 149.7 TFLOPS dense, 299.4 with sparsity"),
    # Ada
    Peak("L40S", r"\bL40S\b", 362.0, "NVIDIA L40S",
         "NVIDIA L40S data sheet: BF16 tensor 362.05 TFLOPS dense, 733 with sparsity"),
    Peak("L40", r"\bL40\b", 181.0, "NVIDIA L40",
         "NVIDIA L40 data sheet: BF16 tensor 181.05 TFLOPS dense, 362.1 with sparsity"),
    Peak("L4", r"\bL4\b", 121.0, "NVIDIA L4",
         "NVIDIA L4 data sheet: BF16 tensor 242 TFLOPS with sparsity"),
    Peak("RTX 4090", r"\bRTX 4090\b(?!\s*D\b)", 165.0, "NVIDIA GeForce RTX 4090",
         "NVIDIA Ada Lovelace architecture whitepaper, appendix: RTX 4090 BF16 tensor with FP32 "
         "accumulate 165.2 TFLOPS dense, 330.4 with sparsity"),
    # Volta and Turing have no bf16 tensor cores: an MFU against a bf16 peak means nothing there
    Peak("V100", r"\bV100", None, "Tesla V100-SXM2-16GB", "Volta: no bf16 tensor cores"),
    Peak("T4", r"\bT4\b", None, "Tesla T4", "Turing: no bf16 tensor cores (fp16 65 TFLOPS)"),
)


def peak_entry(device_name: str) -> Peak | None:
    """The peak-table row for a CUDA device name (most specific first), or None if none matches."""
    for row in PEAKS:
        if re.search(row.pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, "bf16") for a CUDA device name, or (None, "") when the part has
    no bf16 tensor cores or is not in the table."""
    row = peak_entry(device_name)
    return (row.tflops, row.precision) if row is not None else (None, "")


# ---------------------------------------------------------------------------------------------
# FLOPs and steady-state epochs
# ---------------------------------------------------------------------------------------------

def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype `tuner.training.train` uses for this device and precision (None: fp32)."""
    from tuner.training.train import device_settings

    try:
        return device_settings(device, precision).autocast_dtype
    except TypeError:  # a changed signature: fall back to the documented rule
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def count_flops_per_image(model_name: str, device: torch.device, batch_size: int, precision: str = "auto",
                          num_classes: int = 10) -> float:
    """FLOPs of one forward + backward of `model_name` (train mode, channels_last, the engine's
    autocast) on a batch of `batch_size` 32×32 images, counted by torch.utils.flop_counter, per
    image. The global RNG is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    from tuner.training.models import build_model

    with torch.random.fork_rng(devices=[]):  # the model is built on the CPU, from the CPU generator
        model = build_model(model_name, num_classes).to(device).to(memory_format=torch.channels_last)
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    dtype = autocast_dtype(device, precision)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    return counter.get_total_flops() / batch_size


def flops_per_image(ctx: Context) -> float:
    """FLOPs of one forward + backward of the run's default model at the default batch and
    precision, per image."""
    t = ctx.params().training
    return count_flops_per_image(t.model, ctx.device, t.batch_size, t.precision, ctx.data.num_classes)


class EpochClock:
    """`train()` callbacks that mark, per epoch, the end of the previous epoch (`on_epoch`) and the
    last optimizer step (`on_step`): CUDA events on the current stream (no host sync), or
    perf_counter on the CPU. Epoch numbers are 1-based, as in the engine's records."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.epoch = 1  # the epoch in progress
        self.starts: dict[int, Any] = {}
        self.ends: dict[int, Any] = {}
        self.steps: dict[int, int] = {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_step(self, i: int, per_epoch: int | None = None, *_: Any) -> None:
        self.ends[self.epoch] = self._mark()
        self.steps[self.epoch] = i

    def on_epoch(self, record: Any = None, *_: Any) -> bool:
        done = getattr(record, "epoch", self.epoch)
        self.epoch = int(done) + 1
        self.starts[self.epoch] = self._mark()
        return False  # never stops the run

    def seconds(self, epoch: int) -> float:
        start, end = self.starts[epoch], self.ends[epoch]
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start


def _median_and_spread(xs: list[float]) -> tuple[float, float]:
    m = statistics.median(xs)
    return m, ((max(xs) - min(xs)) / m if m else math.nan)


def training_throughput(data: Any, model: str = "fastcnn", *, batch_size: int = 512, compile: bool = False,
                        warmup_epochs: int = 1, epochs: int = 3, precision: str = "auto", seed: int = 0,
                        gflops_per_image: float | None = None) -> dict[str, Any]:
    """Steady-state images/s of one `tuner.training.train.train` call on `data` (a `DeviceData`, already on
    its device): `warmup_epochs + epochs` epochs, the last `epochs` timed (see the module
    docstring), with the achieved TFLOP/s, MFU against the device's dense bf16 peak (when the run
    is in bf16 on a part in the table), and the peak memory allocated (dataset included)."""
    from tuner.study.params import TrialParams
    from tuner.training.train import train

    if warmup_epochs < 1 or epochs < 1:
        raise ValueError("need at least one warm-up and one timed epoch")
    device = data.device
    cuda = device.type == "cuda"
    params = TrialParams().with_training(model=model, batch_size=batch_size, compile=compile, precision=precision,
                                         epochs=warmup_epochs + epochs, seed=seed)
    if gflops_per_image is None:
        gflops_per_image = count_flops_per_image(model, device, batch_size, precision, data.num_classes) / 1e9
    clock = EpochClock(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_mb = torch.cuda.memory_allocated(device) / 2**20
    t0 = time.perf_counter()
    result = train(params, data, on_epoch=clock.on_epoch, on_step=clock.on_step)
    wall = time.perf_counter() - t0
    if result.outcome != "completed":
        raise RuntimeError(f"throughput trial did not complete: {result.outcome} {result.diverged_at}")
    timed = range(warmup_epochs + 1, warmup_epochs + epochs + 1)
    seconds = [clock.seconds(e) for e in timed]
    n = len(data.y_train)
    steps = clock.steps[warmup_epochs + 1]
    images = min(n, steps * batch_size)  # a dropped batch of one, or a dropped partial last batch
    med, spread = _median_and_spread(seconds)
    ips = images / med
    tflops = gflops_per_image * ips / 1e3
    dtype = autocast_dtype(device, precision)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    row = peak_entry(name) if cuda else None
    peak = row.tflops if row is not None else None
    out: dict[str, Any] = {
        "model": model, "compile": bool(compile and cuda), "batch_size": batch_size,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "device_name": name, "train_images": n, "images_per_epoch": images, "steps_per_epoch": steps,
        "last_batch": n % batch_size, "warmup_epochs": warmup_epochs, "timed_epochs": epochs,
        "epoch_seconds": [rounded(s) for s in seconds], "spread": rounded(spread),
        "images_per_s": rounded(ips), "gflops_per_image": rounded(gflops_per_image),
        "tflops": rounded(tflops), "peak_tflops": peak, "peak_part": row.part if row else None,
        "mfu": rounded(tflops / peak) if peak and dtype == torch.bfloat16 else None,
        "first_epoch_s": rounded(result.history[0]["seconds"]) if result.history else None,
        "trial_wall_s": rounded(wall),
    }
    if cuda:
        out["peak_memory_mb"] = rounded(torch.cuda.max_memory_allocated(device) / 2**20)
        out["memory_before_mb"] = rounded(before_mb)
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _no_cuda(ctx: Context) -> str | None:
    if ctx.device.type != "cuda":
        why = "no CUDA device available" if not torch.cuda.is_available() else f"--device {ctx.device}"
        return f"CUDA only ({why})"
    return None


def full_size_data(ctx: Context):  # -> tuner.training.data.DeviceData
    """Full CIFAR-10 when that is the run's dataset, else `synthetic:50000` (same size, no download)."""
    if ctx.dataset == "cifar10":
        return ctx.data
    from tuner.training.data import load_dataset

    log(f"loading {FULL_SIZE_SPEC} onto {ctx.device} (full-size training set for the throughput figures)")
    return load_dataset(FULL_SIZE_SPEC, ctx.device)


THROUGHPUT_KEYS = ("cuda_images_per_s", "cuda_tflops", "cuda_peak_bf16_tflops", "cuda_mfu", "cuda_peak_memory_mb")
COMPILED_KEYS = ("cuda_compiled_images_per_s", "cuda_compiled_tflops", "cuda_compiled_mfu",
                 "cuda_compiled_peak_memory_mb", "cuda_compiled_first_epoch_s")


def _throughput(ctx: Context, compile: bool) -> dict[str, Any]:
    params = ctx.params()
    t = params.training
    data = full_size_data(ctx)
    warmup, epochs = ctx.pick(1, 2), ctx.pick(3, 5)
    name = torch.cuda.get_device_name(ctx.device)
    log(f"cuda throughput{' (compiled)' if compile else ''}: {t.model}, batch {t.batch_size}, {warmup} warm-up + "
        f"{epochs} timed epochs of {len(data.y_train)} images on {name}")
    return training_throughput(data, t.model, batch_size=t.batch_size, compile=compile, precision=t.precision,
                               warmup_epochs=warmup, epochs=epochs)


def _note(r: dict[str, Any]) -> str:
    peak = f" of {r['peak_tflops']:g} dense bf16 peak ({r['peak_part']})" if r["peak_tflops"] else \
        " (no bf16 peak known for this device)"
    return f"{r['device_name']}, {r['model']} batch {r['batch_size']}: {r['images_per_s']:.0f} img/s, " \
           f"{r['tflops']:.3g} TFLOP/s{peak}"


def cuda_throughput(ctx: Context) -> Measurement:
    """Steady-state images/s of `tuner.training.train.train` (eager) on full-size data, its TFLOP/s, MFU
    against the device's dense bf16 peak, and the peak memory allocated."""
    reason = _no_cuda(ctx)
    if reason:
        return Measurement(values=dict.fromkeys(THROUGHPUT_KEYS), skipped=reason)
    r = _throughput(ctx, compile=False)
    return Measurement(
        values={"cuda_images_per_s": r["images_per_s"], "cuda_tflops": r["tflops"],
                "cuda_peak_bf16_tflops": r["peak_tflops"], "cuda_mfu": r["mfu"],
                "cuda_peak_memory_mb": r["peak_memory_mb"]},
        details=r, note=_note(r))


def cuda_compiled_throughput(ctx: Context) -> Measurement:
    """The same with `training.compile: true` (torch.compile); the first epoch (compilation
    included) is reported separately and never timed as steady state."""
    reason = _no_cuda(ctx)
    if reason:
        return Measurement(values=dict.fromkeys(COMPILED_KEYS), skipped=reason)
    r = _throughput(ctx, compile=True)
    return Measurement(
        values={"cuda_compiled_images_per_s": r["images_per_s"], "cuda_compiled_tflops": r["tflops"],
                "cuda_compiled_mfu": r["mfu"], "cuda_compiled_peak_memory_mb": r["peak_memory_mb"],
                "cuda_compiled_first_epoch_s": r["first_epoch_s"]},
        details=r, note=_note(r) + f"; first epoch {r['first_epoch_s']} s (compilation included)")


def cuda_full_trial(ctx: Context) -> Measurement:
    """Seconds of one default trial (`TrialParams()` defaults: fastcnn, 10 epochs, batch 512) on full
    CIFAR-10, when torchvision's copy is already in the data dir (never downloaded here)."""
    reason = _no_cuda(ctx)
    if reason:
        return Measurement(values={"cuda_trial_seconds": None}, skipped=reason)
    from tuner.errors import DataError
    from tuner.study.params import TrialParams
    from tuner.study.settings import data_dir as resolve_data_dir
    from tuner.training.data import load_cifar10, load_dataset
    from tuner.training.train import train

    data_dir = resolve_data_dir(None).expanduser()
    try:
        load_cifar10(data_dir, download=False)
    except DataError:
        return Measurement(values={"cuda_trial_seconds": None},
                           skipped=f"full CIFAR-10 is not in {data_dir} (TUNER_DATA_DIR sets the folder; the "
                                   "benchmark never downloads it)")
    params = TrialParams().with_training(dataset="cifar10")
    data = load_dataset("cifar10", ctx.device, data_dir=data_dir, val_fraction=params.training.val_fraction)
    log(f"cuda_full_trial: one default trial ({params.training.epochs} epochs) on full CIFAR-10")
    torch.cuda.reset_peak_memory_stats(ctx.device)
    result = train(params, data, evaluate_test=True)
    return Measurement(
        values={"cuda_trial_seconds": rounded(result.seconds)},
        details={"peak_memory_mb": rounded(torch.cuda.max_memory_allocated(ctx.device) / 2**20),
                 "outcome": result.outcome, "epochs": result.epochs, "test_accuracy": result.test_accuracy,
                 "val_accuracy": result.val_accuracy, "train_images": len(data.y_train)},
        note=f"{result.epochs} epochs, test acc {result.test_accuracy}",
    )
