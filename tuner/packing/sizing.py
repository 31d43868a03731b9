"""How many trials a worker packs: a fixed K, or `auto` (1 on the CPU; on CUDA sized from free
memory and a short throughput probe)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuner.packing.modules import packable
from tuner.packing.runtime import Pack
from tuner.study.params import TrainingParams, TrialParams
from tuner.training.data import DeviceData
from tuner.training.train import (
    DeviceSettings,
)

# ---------------------------------------------------------------------------------------------
# How many trials per pack
# ---------------------------------------------------------------------------------------------

AUTO_CAP = 32  # the most trials `auto` packs
AUTO_GAIN = 1.1  # `auto` doubles K while trial-steps per second grow by at least this factor
MEMORY_SHARE = 0.8  # of the free device memory a pack may plan to use
CPU_NOTE = ("packing does not pay on the CPU (2 cores: the grouped model runs no faster than the trials one "
            "after another; see docs/packing.md)")


def pack_size(setting: int | str, training: TrainingParams, data: DeviceData,
              settings: DeviceSettings | None = None) -> tuple[int, str]:
    """(trials per pack, why) for a worker: `setting` is the study's or the flag's `pack` (a number,
    or "auto": 1 on the CPU, on CUDA sized from free memory and a short probe, see `auto_size`).
    Models that cannot be packed, and compiled runs, get 1 with the reason."""
    if setting == 1:
        return 1, "pack: 1 (packing off)"
    ok, why = packable(training.model)
    if not ok:
        return 1, why
    if training.compile and data.device.type == "cuda":
        return 1, "compile: true: compiled models are not packed"
    if setting != "auto":
        return int(setting), f"pack: {setting}"
    if data.device.type != "cuda":
        return 1, f"pack: auto: {CPU_NOTE}"
    return cuda_auto_size(training, data, settings)


def _probe_trials(training: TrainingParams, k: int) -> list[TrialParams]:
    return [TrialParams(training=TrainingParams(**{**training.__dict__, "seed": i})) for i in range(k)]


def cuda_auto_size(training: TrainingParams, data: DeviceData,
                   settings: DeviceSettings | None = None) -> tuple[int, str]:
    """`auto` on CUDA: measure one trial's memory (weights, Adam state and one step's activations)
    and its steps per second, then double K while the free memory (`torch.cuda.mem_get_info`) allows
    it and trial-steps per second keep growing; an out-of-memory probe stops at the K before."""
    device = data.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)

    def seconds_per_step(k: int) -> float:
        pack = Pack(data, k, training, settings=settings)
        for i, params in enumerate(_probe_trials(training, k)):
            pack.add(i, params)
        try:
            return pack.probe()
        finally:
            del pack
            torch.cuda.empty_cache()

    try:
        one = seconds_per_step(1)
    except torch.cuda.OutOfMemoryError:
        return 1, "pack: auto: one trial alone fills the GPU"
    per_trial = max(1, torch.cuda.max_memory_allocated(device) - base)
    k, why = auto_size(seconds_per_step, one_step=one, per_trial_bytes=per_trial, free_bytes=free)
    return k, why


def auto_size(seconds_per_step: Callable[[int], float], *, one_step: float, per_trial_bytes: int,
              free_bytes: int, cap: int = AUTO_CAP, gain: float = AUTO_GAIN) -> tuple[int, str]:
    """The doubling search of `auto`: K = 2, 4, 8, ... up to `cap` and to what MEMORY_SHARE of the free
    memory holds at `per_trial_bytes` each, kept while K / seconds_per_step(K) beats the best so far
    by `gain`. A probe that runs out of memory (torch.cuda.OutOfMemoryError, or any error saying
    "out of memory") ends the search at the K before it."""
    fits = max(1, int(MEMORY_SHARE * free_bytes // max(1, per_trial_bytes)))
    best_k, best_rate = 1, 1.0 / max(one_step, 1e-9)
    stopped = ""
    k = 2
    while k <= min(cap, fits):
        try:
            rate = k / max(seconds_per_step(k), 1e-9)
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error ends the search quietly
            if "out of memory" not in str(exc).lower() and not is_oom(exc):
                raise
            stopped = f"; {k} ran out of memory"
            break
        if rate < gain * best_rate:
            break
        best_k, best_rate = k, rate
        k *= 2
    mib = per_trial_bytes / 2**20
    return best_k, (f"pack: auto: {best_k} trials per pack ({best_rate * one_step:.2f}x one trial's steps per "
                    f"second; {mib:.0f} MiB per trial, {free_bytes / 2**30:.1f} GiB free, room for {fits}{stopped})")


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)
