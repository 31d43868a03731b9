"""A worker process: join a study, then lease, train and tell trials until the budget is used, the
timeout passes or a signal comes.

    manager = open_lease_manager(...)        # lease.py: storage, gate, sampler, pruner, heartbeat
    engine = SingleEngine(data) or Pack(data, K, training)    # `pack` setting: K trials at once
    run_trials(ctx, engine, deadline):
        while the budget has trials or the engine still trains:
            fill the engine's free slots: lease -> TrialRunner(...).start()
            engine.run_epoch()               # one epoch of every trial in it, each its own epoch
            runner.after_epoch(out) for each # checkpoint, report, prune, tell (runner.py)
        a stop signal: every trial still training is interrupted at this epoch boundary

The same loop drives one trial at a time and K in a pack: only the engine differs. **The
timeout** counts from the worker's start, data loading included.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from tuner.engine.faults import Interrupted, StopController
from tuner.engine.lease import LeaseManager, OnTrial, open_lease_manager
from tuner.engine.runner import RunContext, TrialRunner
from tuner.errors import StorageError
from tuner.packing.runtime import Pack
from tuner.packing.sizing import pack_size
from tuner.storage.artifacts import CheckpointPolicy
from tuner.study.settings import Settings
from tuner.training.data import DeviceData, load_dataset
from tuner.training.models import is_reference, resolve_reference
from tuner.training.train import EpochEngine, SingleEngine, resolve_device

EngineFactory = Callable[[DeviceData, LeaseManager, Settings], EpochEngine]


def environment(device: Any, worker: str | None = None) -> dict[str, str]:
    """What a trial ran on: device, torch and Optuna versions, host and process id (and the worker's id)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env = {"device": str(device), "device_name": name, "torch": torch.__version__,
           "optuna": optuna.__version__, "host": platform.node(),
           "pid": str(os.getpid())}
    if worker:
        env["worker"] = worker
    return env


def make_engine(data: DeviceData, manager: LeaseManager, settings: Settings) -> EpochEngine:
    """A Pack of K trials when the resolved pack setting (the flag, else the study's `training.pack`,
    else auto) gives K > 1; else the one-trial engine."""
    config = manager.config
    setting = settings.pack
    size, why = pack_size(setting, config.training, data)
    if size > 1:
        print(f"note: {why} (trials trained at once by this worker)", file=sys.stderr, flush=True)
        return Pack(data, size, config.training)
    if setting not in (1, "auto"):
        print(f"note: pack {setting}: {why}; trials run one at a time", file=sys.stderr, flush=True)
    return SingleEngine(data)


def run_trials(ctx: RunContext, engine: EpochEngine, deadline: float | None) -> None:
    """Keep `engine` full of leased trials and train them an epoch at a time, until the budget is
    used (and no straggler elsewhere may still need a retry), the deadline passes or a stop comes."""
    m, stop = ctx.manager, ctx.manager.stop
    runners: dict[int, TrialRunner] = {}

    def leasing() -> bool:
        return not stop.stop_requested and (deadline is None or time.monotonic() < deadline)

    try:
        while True:
            while leasing() and engine.free > 0:
                lease = m.lease()
                if lease is None:
                    break
                runner = TrialRunner(ctx, lease, engine)
                if runner.start():
                    runners[runner.number] = runner
            if not runners:
                if leasing() and m.await_stragglers(deadline):  # others' trials may still need retries
                    continue
                break
            try:
                results = engine.run_epoch()
            except Exception as exc:  # noqa: BLE001 - the trials fail, the sweep goes on
                if isinstance(exc, StorageError):
                    raise
                for runner in runners.values():
                    runner.fail(exc)
                runners.clear()
                continue
            for key, out in results.items():
                runner = runners.get(key)  # type: ignore[call-overload]
                if runner is not None and runner.after_epoch(out):
                    del runners[runner.number]
            if stop.stop_requested and runners:
                for runner in runners.values():
                    runner.interrupt()
                runners.clear()
                m.queue_retries()
    except KeyboardInterrupt:  # a second signal: abort now, still queue the trials to resume
        for runner in runners.values():
            runner.abort()
        m.retry.once(m.queue_retries)
        raise
    finally:
        for runner in runners.values():
            runner.release()


def run_worker(settings: Settings, study_name: str, on_trial: OnTrial | None = None, *,
               make_engine: EngineFactory = make_engine, handle_signals: bool = True) -> int:
    """Join a study and run trials until its budget is used or the timeout passes. Returns the
    number of trials this worker ran to their tell. Raises faults.Interrupted after a signal.
    `settings` (settings.resolve) is completed from the stored study here (`with_study`)."""
    began = time.monotonic()
    stop = StopController()
    tmp = Path(tempfile.mkdtemp(prefix="tuner-ckpt-"))
    try:
        device = resolve_device(settings.device)
        env = environment(device, worker=uuid.uuid4().hex[:12])
        with open_lease_manager(settings, study_name, stop, env, on_trial) as manager:
            settings = manager.settings
            t = manager.config.training
            if is_reference(t.model):  # imported the same way as when the file was loaded; failing here: exit 1
                resolve_reference(t.model)
            data = load_dataset(t.dataset, device, data_dir=settings.data_dir, val_fraction=t.val_fraction,
                                image_size=t.image_size)
            deadline = began + settings.timeout if settings.timeout else None
            ctx = RunContext(manager, data, CheckpointPolicy(settings.checkpoint_every, settings.keep_checkpoints,
                                                             stop), tmp)
            if handle_signals:  # from here a signal stops at an epoch boundary; before, it aborts at once
                stop.install()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                run_trials(ctx, make_engine(data, manager, settings), deadline)
            manager.cleanup()
            stop.raise_if_stopped()
            return manager.told
    except KeyboardInterrupt:
        if stop.signum is None:
            raise
        name = signal.Signals(stop.signum).name
        raise Interrupted(f"aborted by a second {name}: the running trial resumes from its last checkpoint "
                          "on the next `tuner sweep` or `tuner worker`", stop.signum) from None
    finally:
        stop.restore()
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["environment", "make_engine", "run_trials", "run_worker"]
