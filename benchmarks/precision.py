"""bf16 autocast against fp32 on the run's device: step throughput, and the accuracy it costs.

The engine's `precision: auto` picks bf16 only where it is faster and costs no accuracy
(currently CUDA with bf16 support; fp32 elsewhere). This figure is the measurement behind that
choice on the machine it runs on.
"""

from __future__ import annotations

import time

import torch

from tuner.training.train import train

from .core import (
    Context,
    Measurement,
    interleaved,
    log,
    median,
    rounded,
    spread,
    sync,
    trimmed,
)
from .loops import bare_step, fresh_model, settings_for, staged_batches

# The accuracy runs use batch 128: at the default 512 a few epochs of the ~4.6k-image subset are
# only ~27 steps and both precisions stay near chance (~16%), which says nothing about bf16.
# At 128 (~108 steps in 3 epochs) fastcnn reaches ~45% test accuracy.
ACCURACY_BATCH = 128


def _cpu_bf16_native() -> bool | None:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); None if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _steps_seconds(model, optimizer, batches, settings, steps: int) -> float:
    """Seconds per step over `steps` bare steps cycling through `batches`."""
    device = batches[0][0].device
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        xb, yb = batches[i % len(batches)]
        bare_step(model, optimizer, xb, yb, settings)
    sync(device)
    return (time.perf_counter() - t0) / steps


def bf16_speedup(ctx: Context) -> Measurement:
    """Step throughput with bf16 autocast ÷ fp32 (bare steps on staged batches, interleaved
    rounds), then a short real training run in each precision from the same seed: test accuracy
    of each and the difference (bf16 - fp32)."""
    device = ctx.device
    base = ctx.params()
    bs = base.training.batch_size
    data = ctx.data
    batches = staged_batches(trimmed(data, bs), bs)
    models = {}
    for prec in ("fp32", "bf16"):
        p = base.with_training(precision=prec)
        model, optimizer = fresh_model(p, data)
        models[prec] = (model, optimizer, settings_for(p, device))
    steps, rounds = ctx.pick(4, 8), ctx.pick(3, 6)
    log(f"bf16_speedup: {rounds} rounds of {steps} steps in fp32 and bf16")
    samples = interleaved({prec: (lambda prec=prec: _steps_seconds(*models[prec][:2], batches, models[prec][2], steps))
                           for prec in models}, rounds, warmup=1)
    ips = {prec: bs / median(v) for prec, v in samples.items()}

    epochs, seeds = ctx.pick(3, 4), ctx.pick((0,), (0, 1, 2))
    log(f"bf16_speedup: accuracy, {base.training.model} batch {ACCURACY_BATCH}, {epochs} epochs x seeds "
        f"{list(seeds)} in fp32 and bf16")
    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    trial_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in seeds:
        for prec in ("fp32", "bf16"):
            run = base.with_training(precision=prec, epochs=epochs, seed=seed, batch_size=ACCURACY_BATCH)
            result = train(run, data, evaluate_test=True)
            if result.outcome != "completed":
                raise RuntimeError(f"{prec} seed {seed}: training {result.outcome}")
            acc[prec].append(result.test_accuracy)
            trial_s[prec].append(result.seconds)
    mean_acc = {prec: sum(v) / len(v) for prec, v in acc.items()}
    delta = mean_acc["bf16"] - mean_acc["fp32"]
    return Measurement(
        values={"bf16_speedup": rounded(ips["bf16"] / ips["fp32"]),
                "fp32_test_accuracy": rounded(mean_acc["fp32"]),
                "bf16_test_accuracy": rounded(mean_acc["bf16"]),
                "bf16_accuracy_delta": rounded(delta, 3)},
        details={"fp32_images_per_s": rounded(ips["fp32"]), "bf16_images_per_s": rounded(ips["bf16"]),
                 "steps_per_round": steps, "rounds": rounds, "batch_size": bs, "model": base.training.model,
                 "spread": {k: rounded(spread(v), 3) for k, v in samples.items()},
                 "accuracy_epochs": epochs, "accuracy_batch_size": ACCURACY_BATCH, "accuracy_seeds": list(seeds),
                 "test_images": len(data.y_test),
                 "fp32_test_accuracies": acc["fp32"], "bf16_test_accuracies": acc["bf16"],
                 "trial_seconds": {k: [rounded(s) for s in v] for k, v in trial_s.items()},
                 "trial_speedup": rounded(sum(trial_s["fp32"]) / sum(trial_s["bf16"])),
                 "cpu_bf16_native": _cpu_bf16_native() if device.type == "cpu" else None,
                 "engine_default_precision": "bf16" if settings_for(base, device).autocast_dtype else "fp32"},
        note=f"steps {ips['bf16']:.0f} vs {ips['fp32']:.0f} img/s; test acc bf16 {mean_acc['bf16']:.3f} vs "
             f"fp32 {mean_acc['fp32']:.3f} ({epochs} epochs at batch {ACCURACY_BATCH}, seeds {list(seeds)}; "
             f"test-set sampling s.e. ~{_binomial_se(mean_acc['fp32'], len(data.y_test) * len(seeds)):.3f})",
    )


def _binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy measured on n images: the noise floor of the delta's scale."""
    return (p * (1 - p) / max(1, n)) ** 0.5
