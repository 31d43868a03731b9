"""The sweep driver: create or continue a study, run workers, cap the trial count, summarise.

`n_trials` counts all trials of a study, across every worker and machine. Each worker asks for a
trial under a per-study lock held in the storage (see `storage.study_lock`), so the study ends
with exactly `n_trials` trials: no overshoot when several workers finish at once. A trial that
crashed and was queued again by the heartbeat's retry callback does not count twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig, config_from_stored
from .errors import ConfigError, TunerError
from .objective import Objective
from .registry import build_pruner, build_sampler
from .storage import display, open_storage, require_study, resolve_url, study_lock

ATTR_CONFIG = "tuner_config"  # the resolved study config (no storage URL, ever)
ATTR_TARGET = "tuner_n_trials"  # the current trial budget; workers read it
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class NoMoreTrials(Exception):
    """Raised from `ask` when the study's trial budget is used up: the worker stops."""


class CappedStudy(optuna.Study):
    """A Study whose `ask` refuses to create trials past the budget, atomically across workers."""

    def __init__(self, study_name: str, storage: optuna.storages.RDBStorage, url: str, cap: int | None,
                 sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self._cap = cap
        self._rdb = storage
        self._url = url

    def ask(self, fixed_distributions: Any = None) -> optuna.Trial:
        if self._cap is None:
            return super().ask(fixed_distributions)
        with study_lock(self._rdb, self._url, self.study_name):
            trials = self._storage.get_all_trials(self._study_id, deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and consumed(trials) >= self._cap:
                raise NoMoreTrials()
            return super().ask(fixed_distributions)


def consumed(trials: list[FrozenTrial]) -> int:
    """Trials that use up budget: all but FAILs that were queued again (their retry counts)."""
    retried = {t.system_attrs.get("failed_trial") for t in trials if "failed_trial" in t.system_attrs}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


# ---------------------------------------------------------------------------------------------
# Study creation and continuation
# ---------------------------------------------------------------------------------------------

def prepare_study(config: StudyConfig, url: str, n_trials: int | None) -> optuna.storages.RDBStorage:
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


def run_worker(url: str, study_name: str, opts: WorkerOptions,
               on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
               make_objective: Callable[[StudyConfig, Any], Callable] | None = None) -> int:
    """Join a study and run trials until its budget is used or the timeout passes.
    Returns the number of trials this worker ran."""
    from .data import load_dataset
    from .train import resolve_device

    probe = open_storage(url, must_exist=True)
    config = stored_config(probe, study_name)
    study_id = probe.get_study_id_from_name(study_name)
    cap = probe.get_study_user_attrs(study_id).get(ATTR_TARGET, config.n_trials)
    hb = config.heartbeat
    storage = open_storage(url, heartbeat_interval=opts.heartbeat_interval or hb.interval,
                           grace_period=hb.grace_period, max_retry=hb.max_retry)
    device = resolve_device(opts.device)
    t = config.training
    data = load_dataset(t.dataset, device, data_dir=opts.data_dir, val_fraction=t.val_fraction)
    offset = opts.worker_index if opts.worker_index is not None else random.SystemRandom().randrange(1, 2**20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = build_sampler(config.sampler.name, config.sampler.options, t.seed + offset)
    pruner = build_pruner(config.pruner.name, config.pruner.options, t.epochs)
    study = CappedStudy(study_name, storage, url, cap, sampler, pruner)
    objective = (make_objective or Objective)(config, data)
    ran = 0

    def callback(s: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        if on_trial is not None:
            on_trial(s, trial)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study.optimize(objective, timeout=opts.timeout, catch=(Exception,), callbacks=[callback],
                           gc_after_trial=False)
        except NoMoreTrials:
            pass
    return ran


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
    if study_name:
        config = replace(config, name=study_name)
    url = resolve_url(storage, config.storage)
    started = time.time()
    rdb = prepare_study(config, url, n_trials)
    if workers <= 1:
        ran = run_worker(url, config.name, replace(opts, worker_index=opts.worker_index or 0), on_trial=on_trial)
    else:
        ran = _run_processes(url, config.name, workers, opts, rdb, on_poll)
    return summarize(rdb, config.name, url, time.time() - started, ran)


def _run_processes(url: str, name: str, workers: int, opts: WorkerOptions, rdb: optuna.storages.RDBStorage,
                   on_poll: Callable[[list[FrozenTrial]], None] | None) -> int:
    """N `tuner worker` processes; the URL goes by environment, never on a command line (ps)."""
    gpus = _visible_gpus()
    procs = []
    for i in range(workers):
        env = {**os.environ, "TUNER_STORAGE": url}
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        cmd = [sys.executable, "-m", "tuner", "worker", "--study-name", name, "--device", opts.device,
               "--worker-index", str(i), "--quiet"]
        if opts.data_dir:
            cmd += ["--data-dir", str(opts.data_dir)]
        if opts.timeout:
            cmd += ["--timeout", str(opts.timeout)]
        if opts.heartbeat_interval:
            cmd += ["--heartbeat-interval", str(opts.heartbeat_interval)]
        procs.append(subprocess.Popen(cmd, env=env))
    study_id = rdb.get_study_id_from_name(name)
    try:
        while any(p.poll() is None for p in procs):
            if on_poll is not None:
                on_poll(rdb.get_all_trials(study_id, deepcopy=False))
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=120)
        raise
    if on_poll is not None:
        on_poll(rdb.get_all_trials(study_id, deepcopy=False))
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise TunerError(f"{len(bad)} of {workers} workers failed (exit codes {', '.join(map(str, bad))})")
    return -1  # counted from the storage by summarize


def _visible_gpus() -> list[str]:
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
