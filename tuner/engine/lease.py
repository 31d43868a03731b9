"""The lease manager: everything a worker asks of the study database, on Optuna's public API.

    with gate:                        # one holder per study, across processes and machines
        fail_stale_trials(study)      # Optuna's heartbeat rule (at most once per heartbeat interval)
        reconcile(trials)             # orphans, duplicate queue entries, retry copies
        if no WAITING trial and the budget allows: study.add_trial(<WAITING, tuner_queued token>)
        trial = study.ask()           # pops the oldest WAITING trial: retries first
        heartbeat(trial), env attr    # from here Optuna's stale rule covers the trial
    ... the trial runs (runner.py) ...
    tell(trial, outcome)              # attrs, study.tell, the finished trial's checkpoint file

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

**A set of running trials.** A loop leases trials into the set that the heartbeat thread beats
for: one at a time, or K with trial packing (`--pack K`).

`open_lease_manager` builds a complete manager (storage, gate, sampler, pruner, checkpoint store,
heartbeat thread); nothing is added to it afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.engine import pbt
from tuner.engine.faults import StopController
from tuner.engine.gate import Gate
from tuner.engine.stages import fixed_of, next_stage, over_quota
from tuner.storage import keys
from tuner.storage._optuna import trial_id as _trial_id
from tuner.storage.artifacts import CheckpointBackend, cleanup, open_store, resume_point
from tuner.storage.database import Retry, open_storage, require_study
from tuner.study.config import StudyConfig, config_from_stored
from tuner.study.registry import build_pruner, build_sampler
from tuner.study.settings import Settings

OnTrial = Callable[[optuna.Study, FrozenTrial], None]


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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass
class Lease:
    """A trial this worker runs: the Optuna trial, and where it resumes from."""

    trial: optuna.Trial
    resume: tuple[int, dict[str, Any]] | None = None
    retried: bool = False
    fixed: dict[str, Any] | None = None  # a staged trial: the values its stage fixes (stages.py)
    until: int | None = None  # a PBT segment that is not its member's last: it ends after this epoch (pbt.py)


class LeaseManager:
    """One worker's side of the study database: leases trials under the budget gate, tells them,
    waits for stragglers, cleans up checkpoints. Built complete by `open_lease_manager`."""

    def __init__(self, *, study_name: str, study_id: int, config: StudyConfig, settings: Settings, storage: Any,
                 retry: Retry, gate: Gate, study: optuna.Study, sampler: optuna.samplers.BaseSampler,
                 store: CheckpointBackend, env: dict[str, str], stop: StopController,
                 on_trial: OnTrial | None) -> None:
        self.study_name = study_name
        self.study_id = study_id
        self.config = config
        self.settings = settings  # complete: flags, environment, the stored study
        self.storage = storage
        self.retry = retry
        self.gate = gate
        self.study = study
        self.sampler = sampler  # the base sampler; a staged trial runs with PartialFixedSampler around it
        self.store = store
        self.env = env
        self.stop = stop
        self.on_trial = on_trial
        self.heartbeat = Heartbeat(storage, settings.heartbeat_interval)
        self.grace = int(storage.grace_period or settings.grace_period)  # the study's (see _join)
        self.told = 0  # trials this worker ran to their tell
        self.stale_checked = float("-inf")  # time.monotonic() of the last fail_stale_trials in a lease

    def __enter__(self) -> LeaseManager:
        self.heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.heartbeat.stop()
        self.gate.close()
        self.storage.engine.dispose()

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

    # -- leasing -------------------------------------------------------------------------------

    def lease(self) -> Lease | None:
        """Queue and pop one trial with the gate held; None when the budget is used up."""
        with self.gated():
            return self.retry(self._lease, recover=self.gate.reacquire)

    def _lease(self) -> Lease | None:
        if time.monotonic() - self.stale_checked >= self.settings.heartbeat_interval:
            # a trial goes stale only after the grace period (>= one heartbeat interval), so a check per
            # interval finds it at most one interval late; one per lease was a query per trial
            self.refresh_grace()
            optuna.storages.fail_stale_trials(self.study)
            self.stale_checked = time.monotonic()
        cap = self.budget()
        trials = self.reconcile(self.trials(), cap)
        waiting = {t.number for t in trials if t.state == TrialState.WAITING}
        fresh = None
        stage = None
        segment = None
        if not waiting:
            if cap is not None and keys.budget_used(trials) >= cap:
                return None
            made: dict[str, Any] = {}
            if self.config.stages:
                stage = next_stage(self.config.stages, self.config.space, trials)
                if stage is None or stage.waiting_for:  # an earlier stage's last trials still run: wait
                    return None
                made = {"user_attrs": stage.user_attrs(), "fixed_params": stage.fixed}
            elif self.config.population is not None:
                segment = pbt.plan(self.config, trials)
                if segment is None:  # every member still trains its segment (or all segments exist): wait
                    return None
                made = {"user_attrs": segment.user_attrs, "fixed_params": segment.fixed}
            fresh = self.storage.create_new_trial(self.study_id, keys.fresh_template(uuid.uuid4().hex, **made))
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
        by_number = {t.number: t for t in trials}
        if tid == fresh:  # made from the fresh template just now: nothing to resume, but a PBT segment's parent
            start = None
            if segment is not None and segment.parent is not None:
                ck = by_number[segment.parent].user_attrs.get(keys.CHECKPOINT)
                start = (segment.parent, ck) if isinstance(ck, dict) else None
            return Lease(trial, start, False, fixed=stage.fixed if stage else None,
                         until=self.segment_end(segment.user_attrs if segment else {}))
        frozen = by_number.get(trial.number)
        if frozen is None:  # queued after our read (by another worker's reconcile): read it now
            frozen = self.retry(lambda: self.storage.get_trial(tid))
            by_number = {t.number: t for t in self.trials()}
        resume = resume_point(frozen, by_number)
        retried = bool(keys.history(frozen))
        return Lease(trial, resume, retried, fixed=fixed_of(frozen), until=self.segment_end(frozen.user_attrs))

    def segment_end(self, user_attrs: dict[str, Any]) -> int | None:
        """The last epoch of a PBT segment that is not its member's last (None otherwise)."""
        span = user_attrs.get(keys.PBT_EPOCHS)
        if not isinstance(span, list) or len(span) != 2:
            return None
        end = int(span[1])
        return end if end < self.config.training.epochs else None

    def refresh_grace(self) -> None:
        """The study's grace period as it stands now: a worker that joined since may have raised it."""
        grace = self.retry(lambda: self.storage.get_study_user_attrs(self.study_id)).get(keys.GRACE)
        if isinstance(grace, int) and not isinstance(grace, bool) and grace > 0:
            self.grace = grace
            self.storage.grace_period = grace  # RDBStorage's public attribute, read by fail_stale_trials

    def has_room(self, trials: list[FrozenTrial]) -> bool:
        """The budget has room for another trial (in a staged study, a stage is not full; in a
        population-based one, a segment can start now)."""
        cap = self.budget()
        if cap is not None and keys.budget_used(trials) >= cap:
            return False
        if self.config.population is not None:
            return pbt.plan(self.config, trials) is not None
        return not self.config.stages or next_stage(self.config.stages, self.config.space, trials) is not None

    def budget(self) -> int | None:
        value = self.retry(lambda: self.storage.get_study_user_attrs(self.study_id)).get(keys.N_TRIALS)
        if value is None:
            value = self.config.n_trials
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def reconcile(self, trials: list[FrozenTrial], cap: int | None = None) -> list[FrozenTrial]:
        """With the gate held: void duplicate queue entries, fail orphans, add missing retry
        copies. Idempotent. Returns the study's trials after the changes."""
        changed = False
        seen: dict[str, int] = {}
        now = datetime.now()
        grace = timedelta(seconds=self.grace)
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
                    and t.datetime_start is not None and now - t.datetime_start > grace):
                # popped, then its worker died before the first heartbeat
                self._fail(t)
                changed = True
        cap = self.budget() if cap is None else cap
        surplus = keys.budget_used(trials) - cap if cap is not None else 0
        if surplus > 0:  # queued past the budget (configs enqueued by hand, a budget lowered): void the newest
            extra = [t for t in sorted(trials, key=lambda t: -t.number)
                     if t.state == TrialState.WAITING and not keys.history(t) and not t.user_attrs.get(keys.VOID)]
            for t in extra[:surplus]:
                self._void(t)
                changed = True
        if changed:
            trials = self.trials()
        for t in trials:
            if t.number not in gone and keys.needs_retry(t, self.settings.max_retry):
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

    # -- telling ------------------------------------------------------------------------------

    def tell(self, trial: optuna.Trial, outcome: Any) -> None:
        """Record a finished trial's attrs and tell its state (runner.Outcome); then delete its
        checkpoint file and count it. A trial another worker failed meanwhile is left to its retry."""
        try:
            for key, value in outcome.attrs.items():
                self.retry(functools.partial(trial.set_user_attr, key, value))
        except optuna.exceptions.UpdateFinishedTrialError:
            self.taken_over(trial)
            return
        values = outcome.value if outcome.state == TrialState.COMPLETE else None
        told = self.retry(lambda: self.study.tell(trial, values, state=outcome.state, skip_if_finished=True))
        if told.state != outcome.state:
            self.taken_over(trial)
            return
        if outcome.checkpoint is not None:
            self.store.remove(outcome.checkpoint)
        self.told += 1
        self.finished(trial, told)

    def interrupt(self, trial: optuna.Trial) -> None:
        """A trial stopped by a signal at an epoch boundary (its checkpoint written): mark it
        `interrupted` and tell it FAIL; `queue_retries` then makes its retry copy, which resumes it."""
        self.retry(functools.partial(trial.set_user_attr, keys.INTERRUPTED, True))
        self.retry(functools.partial(self.study.tell, trial, state=TrialState.FAIL, skip_if_finished=True))
        self.stop.interrupted.append(trial.number)
        self.finished(trial)

    def abort(self, trial: optuna.Trial) -> None:
        """A second signal: the same as `interrupt`, one try each (the process is going down)."""
        self.retry.once(functools.partial(trial.set_user_attr, keys.INTERRUPTED, True))
        self.retry.once(functools.partial(self.study.tell, trial, state=TrialState.FAIL, skip_if_finished=True))

    def release(self, trial: optuna.Trial) -> None:
        """The trial leaves the running set: no more heartbeats for it."""
        self.heartbeat.remove(_trial_id(trial))

    def use_sampler(self, lease: Lease) -> None:
        """Sample `lease`'s trial with the study's sampler; a staged trial with `PartialFixedSampler(fixed,
        base)`, so the knobs its stage does not search are fixed and the base sampler models the rest
        (its relative sampling is lazy: it happens at the trial's first `suggest`, after this)."""
        self.study.sampler = self.sampler if lease.fixed is None else \
            optuna.samplers.PartialFixedSampler(lease.fixed, self.sampler)

    def finished(self, trial: optuna.Trial, told: FrozenTrial | None = None) -> None:
        if told is None:
            told = self.retry(lambda: self.storage.get_trial(_trial_id(trial)))
        if told.user_attrs.get(keys.CHECKPOINT) or keys.history(told):
            self.cleanup()
        if self.on_trial is not None:
            self.on_trial(self.study, told)

    def taken_over(self, trial: optuna.Trial) -> None:
        print(f"warning: trial {trial.number} was failed by another worker (no heartbeat within the grace "
              "period) and queued to resume; going on", file=sys.stderr, flush=True)

    # -- the end -------------------------------------------------------------------------------

    def await_stragglers(self, deadline: float | None) -> bool:
        """No trial to lease (the budget is used up, or a staged study's next stage waits for the
        last trials of the one before) but tuner trials still run elsewhere: wait until they finish,
        or go stale and are queued again. True when there is a WAITING trial to run, or when none
        runs any more and the budget has room (the next stage may start)."""
        while not self.stop.stop_requested:
            self.refresh_grace()
            self.retry(lambda: optuna.storages.fail_stale_trials(self.study))
            live = self.queue_retries()
            if any(t.state == TrialState.WAITING for t in live):
                return True
            if self.config.population is not None and self.has_room(live):
                return True  # a member ended its segment: its next one can start while others still train
            if not any(t.state == TrialState.RUNNING and keys.is_tuner_trial(t) for t in live):
                return self.has_room(live)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.stop.event.wait(min(float(self.settings.heartbeat_interval), 2.0))
        return False

    def cleanup(self) -> None:
        try:
            trials = self.trials()
            cleanup(self.store, trials, self.settings.keep_checkpoints, self.settings.max_retry,
                    also=pbt.needed_checkpoints(self.config, trials))
        except OSError as exc:
            print(f"warning: checkpoint cleanup in {self.store.location}: {exc}", file=sys.stderr)


SEED_STRIDE = 1_000_003  # sampler seed = study seed + worker index + SEED_STRIDE × (processes joined before)


def _join(storage: Any, study_id: int, gate: Gate, s: Settings) -> tuple[int, int]:
    """Register a worker process with the study, under the gate: (processes joined before it, the
    study's grace period). The grace period is the study's, the same for every worker: at least the
    configured one and twice every joined worker's heartbeat interval, so a worker that beats
    rarely is never judged stale by one that expects beats often."""
    with gate:
        attrs = storage.get_study_user_attrs(study_id)
        joined = int(attrs.get(keys.JOINED) or 0)
        grace = max(int(attrs.get(keys.GRACE) or 0), s.grace_period, 2 * s.heartbeat_interval)
        storage.set_study_user_attr(study_id, keys.JOINED, joined + 1)
        if grace != attrs.get(keys.GRACE):
            storage.set_study_user_attr(study_id, keys.GRACE, grace)
    return joined, grace


def open_lease_manager(settings: Settings, study_name: str, stop: StopController, env: dict[str, str],
                       on_trial: OnTrial | None = None) -> LeaseManager:
    """A complete lease manager for `study_name`: its stored config, the settings completed from it
    (`Settings.with_study`), a heartbeat storage, the gate, the sampler (seeded by the worker's index)
    and pruner, the checkpoint store. Enter it (`with`) to start the heartbeat thread."""
    url = settings.storage
    probe = open_storage(url, must_exist=True)
    study_id = require_study(probe, study_name)
    attrs = probe.get_study_user_attrs(study_id)
    probe.engine.dispose()
    config = config_from_stored(attrs.get(keys.CONFIG), study_name)
    s = settings.with_study(config, attrs)
    storage = open_storage(url, heartbeat_interval=s.heartbeat_interval, grace_period=s.grace_period,
                           wal=s.sqlite_wal)
    t = config.training
    gate = Gate(url, study_id)
    retry = Retry(url.shown, s.retry_seconds)
    joined, grace = retry(functools.partial(_join, storage, study_id, gate, s))
    storage.grace_period = grace  # RDBStorage's public attribute: the study's rule, not this worker's
    # every process that joins gets its own sampler seed: two sweeps or machines never sample alike,
    # and a fresh study's first worker is reproducible (study seed + worker index)
    offset = (s.worker_index or 0) + SEED_STRIDE * joined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = build_sampler(config.sampler.name, config.sampler.options, t.seed + offset)
    pruner = build_pruner(config.pruner.name, config.pruner.options, t.epochs)
    study = optuna.Study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    return LeaseManager(
        study_name=study_name, study_id=study_id, config=config, settings=s, storage=storage,
        retry=retry, gate=gate, study=study, sampler=sampler,
        store=open_store(s.artifact_dir, s.artifact_store), env=env, stop=stop, on_trial=on_trial)


__all__ = ["Heartbeat", "Lease", "LeaseManager", "open_lease_manager"]
