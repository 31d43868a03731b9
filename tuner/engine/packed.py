"""The packed worker loop: a worker that holds K trials at once and trains them as one pack
(pack.py), instead of one trial after another (worker.py's `run_one` with objective.py).

    while the budget has trials or the pack still trains:
        while the pack has a free slot: lease a trial (worker.lease: gate, heartbeat, env attr),
            suggest its params, resume it from its predecessor's checkpoint, add it to the pack
        pack.run_epoch()                     # one epoch of every slot, each its own epoch
        per slot: checkpoint (when due), report, should_prune (schedule-aware), and tell the
            finished, pruned and diverged ones; their slots are refilled at the top of the loop
    a stop signal: every slot still training checkpoints at this epoch boundary, is marked
    interrupted, told FAIL and queued to resume (as worker.run_one does for one trial)

Everything a trial records is what objective.py records for it: `params`, `history`, `epochs`,
`seconds`, `checkpoint`, `resumed_from_epoch`, `pruning_held_until_epoch`, `diverged`, ... A
packed trial's checkpoint is train.save_checkpoint's format, so its retry resumes packed or alone.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from tuner.engine.objective import Outcome, failed, finished
from tuner.storage import keys
from tuner.study.space import suggest

if TYPE_CHECKING:
    from tuner.engine.worker import Lease, Worker
    from tuner.study.params import TrialParams


def run_packed(worker: Worker, deadline: float | None) -> bool:
    """Run the worker's trials in packs when its `pack` setting (the flag, else the study's
    `training.pack`, else auto) gives more than one trial per pack. False when it gives one: the
    caller then runs its trials one at a time."""
    from tuner.packing.pack import pack_size

    setting: int | str = worker.settings.pack or "auto"  # resolved in Worker.open (settings.py)
    data = worker.objective.data
    size, why = pack_size(setting, worker.config.training, data)
    if size <= 1:
        if setting not in (1, "auto"):
            print(f"note: --pack {setting}: {why}; trials run one at a time", file=sys.stderr, flush=True)
        return False
    print(f"note: {why} (trials trained at once by this worker)", file=sys.stderr, flush=True)
    PackedLoop(worker, size, why).run(deadline)
    return True


@dataclass
class _Run:
    """One leased trial in the pack."""

    lease: Lease
    params: TrialParams
    started: float
    local: Path  # where its checkpoint is written before it goes into the store
    judged_from: int = 1
    saved: dict[str, Any] = field(default_factory=lambda: {"at": time.monotonic(), "epoch": -1, "id": None})

    @property
    def trial(self) -> optuna.Trial:
        return self.lease.trial


class PackedLoop:
    def __init__(self, worker: Worker, capacity: int, why: str = "") -> None:
        from tuner.packing.pack import Pack

        self.w = worker
        self.objective = worker.objective
        self.pack = Pack(self.objective.data, capacity, worker.config.training)
        self.runs: dict[int, _Run] = {}
        self.nop = isinstance(worker.study.pruner, optuna.pruners.NopPruner)
        self.why = why

    # -- the loop ------------------------------------------------------------------------------

    def run(self, deadline: float | None) -> None:
        w = self.w
        try:
            while True:
                if not w.stop.stop_requested and (deadline is None or time.monotonic() < deadline):
                    self.fill()
                if not self.runs:
                    if w.stop.stop_requested or (deadline is not None and time.monotonic() >= deadline):
                        break
                    if w.await_stragglers(deadline):  # our pack is empty: wait for others' trials
                        continue
                    break
                self.epoch()
                if w.stop.stop_requested and self.runs:
                    self.interrupt()
        except KeyboardInterrupt:  # a second signal: abort now, still queue the trials to resume
            for run in list(self.runs.values()):
                w.retry.once(functools.partial(run.trial.set_user_attr, keys.INTERRUPTED, True))
                w.retry.once(functools.partial(w.study.tell, run.trial, state=TrialState.FAIL, skip_if_finished=True))
            w.retry.once(w.queue_retries)
            raise
        finally:
            for run in list(self.runs.values()):
                self.release(run)

    def fill(self) -> None:
        """Lease trials into the free slots (none when the budget is used up or a stage waits)."""
        while self.pack.free > 0 and not self.w.stop.stop_requested:
            lease = self.w.lease()
            if lease is None:
                return
            self.start(lease)

    def start(self, lease: Lease) -> None:
        """objective.Objective.run's start for a packed trial: sample, record, resume, add to the pack."""
        w, objective = self.w, self.objective
        trial = lease.trial
        number = trial.number
        w.running[number] = lease
        w.use_sampler(lease)
        retry = w.retry
        params = retry(lambda: suggest(trial, w.config.space, w.config.training))
        retry(lambda: trial.set_user_attr(keys.PARAMS, params.to_dict()))
        run = _Run(lease, params, time.perf_counter(), objective._tmp / f"trial-{number}.pt")
        self.runs[number] = run
        try:
            resume_file = objective._download(number, lease.resume, params)
            if resume_file is not None:
                pred, state = lease.resume[0], resume_file[1]  # type: ignore[index]
                retry(lambda: trial.set_user_attr(keys.RESUMED, int(state["epoch"])))
                retry(lambda: trial.set_user_attr(keys.RESUMED_TRIAL, pred))
                for rec in state["history"]:  # the earlier epochs of the learning curve
                    retry(functools.partial(trial.report, float(rec["val_accuracy"]), int(rec["epoch"])))
            elif lease.retried:
                retry(lambda: trial.set_user_attr(keys.RESUMED, 0))
            try:
                run.judged_from = objective._judged_from(params)
                if run.judged_from > 1 and not self.nop:
                    retry(lambda: trial.set_user_attr(keys.PRUNE_HELD_UNTIL, run.judged_from))
                self.pack.add(number, params, resume_from=resume_file[0] if resume_file is not None else None)
            except Exception as exc:  # noqa: BLE001 - the trial fails, the sweep goes on (objective.py)
                self.fail(run, exc)
            finally:
                (objective._tmp / f"resume-{number}.pt").unlink(missing_ok=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.release(run)
            w._taken_over(trial)

    def epoch(self) -> None:
        """One epoch of the pack, then each slot's report, pruning decision and, when it ends, its tell."""
        try:
            results = self.pack.run_epoch()
        except Exception as exc:  # noqa: BLE001 - the trials fail, the sweep goes on (objective.py)
            from tuner.errors import StorageError

            if isinstance(exc, StorageError):
                raise
            for run in list(self.runs.values()):
                self.fail(run, exc)
            return
        for number, out in results.items():
            run = self.runs.get(number)  # type: ignore[call-overload]
            if run is None:
                continue
            try:
                if out.diverged:
                    self.finish(run, "diverged")
                    continue
                record = out.record
                assert record is not None
                self.checkpoint(run, record.epoch)
                self.w.retry(functools.partial(run.trial.report, record.val_accuracy, record.epoch))
                # should_prune re-reads the whole trial; not while the trial's own lr still warms up
                prune = not self.nop and record.epoch >= run.judged_from and \
                    bool(self.w.retry(run.trial.should_prune))
                if prune:
                    self.finish(run, "stopped")
                elif out.finished:
                    self.finish(run, "completed")
            except optuna.exceptions.UpdateFinishedTrialError:
                self.release(run)
                self.w._taken_over(run.trial)

    # -- checkpoints and signals ---------------------------------------------------------------

    def checkpoint(self, run: _Run, epoch: int, force: bool = False) -> None:
        """The slot's checkpoint into the store when the policy says so (objective.py's rule: every
        `checkpoint_every` seconds, on a stop signal, after the last epoch only to keep the best)."""
        store, policy, saved = self.objective.store, self.objective.policy, run.saved
        if store is None or saved["epoch"] == epoch:
            return
        if not force and not policy.due(epoch, run.params.training.epochs, saved["at"]):
            return
        number = run.trial.number
        self.pack.save_checkpoint(number, run.local)
        saved["at"], saved["epoch"] = time.monotonic(), epoch
        if saved["id"] is None:
            saved["id"] = store.new_id(number)
        store.write(saved["id"], run.local)
        self.w.retry(lambda: run.trial.set_user_attr(keys.CHECKPOINT, {"artifact_id": saved["id"], "epoch": epoch}))

    def interrupt(self) -> None:
        """A stop signal: every slot still training is at an epoch boundary; each gets its checkpoint,
        is marked interrupted, told FAIL and queued to resume (worker.run_one's GracefulStop)."""
        w = self.w
        for run in list(self.runs.values()):
            trial = run.trial
            try:
                self.checkpoint(run, self.pack.epoch(trial.number), force=True)
                w.retry(functools.partial(trial.set_user_attr, keys.INTERRUPTED, True))
                w.retry(functools.partial(w.study.tell, trial, state=TrialState.FAIL, skip_if_finished=True))
            except optuna.exceptions.UpdateFinishedTrialError:
                w._taken_over(trial)
                self.release(run)
                continue
            w.stop.interrupted.append(trial.number)
            self.release(run)
            w._finished(trial)
        w.queue_retries()

    # -- the end of a trial --------------------------------------------------------------------

    def finish(self, run: _Run, how: str) -> None:
        """Tell a trial that completed, was pruned ("stopped") or diverged, as objective.py words it."""
        self.tell(run, finished(how, self.pack.result(run.trial.number), run.started, run.saved["id"],
                                self.objective.policy.keep))

    def fail(self, run: _Run, exc: Exception) -> None:
        self.tell(run, failed(exc, run.started))

    def tell(self, run: _Run, outcome: Outcome) -> None:
        """worker.run_one's tell: attrs, the state, the finished trial's checkpoint file, the callback."""
        try:
            self.w.tell_outcome(run.trial, outcome)
        finally:
            self.release(run)

    def release(self, run: _Run) -> None:
        """The trial leaves the pack and the worker's running set (no more heartbeats)."""
        from tuner.storage._optuna import trial_id

        number = run.trial.number
        self.runs.pop(number, None)
        if number in self.pack.slots:
            self.pack.remove(number)
        self.w.heartbeat.remove(trial_id(run.trial))
        self.w.running.pop(number, None)
        run.local.unlink(missing_ok=True)
