"""Adam/AdamW, learning-rate schedules with linear warmup, and gradient clipping, from TrialParams."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from tuner.study.params import ClippingParams, OptimizerParams, ScheduleParams

OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params: Iterable[torch.nn.Parameter], opt: OptimizerParams,
                    device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """`torch.optim.Adam`/`AdamW` with the params' knobs. Fused kernels on CUDA, foreach on the CPU
    (the fused CPU kernel measured no faster here; see benchmarks); `fused` overrides
    (`DeviceSettings.fused_adam`)."""
    impl = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {"foreach": True}
    return OPTIMIZER_CLASSES[opt.name](params, **opt.torch_kwargs(), **impl)


class LRSchedule:
    """The lr multiplier for each optimizer step: linear warmup, then the named decay.

    Steps count from 0. `total_steps` is epochs × steps per epoch. The multiplier applies to the
    optimizer's peak `lr`. State is just the step number, so checkpoints stay plain tensors.
    """

    def __init__(self, sched: ScheduleParams, total_steps: int, steps_per_epoch: int) -> None:
        self.s = sched
        self.total = max(1, total_steps)
        self.per_epoch = max(1, steps_per_epoch)
        rise = sched.warmup_fraction if sched.name != "onecycle" or sched.warmup_fraction > 0 else sched.pct_start
        self.warmup = int(round(rise * self.total))

    def __call__(self, step: int) -> float:
        s, w = self.s, self.warmup
        if step < w:
            if s.name == "onecycle":  # one-cycle rises from lr/25, the usual div_factor
                return 0.04 + 0.96 * (step + 1) / w
            return (step + 1) / w
        q = min(1.0, (step - w) / max(1, self.total - w))  # progress after warmup, 0..1
        m = s.min_lr_fraction
        if s.name == "constant":
            return 1.0
        if s.name in ("cosine", "onecycle"):
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * q))
        if s.name == "linear":
            return m + (1 - m) * (1 - q)
        if s.name == "step":
            milestones = s.milestones or (0.5, 0.75)
            gamma = s.gamma if s.gamma is not None else 0.1
            return gamma ** sum(q >= mark for mark in milestones)
        if s.name == "exponential":
            gamma = s.gamma if s.gamma is not None else 0.9
            return gamma ** ((step - w) / self.per_epoch)
        raise ValueError(f"unknown schedule {s.name!r}")

    def apply(self, optimizer: torch.optim.Optimizer, step: int, peak_lr: float) -> float:
        lr = peak_lr * self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def first_judged_epoch(sched: ScheduleParams, epochs: int, steps_per_epoch: int) -> int:
    """The first epoch (1-based) whose end is past the lr warm-up (one-cycle: its rise), the
    arithmetic of `LRSchedule`: warm-up steps w = round(rise × epochs × steps_per_epoch); epoch e
    ends at step index e × steps_per_epoch − 1, and is past the warm-up when that is >= w. 1 for a
    schedule without warm-up; epochs + 1 when no epoch ends past it (then no epoch is judged)."""
    per_epoch = max(1, steps_per_epoch)
    warmup = LRSchedule(sched, epochs * per_epoch, per_epoch).warmup
    return max(1, math.ceil((warmup + 1) / per_epoch))


def grad_norm(params: list[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm over `params`, as a 0-d tensor on their device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=True)


def clip_gradients(params: list[torch.nn.Parameter], clip: ClippingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Measure the global L2 gradient norm (before clipping), then clip as configured.

    Returns (norm, clipped) as 0-d tensors; `clipped` is 1.0 if this step was clipped. Both stay
    on the device so the training loop syncs once per epoch, not per step.
    """
    norm = grad_norm(params)
    if clip.mode == "none":
        return norm, torch.zeros((), device=norm.device)
    assert clip.threshold is not None
    grads = [p.grad for p in params if p.grad is not None]
    if clip.mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, clip.threshold, norm, foreach=True)
        return norm, (norm > clip.threshold).float()
    peak = torch.nn.utils.get_total_norm(grads, norm_type=math.inf, foreach=True)
    torch._foreach_clamp_min_(grads, -clip.threshold)
    torch._foreach_clamp_max_(grads, clip.threshold)
    return norm, (peak > clip.threshold).float()
