"""The bridge from an Optuna trial to the trainer: sample, train, report each epoch, ask the
pruner, checkpoint, record attrs. It is the only code that touches a running `optuna.Trial`; the
trainer (train.py) knows nothing of Optuna, and the worker loop (worker.py) only asks and tells.

Every storage write goes through the worker's `retry` step (storage.Retry), so a database restart
in the middle of a trial costs a pause, not the trial. Each step is safe to repeat: reports and
attrs are upserts.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.engine.faults import GracefulStop
from tuner.errors import CheckpointError
from tuner.storage import keys
from tuner.storage.artifacts import CheckpointPolicy, CheckpointStore
from tuner.study.config import StudyConfig
from tuner.study.space import suggest


def environment(device: Any, worker: str | None = None) -> dict[str, str]:
    """What a trial ran on: device, torch and Optuna versions, host (and the worker's id)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env = {"device": str(device), "device_name": name, "torch": torch.__version__,
           "optuna": optuna.__version__, "host": platform.node()}
    if worker:
        env["worker"] = worker
    return env


@dataclass
class Outcome:
    """How a trial ended, for `study.tell`."""

    state: TrialState
    value: float | None = None
    note: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # the trial's checkpoint file, to delete once it is told


def finished(how: str, result: Any, started: float, checkpoint_id: str | None, keep: str) -> Outcome:
    """How a trained trial ends: `how` is "completed", "stopped" (pruned) or "diverged"; `result` a
    train.TrainResult (or a pack slot's). Also the packed loop's (packed.py)."""
    attrs: dict[str, Any] = {keys.SECONDS: time.perf_counter() - started, keys.HISTORY: result.history,
                             keys.EPOCHS: result.epochs}
    if how == "diverged":
        attrs.update({keys.DIVERGED: True, keys.DIVERGED_AT: result.diverged_at})
        epoch = (result.diverged_at or {}).get("epoch")
        outcome = Outcome(TrialState.PRUNED, note=f"diverged at epoch {epoch}", attrs=attrs)
    elif how == "stopped":
        outcome = Outcome(TrialState.PRUNED, note=f"pruned at epoch {result.epochs}", attrs=attrs)
    else:
        assert result.val_accuracy is not None
        outcome = Outcome(TrialState.COMPLETE, value=float(result.val_accuracy), attrs=attrs)
    if checkpoint_id is not None and not (outcome.state == TrialState.COMPLETE and keep == "best"):
        # nothing resumes a finished trial: the worker deletes its checkpoint file once the trial is
        # told. The attr stays: a worker that dies before its tell leaves a RUNNING trial whose retry
        # must still find the last checkpoint (a dangling attr on a finished trial costs a `stat`).
        outcome.checkpoint = checkpoint_id
    return outcome


def failed(exc: BaseException, started: float) -> Outcome:
    """A trial whose training raised: FAIL, with the reason (passwords redacted) in the user attr `error`."""
    from tuner.errors import redact

    return Outcome(TrialState.FAIL, note=f"{type(exc).__name__}: {exc}", attrs={
        keys.ERROR: redact(f"{type(exc).__name__}: {exc}")[:2000], keys.SECONDS: time.perf_counter() - started})


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


class Objective:
    """Runs one trial: `run(trial, resume) -> Outcome`. Pruned and diverged trials end PRUNED; an
    exception in training ends FAIL with user attr `error`. A stop signal raises GracefulStop at
    the first epoch boundary that has its checkpoint."""

    def __init__(self, config: StudyConfig, data: Any, *, retry: Callable[..., Any] | None = None,
                 store: CheckpointStore | None = None, policy: CheckpointPolicy | None = None) -> None:
        self.config = config
        self.data = data
        self.retry = retry or (lambda fn, recover=None: fn())
        self.store = store
        self.policy = policy or CheckpointPolicy()
        self._tmp = Path(tempfile.mkdtemp(prefix="tuner-ckpt-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def run(self, trial: optuna.Trial, resume: tuple[int, dict[str, Any]] | None = None,
            retried: bool = False) -> Outcome:
        from tuner.training.train import train

        retry = self.retry
        params = retry(lambda: suggest(trial, self.config.space, self.config.training))
        retry(lambda: trial.set_user_attr(keys.PARAMS, params.to_dict()))
        started = time.perf_counter()
        local = self._tmp / f"trial-{trial.number}.pt"
        resume_file = self._download(trial.number, resume, params)
        if resume_file is not None:
            number, state = resume[0], resume_file[1]  # type: ignore[index]
            retry(lambda: trial.set_user_attr(keys.RESUMED, int(state["epoch"])))
            retry(lambda: trial.set_user_attr(keys.RESUMED_TRIAL, number))
            for rec in state["history"]:  # the earlier epochs of the learning curve
                retry(lambda rec=rec: trial.report(float(rec["val_accuracy"]), int(rec["epoch"])))
        elif retried:
            retry(lambda: trial.set_user_attr(keys.RESUMED, 0))

        total = params.training.epochs
        saved: dict[str, Any] = {"at": time.monotonic(), "epoch": -1, "id": None}
        stop = self.policy.stop
        nop = isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        judged_from = 1  # set in the try below (reading the data can fail like training does)

        def when(record: Any) -> bool:
            if self.store is None or not self.policy.due(record.epoch, total, saved["at"]):
                return False
            saved["at"], saved["epoch"] = time.monotonic(), record.epoch
            return True

        def on_epoch(record: Any) -> bool:
            if saved["epoch"] == record.epoch and self.store is not None:
                if saved["id"] is None:
                    saved["id"] = self.store.new_id(trial.number)
                self.store.write(saved["id"], local)
                retry(lambda: trial.set_user_attr(keys.CHECKPOINT, {"artifact_id": saved["id"],
                                                                    "epoch": record.epoch}))
            retry(lambda: trial.report(record.val_accuracy, record.epoch))
            # should_prune re-reads the whole trial from the storage; NopPruner's answer is always no
            # (not while the trial's own lr still warms up: schedule-aware pruning)
            prune = not nop and record.epoch >= judged_from and bool(retry(trial.should_prune))
            # a signal stops the trial at the first epoch boundary that has its checkpoint (one that
            # came after `when` decided for this epoch waits for the next)
            if (not prune and stop is not None and stop.stop_requested and record.epoch < total
                    and saved["epoch"] == record.epoch):
                raise GracefulStop(f"stopped by a signal after epoch {record.epoch}")
            return prune

        try:
            judged_from = self._judged_from(params)
            if judged_from > 1 and not nop:
                retry(lambda: trial.set_user_attr(keys.PRUNE_HELD_UNTIL, judged_from))
            result = train(params, self.data, on_epoch=on_epoch,
                           checkpoint_path=local if self.store is not None else None, checkpoint_when=when,
                           resume_from=resume_file[0] if resume_file is not None else None)
        except (GracefulStop, KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError):
            raise
        except Exception as exc:  # noqa: BLE001 - the trial fails, the sweep goes on
            from tuner.errors import StorageError

            if isinstance(exc, StorageError):
                raise
            return failed(exc, started)
        finally:
            for p in (local, self._tmp / f"resume-{trial.number}.pt"):
                p.unlink(missing_ok=True)

        return finished(result.outcome, result, started, saved["id"], self.policy.keep)

    def _judged_from(self, params: Any) -> int:
        """The first epoch the pruner is asked about: 1, or with schedule-aware pruning the first
        epoch that ends past the trial's lr warm-up (`optim.first_judged_epoch`)."""
        if not self.config.pruner.schedule_aware:
            return 1
        from tuner.training.optim import first_judged_epoch
        from tuner.training.train import epoch_steps

        return first_judged_epoch(params.schedule, params.training.epochs, epoch_steps(params, self.data))

    def _download(self, number: int, resume: tuple[int, dict[str, Any]] | None,
                  params: Any) -> tuple[Path, dict[str, Any]] | None:
        from tuner.training.train import load_checkpoint

        if resume is None or self.store is None:
            return None
        pred, ck = resume
        path = self._tmp / f"resume-{number}.pt"
        try:
            self.store.copy_to(ck["artifact_id"], path)
            state = load_checkpoint(path, params)
        except (OSError, ValueError) as exc:
            _warn(f"trial {number}: checkpoint of trial {pred} not found in {self.store.base_path} "
                  f"({type(exc).__name__}); starting from epoch 0")
            return None
        except CheckpointError as exc:
            _warn(f"trial {number}: checkpoint of trial {pred} unusable ({exc}); starting from epoch 0")
            return None
        return path, state
