"""The sweep driver: create or continue a study, run workers, cap the trial count, summarise.

`n_trials` counts all trials of a study, across every worker and machine. The budget is checked in
the same database transaction that creates a trial, under a lock on the study (see
`storage.ResilientRDBStorage`), so the study ends with exactly `n_trials` trials: no overshoot
when several workers finish at once. A trial that crashed or was interrupted and was queued again
(a retry copy) does not count twice: the copy counts, the trial it replaces does not.

Workers survive faults (see faults.py, artifacts.py, storage.py): every trial checkpoints each
epoch into the study's artifact store; stale RUNNING trials of dead workers are failed and retried
from their checkpoints; SIGINT/SIGTERM stop at the next epoch boundary and queue the trial to
resume; storage operations retry through database restarts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .artifacts import Checkpointer, artifact_dir_for, check_keep, checkpoint_every, cleanup_checkpoints
from .config import StudyConfig, config_from_stored
from .errors import ConfigError, StorageError, TunerError
from .faults import Interrupted, Reaper, StopController, queue_retry, reap
from .objective import Objective, plain_train, record_failures
from .registry import build_pruner, build_sampler
from .resilient import CAP_ATTR, NoMoreTrials, ResilientRDBStorage, budget_used
from .storage import display, open_storage, require_study, resolve_url

ATTR_CONFIG = "tuner_config"  # the resolved study config (no storage URL, ever)
ATTR_TARGET = CAP_ATTR  # "tuner_n_trials": the current trial budget; workers read it
ATTR_CHECKPOINTS = "tuner_checkpoints"  # {"keep": "none" | "best"}: the study's checkpoint policy
ATTR_INTERRUPTED = "interrupted"  # trial user attr: stopped by a signal, queued to resume
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

__all__ = ["ATTR_CONFIG", "ATTR_TARGET", "CappedStudy", "NoMoreTrials", "SweepResult", "WorkerOptions", "consumed",
           "prepare_study", "run_sweep", "run_worker", "stored_config", "summarize"]


class CappedStudy(optuna.Study):
    """A Study that stops asking for trials once a stop signal came. The budget itself is enforced
    by the storage when it creates a trial (it raises NoMoreTrials)."""

    def __init__(self, study_name: str, storage: optuna.storages.RDBStorage,
                 sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
                 stop: StopController | None = None) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self._stop_control = stop

    def ask(self, fixed_distributions: Any = None) -> optuna.Trial:
        if self._stop_control is not None and self._stop_control.stop_requested:
            raise NoMoreTrials()
        return super().ask(fixed_distributions)


def consumed(trials: list[FrozenTrial]) -> int:
    """Trials that use up budget: all but those replaced by a retry copy (the copy counts)."""
    return budget_used((t.number, t.state, t.system_attrs.get("retry_history") or []) for t in trials)


# ---------------------------------------------------------------------------------------------
# Study creation and continuation
# ---------------------------------------------------------------------------------------------

def prepare_study(config: StudyConfig, url: str, n_trials: int | None, *,
                  keep_checkpoints: str | None = None) -> ResilientRDBStorage:
    """Create the study (storing its config) or check that a continued one has the same
    space, direction and budget. Sets the trial budget workers follow."""
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(config.name)
    except KeyError:
        study_id = None
    if study_id is not None:
        stored = storage.get_study_user_attrs(study_id).get(ATTR_CONFIG)
        if stored is None:
            raise ConfigError(f"study {config.name!r} exists but was not created by tuner; "
                              "pick another name with --study-name", key="name", file=config.source)
        old = config_from_stored(stored, config.name)
        changed = [k for k, v in config.fingerprint().items() if old.fingerprint()[k] != v]
        if changed:
            raise ConfigError(
                f"study {config.name!r} already exists with a different {', '.join(changed)}; "
                f"to start a new study, run again with --study-name {config.name}-v2 (or rename it in the file)",
                file=config.source, key=changed[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.create_study(storage=storage, study_name=config.name, direction=config.direction)
        study_id = storage.get_study_id_from_name(config.name)
        storage.set_study_user_attr(study_id, ATTR_CONFIG, config.to_dict())
    target = n_trials if n_trials is not None else config.n_trials
    storage.set_study_user_attr(study_id, ATTR_TARGET, target)
    if keep_checkpoints is not None:
        storage.set_study_user_attr(study_id, ATTR_CHECKPOINTS, {"keep": keep_checkpoints})
    return storage


def stored_config(storage: optuna.storages.BaseStorage, name: str) -> StudyConfig:
    study_id = require_study(storage, name)
    return config_from_stored(storage.get_study_user_attrs(study_id).get(ATTR_CONFIG), name)


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

@dataclass
class WorkerOptions:
    device: str = "auto"
    data_dir: str | None = None
    timeout: float | None = None
    heartbeat_interval: int | None = None
    worker_index: int | None = None  # seeds the sampler; None: a random offset (standalone workers)
    artifact_dir: str | None = None  # checkpoint store; None: env TUNER_ARTIFACT_DIR or beside the database
    keep_checkpoints: str | None = None  # none | best; None: the study's policy (default none)
    checkpoint_every: float | None = None  # seconds; None: env TUNER_CHECKPOINT_EVERY, else 60; 0: every epoch
    handle_signals: bool = True  # SIGINT/SIGTERM stop at the next epoch boundary (main thread only)


_OPENED: list[ResilientRDBStorage] = []  # the running worker's storage (run_worker is not reentrant)


def run_worker(url: str, study_name: str, opts: WorkerOptions,
               on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
               make_objective: Callable[[StudyConfig, Any], Callable] | None = None) -> int:
    """Join a study and run trials until its budget is used or the timeout passes.
    Returns the number of trials this worker ran. Raises faults.Interrupted after a signal."""
    stop = StopController()
    if opts.handle_signals:
        stop.install()
    try:
        return _work(url, study_name, opts, stop, on_trial, make_objective)
    except StorageError:
        raise
    except Exception:
        # Optuna's own error handling may hide a database that is gone (an UnboundLocalError in
        # its `finally`); report the database, in one line, when that is what happened.
        for storage in _OPENED:
            storage.check_alive()
        raise
    except KeyboardInterrupt:
        if stop.signum is None:
            raise
        name = signal.Signals(stop.signum).name
        raise Interrupted(f"aborted by a second {name}: the running trial resumes from its last checkpoint "
                          "on the next `tuner sweep` or `tuner worker`", stop.signum) from None
    finally:
        stop.restore()
        _OPENED.clear()


def _work(url: str, study_name: str, opts: WorkerOptions, stop: StopController,
          on_trial: Callable[[optuna.Study, FrozenTrial], None] | None,
          make_objective: Callable[[StudyConfig, Any], Callable] | None) -> int:
    from .data import load_dataset
    from .train import resolve_device

    check_keep(opts.keep_checkpoints)
    every = checkpoint_every(opts.checkpoint_every)  # a bad value fails before anything is opened
    probe = open_storage(url, must_exist=True)
    config = stored_config(probe, study_name)
    study_id = probe.get_study_id_from_name(study_name)
    attrs = probe.get_study_user_attrs(study_id)
    keep = opts.keep_checkpoints or (attrs.get(ATTR_CHECKPOINTS) or {}).get("keep") or "none"
    hb = config.heartbeat
    interval = opts.heartbeat_interval or hb.interval
    storage = open_storage(url, heartbeat_interval=interval, grace_period=hb.grace_period, max_retry=hb.max_retry,
                           cap_key=ATTR_TARGET, cap_default=config.n_trials, wal=True)
    _OPENED.append(storage)
    store_dir = artifact_dir_for(url, opts.artifact_dir)
    device = resolve_device(opts.device)
    t = config.training
    data = load_dataset(t.dataset, device, data_dir=opts.data_dir, val_fraction=t.val_fraction)
    offset = opts.worker_index if opts.worker_index is not None else random.SystemRandom().randrange(1, 2**20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = build_sampler(config.sampler.name, config.sampler.options, t.seed + offset)
    pruner = build_pruner(config.pruner.name, config.pruner.options, t.epochs)
    study = CappedStudy(study_name, storage, sampler, pruner, stop)

    def interrupted(trial: optuna.Trial) -> None:
        trial.set_user_attr(ATTR_INTERRUPTED, True)
        queue_retry(study, storage.get_trial(trial._trial_id), interrupted=True)
        stop.interrupted.append(trial.number)

    def aborted(trial: optuna.Trial) -> None:
        with storage.single_attempt():
            queue_retry(study, storage.get_trial(trial._trial_id), interrupted=True)

    checkpointer = Checkpointer(store_dir, stop=stop, every=every, keep=keep,
                                on_interrupt=interrupted, on_abort=aborted)
    objective = (make_objective or Objective)(config, data)
    if isinstance(objective, Objective) and objective.train_fn is plain_train:
        objective.train_fn = checkpointer
    objective = record_failures(objective)
    ran = 0

    def cleanup() -> None:
        try:
            cleanup_checkpoints(storage, study_id, store_dir, keep, trials=study.get_trials(deepcopy=False))
        except OSError as exc:
            print(f"warning: checkpoint cleanup in {store_dir}: {exc}", file=sys.stderr)

    def callback(s: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        # only a trial that left a checkpoint, or a retry (its predecessors' are no longer needed),
        # can make one deletable; the others skip the scan
        if checkpointer.uploaded or trial.system_attrs.get("retry_history"):
            cleanup()
        if on_trial is not None:
            on_trial(s, trial)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    deadline = None if not opts.timeout else time.monotonic() + opts.timeout
    taken_over: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        reap(study)  # trials of workers that died, including before their first heartbeat
        reaper = Reaper(study, interval).start()
        try:
            while not stop.stop_requested:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    study.optimize(objective, timeout=remaining, catch=(Exception,), callbacks=[callback],
                                   gc_after_trial=False)
                    break
                except NoMoreTrials:
                    if not _await_stragglers(study, storage, study_id, interval, stop, deadline):
                        break
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    # Optuna cannot tell a trial that another worker failed as stale under us
                    lost = checkpointer.current
                    if lost is None or lost.number in taken_over or \
                            storage.get_trial(lost._trial_id).state == TrialState.RUNNING:
                        raise
                    taken_over.add(lost.number)
                    print(f"warning: trial {lost.number} was failed by another worker (no heartbeat within the "
                          "grace period) and queued to resume; going on", file=sys.stderr, flush=True)
        finally:
            reaper.stop()
            checkpointer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleanup()
    stop.raise_if_stopped()
    return ran


def _await_stragglers(study: optuna.Study, storage: ResilientRDBStorage, study_id: int, interval: float,
                      stop: StopController, deadline: float | None) -> bool:
    """The budget is used up but trials are still RUNNING elsewhere: wait until they finish, or
    go stale and are queued again. True when there is a WAITING trial to run."""
    while not stop.stop_requested:
        reap(study)
        live = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if any(t.state == TrialState.WAITING for t in live):
            return True
        if not live or (deadline is not None and time.monotonic() >= deadline):
            return False
        stop.event.wait(min(float(interval), 2.0))
    return False


@dataclass
class SweepResult:
    study_name: str
    storage: str  # redacted
    wall_seconds: float
    counts: dict[str, int]
    best: FrozenTrial | None
    ran: int
    trials: list[FrozenTrial] = field(default_factory=list)


def run_sweep(config: StudyConfig, *, storage: str | None = None, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None, workers: int = 1,
              opts: WorkerOptions | None = None,
              on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
              on_poll: Callable[[list[FrozenTrial]], None] | None = None) -> SweepResult:
    """Run a sweep: in this process with one worker, or as `workers` local processes."""
    opts = opts or WorkerOptions()
    opts = replace(opts, timeout=timeout if timeout is not None else config.timeout)
    check_keep(opts.keep_checkpoints)
    checkpoint_every(opts.checkpoint_every)
    if study_name:
        config = replace(config, name=study_name)
    url = resolve_url(storage, config.storage)
    started = time.time()
    rdb = prepare_study(config, url, n_trials, keep_checkpoints=opts.keep_checkpoints)
    # Sampler seeds: study seed + worker index, offset by the trials already there, so a fresh
    # study is reproducible and a continued one does not re-sample its first points.
    base = len(rdb.get_all_trials(rdb.get_study_id_from_name(config.name), deepcopy=False))
    if workers <= 1:
        ran = run_worker(url, config.name, replace(opts, worker_index=base + (opts.worker_index or 0)),
                         on_trial=on_trial)
    else:
        ran = _run_processes(url, config.name, workers, replace(opts, worker_index=base), rdb, on_poll)
    return summarize(rdb, config.name, url, time.time() - started, ran)


def _run_processes(url: str, name: str, workers: int, opts: WorkerOptions, rdb: optuna.storages.RDBStorage,
                   on_poll: Callable[[list[FrozenTrial]], None] | None) -> int:
    """N `tuner worker` processes; the URL goes by environment, never on a command line (ps).

    Workers run in their own session, so a terminal's Ctrl-C reaches only this process, which
    forwards SIGINT/SIGTERM to them: once for a graceful stop, again to abort."""
    gpus = visible_gpus() if opts.device != "cpu" else []
    pinned = assign_gpus(workers, gpus)
    procs: list[subprocess.Popen] = []
    got: list[int] = []
    lock = threading.Lock()

    def forward(signum: int, _frame: Any) -> None:
        with lock:
            if not got:
                print(f"received {signal.Signals(signum).name}: workers stop after their current epoch "
                      "(send it again to abort)", file=sys.stderr, flush=True)
            got.append(signum)
            for p in procs:
                if p.poll() is None:
                    try:
                        p.send_signal(signum)
                    except ProcessLookupError:
                        pass

    old = {}
    if opts.handle_signals and threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(workers):
            if got:
                break
            env = {**os.environ, "TUNER_STORAGE": url}
            env.pop("TUNER_STORAGE_PASSWORD_FILE", None)  # the URL has the password already
            if pinned[i] is not None:
                env["CUDA_VISIBLE_DEVICES"] = pinned[i]
            if (opts.device == "cpu" or not gpus) and "OMP_NUM_THREADS" not in os.environ:
                # CPU workers share the cores: oversubscribed OpenMP threads spin and run ~10× slower
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
            cmd = [sys.executable, "-m", "tuner", "worker", "--study-name", name, "--device", opts.device,
                   "--worker-index", str((opts.worker_index or 0) + i), "--quiet"]
            if opts.data_dir:
                cmd += ["--data-dir", str(opts.data_dir)]
            if opts.timeout:
                cmd += ["--timeout", str(opts.timeout)]
            if opts.heartbeat_interval:
                cmd += ["--heartbeat-interval", str(opts.heartbeat_interval)]
            cmd += ["--artifact-dir", str(Path(artifact_dir_for(url, opts.artifact_dir)).resolve())]
            if opts.keep_checkpoints:
                cmd += ["--keep-checkpoints", opts.keep_checkpoints]
            if opts.checkpoint_every is not None:
                cmd += ["--checkpoint-every", repr(float(opts.checkpoint_every))]
            with lock:
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        study_id = rdb.get_study_id_from_name(name)
        while any(p.poll() is None for p in procs):
            if on_poll is not None:
                on_poll(rdb.get_all_trials(study_id, deepcopy=False))
            time.sleep(1.0)
        if on_poll is not None:
            on_poll(rdb.get_all_trials(study_id, deepcopy=False))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        signum = got[0]
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}: the workers' running trials resume from "
                          "their checkpoints on the next `tuner sweep` or `tuner worker`", signum)
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise TunerError(f"{len(bad)} of {workers} workers failed (exit codes {', '.join(map(str, bad))})")
    return -1  # counted from the storage by summarize


def assign_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The GPU each local worker is pinned to: round-robin, so `--workers-per-gpu K` puts K on each.
    With one GPU or none, workers are not pinned (None: they see what the parent sees)."""
    if len(gpus) <= 1:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def summarize(storage: optuna.storages.BaseStorage, name: str, url: str, wall: float, ran: int) -> SweepResult:
    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: t.value) if complete else None
    return SweepResult(study_name=name, storage=display(url), wall_seconds=wall, counts=counts, best=best,
                       ran=ran if ran >= 0 else len(trials), trials=list(trials))
