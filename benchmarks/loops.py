"""The training loops the figures compare: the engine's own `train()`, and a bare step loop over
batches that are already staged (the ceiling for any input pipeline) or come from a DataLoader.

All of them build the model and optimizer exactly as the engine does (`build_model`, channels_last
per `device_settings`, `initial_model`, `build_optimizer`), so the only difference between them is where the
batches come from and the engine's per-step bookkeeping (lr schedule, gradient-norm stats,
divergence check).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tuner.study.params import Augment, TrialParams
from tuner.training.data import DeviceData, train_batches
from tuner.training.optim import build_optimizer
from tuner.training.train import DeviceSettings, device_settings, initial_model, train

from .core import sync


def settings_for(params: TrialParams, device: torch.device) -> DeviceSettings:
    t = params.training
    return device_settings(device, t.precision, t.compile)


def fresh_model(params: TrialParams, data: DeviceData) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Model and optimizer as `tuner.training.train.train` builds them (without torch.compile), with the
    backend flags of the run's precision set (TF32 off for fp32) as `train()` sets them."""
    device = data.device
    settings = settings_for(params, device)
    settings.apply(device)
    torch.manual_seed(params.training.seed)
    model = initial_model(params.training.model, data.num_classes, device, settings)
    model.train()
    return model, build_optimizer(model.parameters(), params.optimizer, device, fused=settings.fused_adam)


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
              settings: DeviceSettings) -> torch.Tensor:
    """Forward (autocast as the engine does), loss, backward, Adam step: nothing else."""
    dtype = settings.autocast_dtype
    with torch.autocast(xb.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(xb).float(), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def staged_batches(data: DeviceData, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of the engine's batches (augmented, normalised, channels_last float), materialised
    up front on the device: what an infinitely fast input pipeline would hand the model."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    return [(xb, yb.clone()) for xb, yb in train_batches(data, batch_size, gen, Augment())]


def engine_epoch_seconds(params: TrialParams, data: DeviceData) -> float:
    """Wall time of one epoch of `tuner.training.train.train` itself: from the call (model and optimizer
    construction included) to the end of the epoch's last optimizer step. The validation pass
    that follows the last step is not counted."""
    device = data.device
    end: list[float] = []

    def on_step(i: int, per_epoch: int) -> None:
        if i == per_epoch:
            sync(device)
            end.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    result = train(params.with_training(epochs=1), data, on_step=on_step)
    if result.outcome != "completed" or not end:
        raise RuntimeError(f"benchmark trial did not complete: {result.outcome} {result.diverged_at}")
    return end[-1] - t0


def loop_seconds(params: TrialParams, data: DeviceData, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Wall time of a plain `for x, y in batches: step` loop with a fresh model and optimizer
    (built inside the timed region, like `engine_epoch_seconds`). Batches not yet on the device
    are moved there, as a plain loop would."""
    device = data.device
    settings = settings_for(params, device)
    sync(device)
    t0 = time.perf_counter()
    model, optimizer = fresh_model(params, data)
    for xb, yb in batches:
        if xb.device != device:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        bare_step(model, optimizer, xb, yb, settings)
    sync(device)
    return time.perf_counter() - t0
