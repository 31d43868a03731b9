"""The trial runner: one leased trial's life, from its start to its tell, whichever loop drives it.

    runner = TrialRunner(ctx, lease, engine)
    runner.start()                   # sample its params, record them, resume from the predecessor's
                                     # checkpoint (reporting the earlier epochs), add it to the engine
    for each epoch the engine trains:
        runner.after_epoch(out)      # diverged? checkpoint when due, report, prune?, finished? -> tell
    a stop signal: runner.interrupt()    # checkpoint now, mark interrupted, tell FAIL (its retry resumes it)
    an error in training: runner.fail(exc)

A loop only schedules runners: `loop.run_trials` keeps an engine of one trial (`SingleEngine`) or
of K (`Pack`) full, and calls these at each epoch boundary. The runner is the only code that
touches a running `optuna.Trial`; the engines (tuner.training, tuner.packing) know nothing of
Optuna, and the lease manager (lease.py) only leases and tells.

Every storage write goes through the lease manager's `retry` step (storage.Retry), so a database
restart in the middle of a trial costs a pause, not the trial. Each step is safe to repeat: reports
and attrs are upserts.

**Checkpoints** (artifacts.CheckpointPolicy): at an epoch boundary once `checkpoint_every` seconds
have passed since the trial started or last saved, always on a stop signal, and after the last
epoch only for keep policy `best`. The engine writes the checkpoint to a local file, which goes
into the store atomically; the user attr `checkpoint` = {artifact_id, epoch} points at it.

**Segments.** A PBT segment that is not its member's last (`lease.until`, pbt.py) ends COMPLETE
after that epoch, with a checkpoint written then and kept: the member's next segment, or another
member exploiting it, starts from there. It records the mutable knobs in force (`pbt_knobs`).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.engine.lease import Lease, LeaseManager
from tuner.errors import CheckpointError, StorageError, redact
from tuner.storage import keys
from tuner.storage.artifacts import CheckpointPolicy
from tuner.study.params import TrialParams
from tuner.study.space import suggest
from tuner.training.data import DeviceData
from tuner.training.optim import first_judged_epoch
from tuner.training.train import EpochEngine, SlotEpoch, TrainResult, epoch_steps, load_checkpoint


@dataclass
class Outcome:
    """How a trial ended, for `study.tell`."""

    state: TrialState
    value: float | None = None
    note: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # the trial's checkpoint file, to delete once it is told


def finished(how: str, result: TrainResult, started: float, checkpoint_id: str | None, keep: str,
             segment_end: bool = False) -> Outcome:
    """How a trained trial ends: `how` is "completed", "stopped" (pruned) or "diverged".
    `segment_end`: a PBT segment before its member's last, whose checkpoint others start from."""
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
    kept = outcome.state == TrialState.COMPLETE and (keep == "best" or segment_end)
    if checkpoint_id is not None and not kept:
        # nothing resumes a finished trial: its checkpoint file is deleted once the trial is told.
        # The attr stays: a worker that dies before its tell leaves a RUNNING trial whose retry
        # must still find the last checkpoint (a dangling attr on a finished trial costs a `stat`).
        outcome.checkpoint = checkpoint_id
    return outcome


def failed(exc: BaseException, started: float) -> Outcome:
    """A trial whose training raised: FAIL, with the reason (passwords redacted) in the user attr `error`."""
    return Outcome(TrialState.FAIL, note=f"{type(exc).__name__}: {exc}", attrs={
        keys.ERROR: redact(f"{type(exc).__name__}: {exc}")[:2000], keys.SECONDS: time.perf_counter() - started})


@dataclass(frozen=True)
class RunContext:
    """What every runner of one worker shares."""

    manager: LeaseManager
    data: DeviceData
    policy: CheckpointPolicy
    tmp: Path  # local checkpoint files before they go into the store, and downloaded ones


class TrialRunner:
    """One leased trial in an engine; see the module docstring."""

    def __init__(self, ctx: RunContext, lease: Lease, engine: EpochEngine) -> None:
        self.ctx = ctx
        self.lease = lease
        self.trial: optuna.Trial = lease.trial
        self.number: int = lease.trial.number
        self.engine = engine
        self.manager = ctx.manager
        self.retry = ctx.manager.retry
        self.nop = isinstance(ctx.manager.study.pruner, optuna.pruners.NopPruner)
        self.params: TrialParams | None = None
        self.started = time.perf_counter()
        self.judged_from = 1  # the first epoch the pruner is asked about
        self.local = ctx.tmp / f"trial-{self.number}.pt"
        self.saved_at = time.monotonic()
        self.saved_epoch = -1
        self.checkpoint_id: str | None = None
        self.in_engine = False

    # -- the start -----------------------------------------------------------------------------

    def start(self) -> bool:
        """Sample, record, resume and add the trial to the engine. False when it already ended:
        failed while being set up (told FAIL), or taken over by another worker."""
        m, retry, trial = self.manager, self.retry, self.trial
        config = m.config
        m.use_sampler(self.lease)
        try:
            params = retry(lambda: suggest(trial, config.space, config.training))
            self.params = params
            retry(lambda: trial.set_user_attr(keys.PARAMS, params.to_dict()))
            population = config.population
            if population is not None:  # a PBT segment: the mutable knobs in force
                knobs = {k: v for k, v in trial.params.items() if k in population.mutable}
                retry(lambda: trial.set_user_attr(keys.PBT_KNOBS, knobs))
            self.started = time.perf_counter()
            resume = self._download(params)
            if resume is not None:
                state = resume[1]
                retry(lambda: trial.set_user_attr(keys.RESUMED, int(state["epoch"])))
                retry(lambda: trial.set_user_attr(keys.RESUMED_TRIAL, self.lease.resume[0]))  # type: ignore[index]
                for rec in state["history"]:  # the earlier epochs of the learning curve
                    retry(functools.partial(trial.report, float(rec["val_accuracy"]), int(rec["epoch"])))
            elif self.lease.retried:
                retry(lambda: trial.set_user_attr(keys.RESUMED, 0))
            try:
                if resume is None and self.lease.resume is not None and config.population is not None:
                    # a segment trains only its interval: from epoch 0 it would be another run's segment
                    raise CheckpointError(f"the checkpoint of trial {self.lease.resume[0]} it starts from is unusable")
                self.judged_from = self._judged_from(params)
                if self.judged_from > 1 and not self.nop:
                    retry(lambda: trial.set_user_attr(keys.PRUNE_HELD_UNTIL, self.judged_from))
                self.engine.add(self.number, params, resume_from=resume[0] if resume is not None else None)
                self.in_engine = True
            except Exception as exc:  # noqa: BLE001 - the trial fails, the sweep goes on
                if isinstance(exc, StorageError):
                    raise
                self.fail(exc)
                return False
            finally:
                (self.ctx.tmp / f"resume-{self.number}.pt").unlink(missing_ok=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.release()
            m.taken_over(trial)
            return False
        return True

    def _judged_from(self, params: TrialParams) -> int:
        """1, or with schedule-aware pruning the first epoch that ends past the trial's lr warm-up."""
        if not self.manager.config.pruner.schedule_aware:
            return 1
        return first_judged_epoch(params.schedule, params.training.epochs, epoch_steps(params, self.ctx.data))

    def _download(self, params: TrialParams) -> tuple[Path, dict[str, Any]] | None:
        """The predecessor's checkpoint, fetched and checked; None (with a warning) when unusable."""
        store, resume = self.manager.store, self.lease.resume
        if resume is None:
            return None
        pred, ck = resume
        path = self.ctx.tmp / f"resume-{self.number}.pt"
        try:
            store.copy_to(ck["artifact_id"], path)
            return path, load_checkpoint(path, params)
        except (OSError, ValueError) as exc:
            why = f"not found in {store.location} ({type(exc).__name__})"
        except CheckpointError as exc:
            why = f"unusable ({exc})"
        print(f"warning: trial {self.number}: checkpoint of trial {pred} {why}; starting from epoch 0",
              file=sys.stderr, flush=True)
        return None

    # -- after each epoch ----------------------------------------------------------------------

    def after_epoch(self, out: SlotEpoch) -> bool:
        """The trial's part of an engine epoch: True when the trial ended (it was told)."""
        try:
            if out.diverged:
                self.finish("diverged")
                return True
            record = out.record
            assert record is not None
            until = self.lease.until
            segment_end = until is not None and record.epoch >= until and not out.finished
            self.checkpoint(record.epoch, force=segment_end)
            self.retry(functools.partial(self.trial.report, record.val_accuracy, record.epoch))
            # should_prune re-reads the whole trial; NopPruner's answer is always no, and with
            # schedule-aware pruning it is not asked while the trial's own lr still warms up
            if not self.nop and record.epoch >= self.judged_from and bool(self.retry(self.trial.should_prune)):
                self.finish("stopped")
                return True
            if out.finished or segment_end:
                self.finish("completed", segment_end=segment_end)
                return True
            return False
        except optuna.exceptions.UpdateFinishedTrialError:
            self.release()
            self.manager.taken_over(self.trial)
            return True

    def checkpoint(self, epoch: int, force: bool = False) -> None:
        """The trial's checkpoint into the store when the policy says so (or `force`: a stop signal)."""
        store, policy = self.manager.store, self.ctx.policy
        if self.saved_epoch == epoch or self.params is None:
            return
        if not force and not policy.due(epoch, self.params.training.epochs, self.saved_at):
            return
        self.engine.save_checkpoint(self.number, self.local)
        self.saved_at, self.saved_epoch = time.monotonic(), epoch
        if self.checkpoint_id is None:
            self.checkpoint_id = store.new_id(self.number)
        store.write(self.checkpoint_id, self.local)
        checkpoint_id = self.checkpoint_id
        self.retry(lambda: self.trial.set_user_attr(keys.CHECKPOINT, {"artifact_id": checkpoint_id, "epoch": epoch}))

    # -- the end -------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """A stop signal: the trial is at an epoch boundary; checkpoint it now, mark it interrupted and
        tell it FAIL. The loop then queues the retry copies (lease.queue_retries), which resume it."""
        try:
            if self.in_engine:
                self.checkpoint(self.engine.epoch(self.number), force=True)
            self.manager.interrupt(self.trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.manager.taken_over(self.trial)
        finally:
            self.release()

    def abort(self) -> None:
        """A second signal: mark interrupted and tell FAIL, one try each, then let the abort go on."""
        self.manager.abort(self.trial)

    def finish(self, how: str, segment_end: bool = False) -> None:
        """Tell a trial that completed, was pruned ("stopped") or diverged."""
        result = self.engine.result(self.number)
        self.tell(finished(how, result, self.started, self.checkpoint_id, self.ctx.policy.keep, segment_end))

    def fail(self, exc: BaseException) -> None:
        self.tell(failed(exc, self.started))

    def tell(self, outcome: Outcome) -> None:
        try:
            self.manager.tell(self.trial, outcome)
        finally:
            self.release()

    def release(self) -> None:
        """The trial leaves the engine and the running set (no more heartbeats)."""
        if self.in_engine:
            self.engine.remove(self.number)
            self.in_engine = False
        self.manager.release(self.trial)
        self.local.unlink(missing_ok=True)
