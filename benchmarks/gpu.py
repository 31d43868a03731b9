"""CUDA-only figures: engine throughput, achieved TFLOP/s against the device's bf16 peak, and the
wall time of one default trial on full CIFAR-10. On a machine without CUDA (or with --device cpu)
they are skipped with a reason and report null."""

from __future__ import annotations

import torch

from .core import Context, Measurement, interleaved, log, median, rounded, trimmed
from .loops import engine_epoch_seconds, fresh_model, settings_for, staged_batches

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first
# match wins, so more specific names come first. T4 has no bf16: its fp16 peak is listed.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None, str], ...] = (
    ("H100 PCIe", 756.0, "bf16"),
    ("H100", 989.0, "bf16"),  # SXM
    ("A100", 312.0, "bf16"),
    ("RTX 4090", 165.0, "bf16"),
    ("A10", 125.0, "bf16"),  # after A100
    ("L40", None, ""),  # not L4: unknown here, report null rather than the L4 figure
    ("L4", 121.0, "bf16"),
    ("T4", 65.0, "fp16"),
)


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, its precision) for a CUDA device name, or (None, "") if not in the table."""
    for key, peak, kind in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak, kind
    return None, ""


def _no_cuda(ctx: Context) -> str | None:
    if ctx.device.type != "cuda":
        why = "no CUDA device available" if not torch.cuda.is_available() else f"--device {ctx.device}"
        return f"CUDA only ({why})"
    return None


def flops_per_image(ctx: Context) -> float:
    """FLOPs of one forward + backward of the default model at the default batch and precision,
    counted by torch.utils.flop_counter, divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    params = ctx.params()
    bs = params.training.batch_size
    data = trimmed(ctx.data, bs)
    xb, yb = staged_batches(data, bs)[0]
    model, _ = fresh_model(params, data)
    dtype = settings_for(params, ctx.device).autocast_dtype
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
        loss.backward()
    return counter.get_total_flops() / len(yb)


def cuda_throughput(ctx: Context) -> Measurement:
    """images/s of `tuner.train.train` on the GPU, and what that is in TFLOP/s and as a fraction of
    the device's bf16 peak."""
    keys = ("cuda_images_per_s", "cuda_tflops", "cuda_peak_bf16_tflops", "cuda_mfu", "cuda_trial_peak_memory_mb")
    reason = _no_cuda(ctx)
    if reason:
        return Measurement(values=dict.fromkeys(keys), skipped=reason)
    ctx.warm_up()
    name = torch.cuda.get_device_name(ctx.device)
    params = ctx.params()
    data = trimmed(ctx.data, params.training.batch_size)
    n = len(data.y_train)
    rounds = ctx.pick(5, 15)
    log(f"cuda_throughput: {rounds} train() epochs of {n} images on {name}")
    torch.cuda.reset_peak_memory_stats(ctx.device)
    seconds = interleaved({"engine": lambda: engine_epoch_seconds(params, data)}, rounds, warmup=1)["engine"]
    peak_mb = torch.cuda.max_memory_allocated(ctx.device) / 2**20  # a trial's tensors, the cached dataset included
    ips = n / median(seconds)
    fpi = flops_per_image(ctx)
    tflops = fpi * ips / 1e12
    peak, kind = peak_tflops(name)
    return Measurement(
        values={"cuda_images_per_s": rounded(ips), "cuda_tflops": rounded(tflops),
                "cuda_peak_bf16_tflops": peak, "cuda_mfu": rounded(tflops / peak) if peak else None,
                "cuda_trial_peak_memory_mb": rounded(peak_mb)},
        details={"device_name": name, "gflops_per_image_fwd_bwd": rounded(fpi / 1e9),
                 "peak_precision": kind or None, "images_per_epoch": n, "rounds": rounds,
                 "epoch_seconds": [rounded(s) for s in seconds]},
        note=f"{name}: {ips:.0f} img/s, {tflops:.2f} TFLOP/s" + (f" of {peak:g} {kind} peak" if peak else
                                                                 " (peak unknown for this device)"),
    )


def cuda_full_trial(ctx: Context) -> Measurement:
    """Seconds of one default trial (`TrialParams()` defaults: fastcnn, 10 epochs, batch 512) on full
    CIFAR-10, when torchvision's copy is already in the data dir (never downloaded here)."""
    reason = _no_cuda(ctx)
    if reason:
        return Measurement(values={"cuda_trial_seconds": None}, skipped=reason)
    from tuner.data import default_data_dir, load_cifar10, load_dataset
    from tuner.errors import DataError
    from tuner.params import TrialParams
    from tuner.train import train

    data_dir = default_data_dir()
    try:
        load_cifar10(data_dir, download=False)
    except DataError:
        return Measurement(values={"cuda_trial_seconds": None},
                           skipped=f"full CIFAR-10 is not in {data_dir} (TUNER_DATA_DIR sets the folder; the "
                                   "benchmark never downloads it)")
    params = TrialParams().with_training(dataset="cifar10")
    data = load_dataset("cifar10", ctx.device, val_fraction=params.training.val_fraction)
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
