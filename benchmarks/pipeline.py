"""Input-pipeline figures: how close the engine runs to an ideal feed, what its batched augmentation
costs next to a conventional PIL + DataLoader pipeline, and what that is worth per epoch.

All three use the default trial params (fastcnn, batch 512, Adam, the device's default precision)
on the run's dataset, and interleave the runs they compare (A B A B ...) and take medians.
"""

from __future__ import annotations

import gc
import time

import torch

from tuner.study.params import Augment
from tuner.training.data import train_batches

from .conventional import conventional_dataset, conventional_loader
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
from .loops import engine_epoch_seconds, loop_seconds, settings_for, staged_batches

CONVENTIONAL_WORKERS = (0, 2)


def _precision_name(params, device) -> str:
    dtype = settings_for(params, device).autocast_dtype
    return "fp32" if dtype is None else str(dtype).replace("torch.", "")


def pipeline_efficiency(ctx: Context) -> Measurement:
    """images/s of `tuner.training.train.train` (batches from train_batches: whole-dataset augmentation,
    normalisation, then forward, backward, gradient-norm stats, lr schedule, divergence check,
    Adam step) ÷ images/s of a bare step loop (forward, backward, Adam step) over the same
    batches pre-staged as float tensors. Same model, optimizer, batch size, precision; the
    training split is cut to whole batches so both see identical step shapes."""
    ctx.warm_up()
    params = ctx.params()
    bs = params.training.batch_size
    data = trimmed(ctx.data, bs)
    n = len(data.y_train)
    batches = staged_batches(data, bs)
    rounds = ctx.pick(3, 8)
    log(f"pipeline_efficiency: {rounds} rounds of (train() epoch, staged epoch), {n} images each")
    usage = _Usage()
    samples = interleaved({
        "engine": lambda: usage.around(lambda: engine_epoch_seconds(params, data)),
        "staged": lambda: loop_seconds(params, data, batches),
    }, rounds, warmup=0)
    engine_ips = n / median(samples["engine"])
    staged_ips = n / median(samples["staged"])
    # each round's staged epoch ran right after its engine epoch: the median of the paired ratios
    # cancels slow drift in machine speed better than the ratio of the two medians
    paired = median([s / e for e, s in zip(samples["engine"], samples["staged"])])
    return Measurement(
        values={"pipeline_efficiency": rounded(paired)},
        details={"engine_images_per_s": rounded(engine_ips), "staged_images_per_s": rounded(staged_ips),
                 "ratio_of_medians": rounded(engine_ips / staged_ips),
                 "images_per_epoch": n, "batch_size": bs, "model": params.training.model,
                 "precision": _precision_name(params, data.device), "rounds": rounds,
                 "epoch_seconds": {k: [rounded(s) for s in v] for k, v in samples.items()},
                 "spread": {k: rounded(spread(v), 3) for k, v in samples.items()},
                 # where the engine's CPU time went: page faults (fresh memory from the OS) show up as
                 # system time; see benchmarks/README.md
                 "engine_minor_faults_per_image": rounded(usage.faults / (n * rounds)),
                 "engine_system_cpu_fraction": rounded(usage.sys / max(1e-9, usage.sys + usage.user), 3)},
        note=f"{params.training.model} b{bs} {_precision_name(params, data.device)}: train() "
             f"{engine_ips:.0f} img/s vs staged {staged_ips:.0f} img/s, median of {rounds}",
    )


class _Usage:
    """Accumulates this process's minor page faults and user/system CPU time around calls."""

    def __init__(self) -> None:
        self.faults, self.user, self.sys = 0, 0.0, 0.0

    def around(self, fn):
        import resource

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        out = fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.faults += r1.ru_minflt - r0.ru_minflt
        self.user += r1.ru_utime - r0.ru_utime
        self.sys += r1.ru_stime - r0.ru_stime
        return out


def _our_pipeline_seconds(data, batch_size: int, gen: torch.Generator, epochs: int) -> float:
    """Seconds per epoch of the engine's input pipeline alone (shuffle, augment, batch, normalise)."""
    device = data.device
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for _xb, _yb in train_batches(data, batch_size, gen, Augment()):
            pass
    sync(device)
    return (time.perf_counter() - t0) / epochs


def _loader_seconds(loader, device: torch.device) -> float:
    """Seconds for one epoch of a DataLoader, batches moved to the device."""
    sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def _close(loaders) -> None:
    """Shut persistent DataLoader workers down now rather than at interpreter exit."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    gc.collect()


def pipeline_cost_ratio(ctx: Context) -> Measurement:
    """Per-image cost of our input pipeline (no model) ÷ that of the conventional PIL-transform
    DataLoader over the same images, the better of num_workers 0 and 2."""
    params = ctx.params()
    bs = params.training.batch_size
    data = ctx.data
    device = data.device
    n = len(data.y_train)
    gen = torch.Generator(device=device).manual_seed(0)
    dataset = conventional_dataset(data)
    loaders = {w: conventional_loader(dataset, bs, w, device) for w in CONVENTIONAL_WORKERS}
    rounds = ctx.pick(4, 10)
    ours_epochs = 3  # one epoch of ours is short: average a few per sample to steady it
    log(f"pipeline_cost_ratio: {rounds} rounds of (ours x{ours_epochs}, DataLoader workers "
        f"{'/'.join(map(str, CONVENTIONAL_WORKERS))}), {n} images per epoch")
    runs = {"ours": lambda: _our_pipeline_seconds(data, bs, gen, ours_epochs)}
    for w, loader in loaders.items():
        runs[f"workers{w}"] = lambda loader=loader: _loader_seconds(loader, device)
    try:
        samples = interleaved(runs, rounds, warmup=2)  # warm-up: worker start, allocator growth (2 rounds:
        # the first timed epoch of ours after a single warm-up round still ran ~2x slow)
    finally:
        _close(loaders.values())
    per_image_us = {k: median(v) / n * 1e6 for k, v in samples.items()}
    best_w = min(CONVENTIONAL_WORKERS, key=lambda w: per_image_us[f"workers{w}"])
    conventional = per_image_us[f"workers{best_w}"]
    ratio = per_image_us["ours"] / conventional
    return Measurement(
        values={"pipeline_cost_ratio": rounded(ratio)},
        details={"ours_us_per_image": rounded(per_image_us["ours"]),
                 **{f"conventional_workers{w}_us_per_image": rounded(per_image_us[f"workers{w}"])
                    for w in CONVENTIONAL_WORKERS},
                 "conventional_best_workers": best_w, "images_per_epoch": n, "batch_size": bs, "rounds": rounds,
                 "epoch_seconds": {k: [rounded(s) for s in v] for k, v in samples.items()},
                 "spread": {k: rounded(spread(v), 3) for k, v in samples.items()}},
        note=f"ours {per_image_us['ours']:.1f} us/img vs DataLoader+PIL {conventional:.1f} us/img "
             f"(num_workers={best_w}, best of {'/'.join(map(str, CONVENTIONAL_WORKERS))})",
    )


def speedup_vs_naive(ctx: Context) -> Measurement:
    """Whole-epoch throughput of `tuner.training.train.train` ÷ that of a plain `for x, y in loader: step`
    loop (same model, precision, optimizer) fed by the conventional DataLoader, the better of
    num_workers 0 and 2 (with 2 workers they compete with training for the 2 cores)."""
    ctx.warm_up()
    params = ctx.params()
    bs = params.training.batch_size
    data = ctx.data
    device = data.device
    n = len(data.y_train)
    dataset = conventional_dataset(data)
    loaders = {w: conventional_loader(dataset, bs, w, device) for w in CONVENTIONAL_WORKERS}
    rounds = ctx.pick(3, 6)  # at least 3: a median of 2 is their mean, and one slow epoch skews it
    log(f"speedup_vs_naive: {rounds} rounds of (train() epoch, naive epochs with workers "
        f"{'/'.join(map(str, CONVENTIONAL_WORKERS))}), {n} images each")
    try:
        for loader in loaders.values():  # start the workers and touch every image once, outside the timing
            _loader_seconds(loader, device)
        runs = {"engine": lambda: engine_epoch_seconds(params, data)}
        for w, loader in loaders.items():
            runs[f"naive_workers{w}"] = lambda loader=loader: loop_seconds(params, data, loader)
        samples = interleaved(runs, rounds, warmup=0)
    finally:
        _close(loaders.values())
    ips = {k: n / median(v) for k, v in samples.items()}
    best_w = max(CONVENTIONAL_WORKERS, key=lambda w: ips[f"naive_workers{w}"])
    naive = ips[f"naive_workers{best_w}"]
    return Measurement(
        values={"speedup_vs_naive": rounded(ips["engine"] / naive)},
        details={"engine_images_per_s": rounded(ips["engine"]),
                 **{f"naive_workers{w}_images_per_s": rounded(ips[f"naive_workers{w}"]) for w in CONVENTIONAL_WORKERS},
                 "naive_best_workers": best_w, "images_per_epoch": n, "batch_size": bs,
                 "precision": _precision_name(params, device), "rounds": rounds,
                 "epoch_seconds": {k: [rounded(s) for s in v] for k, v in samples.items()},
                 "spread": {k: rounded(spread(v), 3) for k, v in samples.items()}},
        note=f"train() {ips['engine']:.0f} img/s vs DataLoader loop {naive:.0f} img/s (num_workers={best_w})",
    )
