"""The bridge from Optuna to the trainer: sample, train, report each epoch, prune, record attrs."""

from __future__ import annotations

import contextlib
import platform
import time
from typing import Any, Callable

import optuna
import torch

from .config import StudyConfig
from .data import DeviceData
from .faults import GracefulStop
from .resilient import set_user_attrs
from .space import suggest
from .train import EpochRecord, TrainResult, train

# user attrs every trial gets (the report and export read these)
ATTR_PARAMS = "params"  # the full params in the export format
ATTR_HISTORY = "history"  # per-epoch records, with gradient-norm statistics and clip fraction
ATTR_SECONDS = "seconds"
ATTR_EPOCHS = "epochs"
ATTR_DIVERGED = "diverged"
ATTR_ERROR = "error"
ATTR_ENV = "env"  # device, torch and optuna versions, host


def environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "optuna": optuna.__version__, "host": platform.node()}


def plain_train(params: Any, data: DeviceData, *, on_epoch: Callable, trial: optuna.Trial) -> TrainResult:
    """The engine without checkpoints (the default `train_fn`)."""
    return train(params, data, on_epoch=on_epoch)


def record_failures(objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """Store the reason of an exception in the trial (user attr `error`); Optuna marks it FAIL."""

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except (optuna.TrialPruned, GracefulStop):  # GracefulStop: a signal; the trial was queued to resume
            raise
        except Exception as exc:
            from .errors import redact

            # UpdateFinishedTrialError: another worker judged this trial stale and failed it
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(ATTR_ERROR, redact(f"{type(exc).__name__}: {exc}")[:2000])
            raise

    return guarded


class Objective:
    """`objective(trial) -> final val accuracy`. Pruned and diverged trials raise TrialPruned.

    `train_fn` is the engine's `train`; workers pass `artifacts.Checkpointer`, which checkpoints
    every epoch into the study's artifact store and resumes retried trials.
    """

    def __init__(self, config: StudyConfig, data: DeviceData,
                 train_fn: Callable[..., TrainResult] = plain_train) -> None:
        self.config = config
        self.data = data
        self.train_fn = train_fn
        self.env = environment(data.device)

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.config.space, self.config.training)
        set_user_attrs(trial, {ATTR_PARAMS: params.to_dict(), ATTR_ENV: self.env})
        started = time.perf_counter()

        def on_epoch(record: EpochRecord) -> bool:
            trial.report(record.val_accuracy, record.epoch)
            return trial.should_prune()

        try:
            result = self.train_fn(params, self.data, on_epoch=on_epoch, trial=trial)
        except BaseException:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(ATTR_SECONDS, time.perf_counter() - started)
            raise
        attrs: dict[str, Any] = {ATTR_SECONDS: time.perf_counter() - started, ATTR_HISTORY: result.history,
                                 ATTR_EPOCHS: result.epochs}
        if result.outcome == "diverged":
            attrs.update({ATTR_DIVERGED: True, "diverged_at": result.diverged_at})
        set_user_attrs(trial, attrs)
        if result.outcome == "diverged":
            raise optuna.TrialPruned(f"diverged at epoch {(result.diverged_at or {}).get('epoch')}")
        if result.outcome == "stopped":
            raise optuna.TrialPruned(f"pruned at epoch {result.epochs}")
        assert result.val_accuracy is not None
        return result.val_accuracy
