"""A worker: an explicit ask → train → tell loop on Optuna's public API.

    with gate:                        # one holder per study, across processes and machines
        fail_stale_trials(study)      # Optuna's heartbeat rule (at most once per heartbeat interval)
        reconcile(trials)             # orphans, duplicate queue entries, retry copies
        if no WAITING trial and the budget allows: study.add_trial(<WAITING, tuner_queued token>)
        trial = study.ask()           # pops the oldest WAITING trial: retries first
        heartbeat(trial), env attr    # from here Optuna's stale rule covers the trial
    outcome = objective.run(trial)    # train, report, prune, checkpoint (objective.py)
    study.tell(trial, outcome)

**The budget is exact.** `n_trials` (study user attr `tuner_n_trials`) counts every trial of the
study except those replaced by a retry copy and void ones (keys.budget_used). It is counted with
the gate held, right before a trial is queued, so workers finishing together never overshoot.

**Crashes.** A trial whose worker died stops beating; after the grace period Optuna's
`fail_stale_trials` fails it. Then, under the gate, `reconcile` adds one retry copy per crashed or
interrupted trial (Optuna's `failed_trial` / `retry_history` convention, as
`RetryFailedTrialCallback` writes it), at most `max_retry` times for crashes. Making copies under
the gate makes them idempotent: whichever worker gets there first makes it, once. A worker killed
between popping a trial and its first heartbeat leaves a RUNNING trial with a `tuner_queued`
token, no heartbeat and no `env`: it counts as stale once it started longer ago than the grace
period. Trials of plain Optuna users carry no such token and are never failed by tuner.

**Database faults.** Every step goes through `storage.Retry`. A step that failed while the gate
was held re-takes the gate (its connection may be gone) and re-reads the study before it tries
again, so a lost commit reply never duplicates a trial. If the gate's own connection died while a
trial was being created (the lock may have been taken by another worker in between), the worker
recounts and, should the study now be over budget, marks its new trial `void` and tells it FAIL.

**Stages** (`stages:` in the study file, stages.py). A fresh trial is queued for the first stage
that is not full, with that stage's name, index and fixed values, and only once no trial of an
earlier stage is RUNNING or WAITING. Otherwise `lease` returns None, and the worker waits in
`await_stragglers` (polling every min(heartbeat interval, 2 s); a crashed trial of the stage is
failed there by the stale rule and its retry copy run first) until the stage's last trials have
finished, then leases again: the next stage never starts on partial results. The trial is sampled
with `PartialFixedSampler(fixed, base sampler)`.

**A set of running trials.** The loop leases trials into a set that the heartbeat thread beats
for: one trial at a time here, or K with trial packing (packed.py, `--pack K`).
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.engine.faults import GracefulStop, Interrupted, StopController
from tuner.engine.gate import Gate
from tuner.engine.stages import fixed_of, next_stage, over_quota
from tuner.storage import keys
from tuner.storage._optuna import trial_id as _trial_id
from tuner.storage.artifacts import CheckpointPolicy, CheckpointStore, cleanup, resume_point
from tuner.storage.database import Retry, StorageURL, open_storage, require_study
from tuner.study.config import StudyConfig, config_from_stored
from tuner.study.registry import build_pruner, build_sampler
from tuner.study.settings import Settings


class Heartbeat:
    """Beats for every trial in the running set, every `interval` seconds, in a daemon thread."""

    def __init__(self, storage: Any, interval: float) -> None:
        self.storage = storage
        self.interval = max(0.2, float(interval))
        self.ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuner-heartbeat", daemon=True)

    def add(self, trial_id: int, retry: Callable[..., Any]) -> None:
        retry(lambda: self.storage.record_heartbeat(trial_id))  # the first beat, before training
        with self._lock:
            self.ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.ids)
            for tid in ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001 - the main thread reports a dead database
                    pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Lease:
    """A trial this worker runs: the Optuna trial, and where it resumes from."""

    trial: optuna.Trial
    resume: tuple[int, dict[str, Any]] | None = None
    retried: bool = False
    fixed: dict[str, Any] | None = None  # a staged trial: the values its stage fixes (stages.py)


@dataclass
class Worker:
    url: StorageURL
    study_name: str
    settings: Settings  # resolved (settings.resolve); completed from the stored study in open()
    stop: StopController
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None
    objective_class: type | None = None  # objective.Objective, or a subclass (tests inject faults)
    ran: int = 0
    running: dict[int, Lease] = field(default_factory=dict)
    stale_checked: float = float("-inf")  # time.monotonic() of the last fail_stale_trials in a lease

    # -- set-up --------------------------------------------------------------------------------

    def open(self) -> None:
        from tuner.engine.objective import Objective, environment
        from tuner.training.data import load_dataset
        from tuner.training.train import resolve_device

        probe = open_storage(self.url, must_exist=True)
        self.study_id = require_study(probe, self.study_name)
        attrs = probe.get_study_user_attrs(self.study_id)
        probe.engine.dispose()
        self.config: StudyConfig = config_from_stored(attrs.get(keys.CONFIG), self.study_name)
        s = self.settings = self.settings.with_study(self.config, attrs)
        self.interval, self.grace, self.max_retry = s.heartbeat_interval, s.grace_period, s.max_retry
        self.keep, self.timeout = s.keep_checkpoints, s.timeout
        self.storage = open_storage(self.url, heartbeat_interval=self.interval, grace_period=self.grace,
                                    wal=s.sqlite_wal)
        self.retry = Retry(self.url.shown, s.retry_seconds)
        self.gate = Gate(self.url, self.study_id)
        t = self.config.training
        from tuner.training.models import is_reference, resolve_reference

        if is_reference(t.model):  # imported the same way as when the file was loaded; failing here: exit 1
            resolve_reference(t.model)
        device = resolve_device(s.device)
        data = load_dataset(t.dataset, device, data_dir=s.data_dir, val_fraction=t.val_fraction,
                            image_size=t.image_size)
        offset = s.worker_index if s.worker_index is not None else \
            random.SystemRandom().randrange(1, 2**20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = build_sampler(self.config.sampler.name, self.config.sampler.options, t.seed + offset)
        pruner = build_pruner(self.config.pruner.name, self.config.pruner.options, t.epochs)
        self.sampler = sampler  # the base sampler; a staged trial runs with PartialFixedSampler around it
        self.study = optuna.Study(study_name=self.study_name, storage=self.storage, sampler=sampler, pruner=pruner)
        self.token = uuid.uuid4().hex[:12]
        self.env = environment(device, worker=self.token)
        self.store = CheckpointStore(s.artifact_dir)
        self.objective = (self.objective_class or Objective)(self.config, data, retry=self.retry, store=self.store,
                                   policy=CheckpointPolicy(s.checkpoint_every, self.keep, self.stop))

    def close(self) -> None:
        for obj in ("objective", "gate"):
            if hasattr(self, obj):
                getattr(self, obj).close()
        if hasattr(self, "storage"):
            self.storage.engine.dispose()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run trials until the budget is used, the timeout passes or a signal comes."""
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        with Heartbeat(self.storage, self.interval) as self.heartbeat, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            from tuner.engine.packed import run_packed  # K trials at once when the pack setting says so (packed.py)

            packed = run_packed(self, deadline)
            while not packed and not self.stop.stop_requested:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                lease = self.lease()
                if lease is None:
                    if self.await_stragglers(deadline):
                        continue
                    break
                self.run_one(lease)
        self.cleanup()
        self.stop.raise_if_stopped()
        return self.ran

    def trials(self) -> list[FrozenTrial]:
        return self.retry(lambda: self.study.get_trials(deepcopy=False))

    @contextlib.contextmanager
    def gated(self) -> Iterator[None]:
        """The budget gate, taken under the retry rule."""
        self.retry(self.gate.acquire)
        try:
            yield
        finally:
            self.gate.release()

    def lease(self) -> Lease | None:
        """Queue and pop one trial with the gate held; None when the budget is used up."""
        with self.gated():
            return self.retry(self._lease, recover=self.gate.reacquire)

    def _lease(self) -> Lease | None:
        if time.monotonic() - self.stale_checked >= self.interval:
            # a trial goes stale only after the grace period (>= one heartbeat interval), so a check per
            # interval finds it at most one interval late; one per lease was a query per trial
            optuna.storages.fail_stale_trials(self.study)
            self.stale_checked = time.monotonic()
        trials = self.reconcile(self.trials())
        waiting = {t.number for t in trials if t.state == TrialState.WAITING}
        cap = self.budget()
        fresh = None
        stage = None
        if not waiting:
            if cap is not None and keys.budget_used(trials) >= cap:
                return None
            if self.config.stages:
                stage = next_stage(self.config.stages, self.config.space, trials)
                if stage is None or stage.waiting_for:  # an earlier stage's last trials still run: wait
                    return None
            fresh = self.storage.create_new_trial(self.study_id, keys.fresh_template(
                uuid.uuid4().hex, **({"user_attrs": stage.user_attrs(), "fixed_params": stage.fixed} if stage else {})))
        with warnings.catch_warnings():
            # ask-and-tell on a heartbeat storage: Optuna warns that heartbeats are meant for optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        tid = _trial_id(trial)
        self.heartbeat.add(tid, self.retry)
        self.retry(lambda: trial.set_user_attr(keys.ENV, self.env))
        ours = trial.number in waiting or tid == fresh
        if not ours or not self.gate.held():
            # another process took our queued trial (plain Optuna's ask pops WAITING trials too), or
            # the gate's connection died while we created it: recount before training it
            self.gate.reacquire()
            now = self.trials()
            if (cap is not None and keys.budget_used(now) > cap) or \
                    (self.config.stages and over_quota(self.config.stages, now, trial.number)):
                self.retry(lambda: trial.set_user_attr(keys.VOID, True))
                self.retry(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
                self.heartbeat.remove(tid)
                return None
        if tid == fresh:  # made from the fresh template just now: no lineage, nothing to resume
            return Lease(trial, None, False, fixed=stage.fixed if stage else None)
        by_number = {t.number: t for t in trials}
        frozen = by_number.get(trial.number)
        if frozen is None:  # queued after our read (by another worker's reconcile): read it now
            frozen = self.retry(lambda: self.storage.get_trial(tid))
            by_number = {t.number: t for t in self.trials()}
        resume = resume_point(frozen, by_number)
        retried = bool(keys.history(frozen))
        return Lease(trial, resume, retried, fixed=fixed_of(frozen))

    def has_room(self, trials: list[FrozenTrial]) -> bool:
        """The budget has room for another trial (and, in a staged study, a stage is not full)."""
        cap = self.budget()
        if cap is not None and keys.budget_used(trials) >= cap:
            return False
        return not self.config.stages or next_stage(self.config.stages, self.config.space, trials) is not None

    def budget(self) -> int | None:
        value = self.retry(lambda: self.storage.get_study_user_attrs(self.study_id)).get(keys.N_TRIALS)
        if value is None:
            value = self.config.n_trials
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def reconcile(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """With the gate held: void duplicate queue entries, fail orphans, add missing retry
        copies. Idempotent. Returns the study's trials after the changes."""
        changed = False
        seen: dict[str, int] = {}
        now = datetime.now()
        gone = keys.superseded(trials)
        for t in sorted(trials, key=lambda t: t.number):
            token = t.system_attrs.get(keys.QUEUED)
            if token is not None:
                if token in seen and t.state == TrialState.WAITING:  # a lost reply queued it twice
                    self._void(t)
                    changed = True
                    continue
                seen.setdefault(token, t.number)
            if (t.state == TrialState.RUNNING and token is not None and keys.ENV not in t.user_attrs
                    and t.datetime_start is not None and now - t.datetime_start > timedelta(seconds=self.grace)):
                # popped, then its worker died before the first heartbeat
                self._fail(t)
                changed = True
        if changed:
            trials = self.trials()
        for t in trials:
            if t.number not in gone and keys.needs_retry(t, self.max_retry):
                self.study.add_trial(keys.retry_template(t))
                changed = True
        return self.trials() if changed else trials

    def queue_retries(self) -> list[FrozenTrial]:
        """Reconcile with the gate held (see `reconcile`); the study's trials after it."""
        with self.gated():
            return self.retry(lambda: self.reconcile(self.trials()), recover=self.gate.reacquire)

    def _void(self, t: FrozenTrial) -> None:
        self.storage.set_trial_user_attr(_trial_id(t), keys.VOID, True)
        self.storage.set_trial_state_values(_trial_id(t), TrialState.FAIL)

    def _fail(self, t: FrozenTrial) -> None:
        try:
            self.storage.set_trial_state_values(_trial_id(t), TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    # -- one trial -----------------------------------------------------------------------------

    def run_one(self, lease: Lease) -> None:
        trial = lease.trial
        tid = _trial_id(trial)
        self.running[trial.number] = lease
        self.use_sampler(lease)
        try:
            try:
                outcome = self.objective.run(trial, lease.resume, lease.retried)
            except GracefulStop:
                self.retry(lambda: trial.set_user_attr(keys.INTERRUPTED, True))
                self.retry(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
                self.queue_retries()
                self.stop.interrupted.append(trial.number)
                self._finished(trial)
                return
            except KeyboardInterrupt:  # a second signal: abort now, still queue the trial to resume
                self.retry.once(lambda: trial.set_user_attr(keys.INTERRUPTED, True))
                self.retry.once(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
                self.retry.once(self.queue_retries)
                raise
            except optuna.exceptions.UpdateFinishedTrialError:
                self._taken_over(trial)
                return
            self.tell_outcome(trial, outcome)
        finally:
            self.heartbeat.remove(tid)
            self.running.pop(trial.number, None)

    def tell_outcome(self, trial: optuna.Trial, outcome: Any) -> None:
        """Record a finished trial's attrs and tell its state (objective.Outcome); then delete its
        checkpoint file and count it. A trial another worker failed meanwhile is left to its retry."""
        try:
            for key, value in outcome.attrs.items():
                self.retry(functools.partial(trial.set_user_attr, key, value))
        except optuna.exceptions.UpdateFinishedTrialError:
            self._taken_over(trial)
            return
        values = outcome.value if outcome.state == TrialState.COMPLETE else None
        told = self.retry(lambda: self.study.tell(trial, values, state=outcome.state, skip_if_finished=True))
        if told.state != outcome.state:
            self._taken_over(trial)
            return
        if outcome.checkpoint is not None and self.store is not None:
            self.store.remove(outcome.checkpoint)
        self.ran += 1
        self._finished(trial, told)

    def use_sampler(self, lease: Lease) -> None:
        """Sample `lease`'s trial with the study's sampler; a staged trial with `PartialFixedSampler(fixed,
        base)`, so the knobs its stage does not search are fixed and the base sampler models the rest
        (its relative sampling is lazy: it happens at the trial's first `suggest`, after this)."""
        self.study.sampler = self.sampler if lease.fixed is None else \
            optuna.samplers.PartialFixedSampler(lease.fixed, self.sampler)

    def _finished(self, trial: optuna.Trial, told: FrozenTrial | None = None) -> None:
        if told is None:
            told = self.retry(lambda: self.storage.get_trial(_trial_id(trial)))
        if told.user_attrs.get(keys.CHECKPOINT) or keys.history(told):
            self.cleanup()
        if self.on_trial is not None:
            self.on_trial(self.study, told)

    def _taken_over(self, trial: optuna.Trial) -> None:
        print(f"warning: trial {trial.number} was failed by another worker (no heartbeat within the grace "
              "period) and queued to resume; going on", file=sys.stderr, flush=True)

    # -- the end -------------------------------------------------------------------------------

    def await_stragglers(self, deadline: float | None) -> bool:
        """No trial to lease (the budget is used up, or a staged study's next stage waits for the
        last trials of the one before) but tuner trials still run elsewhere: wait until they finish,
        or go stale and are queued again. True when there is a WAITING trial to run, or when none
        runs any more and the budget has room (the next stage may start)."""
        while not self.stop.stop_requested:
            self.retry(lambda: optuna.storages.fail_stale_trials(self.study))
            live = self.queue_retries()
            if any(t.state == TrialState.WAITING for t in live):
                return True
            if not any(t.state == TrialState.RUNNING and keys.is_tuner_trial(t) for t in live):
                return self.has_room(live)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.stop.event.wait(min(float(self.interval), 2.0))
        return False

    def cleanup(self) -> None:
        if self.store is None:
            return
        try:
            cleanup(self.store, self.trials(), self.keep, self.max_retry)
        except OSError as exc:
            print(f"warning: checkpoint cleanup in {self.store.base_path}: {exc}", file=sys.stderr)


def run_worker(settings: Settings, study_name: str,
               on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
               objective_class: type | None = None, *, handle_signals: bool = True) -> int:
    """Join a study and run trials until its budget is used or the timeout passes. Returns the
    number of trials this worker ran. Raises faults.Interrupted after a signal."""
    import signal

    stop = StopController()
    if handle_signals:
        stop.install()
    worker = Worker(settings.storage, study_name, settings, stop, on_trial, objective_class)
    try:
        worker.open()
        return worker.run()
    except KeyboardInterrupt:
        if stop.signum is None:
            raise
        name = signal.Signals(stop.signum).name
        raise Interrupted(f"aborted by a second {name}: the running trial resumes from its last checkpoint "
                          "on the next `tuner sweep` or `tuner worker`", stop.signum) from None
    finally:
        stop.restore()
        worker.close()


__all__ = ["Lease", "Worker", "run_worker"]
