"""The sweep driver: create or continue a study, run workers (in this process or as local
processes), summarise. The trial loop itself is in worker.py.

`n_trials` counts all trials of a study, across every worker and machine, and is exact (see
worker.py). A trial that crashed or was interrupted and was queued again (a retry copy) does not
count twice: the copy counts, the trial it replaces does not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner.engine import pbt
from tuner.engine.faults import Interrupted
from tuner.engine.gate import Gate
from tuner.engine.stages import check_flags
from tuner.engine.warmstart import WarmStart, enqueue, load_sources
from tuner.errors import ConfigError, TunerError
from tuner.storage import keys
from tuner.storage.database import Retry, StorageURL, open_storage, require_study
from tuner.study.config import StudyConfig, config_from_stored
from tuner.study.settings import Flags, Settings, child_env, resolve, visible_gpus_env

__all__ = ["Flags", "Launch", "Settings", "SweepResult", "WarmStart", "assign_gpus", "parse_nvidia_smi",
           "parse_visible", "plan_workers", "prepare_study", "run_sweep", "run_worker_processes",
           "stored_config", "summarize", "visible_gpus", "worker_gpus", "worker_processes"]


# ---------------------------------------------------------------------------------------------
# Study creation and continuation
# ---------------------------------------------------------------------------------------------

def prepare_study(config: StudyConfig, url: str | StorageURL, n_trials: int | None, *,
                  keep_checkpoints: str | None = None, warm_start: WarmStart | None = None) -> Any:
    """Create the study (storing its config) or check that a continued one has the same space,
    direction and budget, then store the file's config and the trial budget workers follow.

    The budget: `n_trials` when given; else, for a continued study, the larger of the stored
    budget and the file's (a budget raised with --n-trials is not lowered by a plain re-run).
    A study that exists with no tuner config, no trials and no attrs (a `tuner sweep` killed
    between creating it and writing its config) is adopted.

    `warm_start`: the source studies are read first (a missing one: ConfigError, nothing written);
    their top configs are queued as the first trials of a study that has no trial yet and was never
    warm-started (warmstart.py); a continued study is not warm-started again.

    A staged study (`stages:`) refuses `n_trials` other than its stages' sum and a warm start
    (stages.check_flags), before anything is written."""
    check_flags(config.stages, config.source, n_trials=n_trials, warm_start=warm_start)
    pbt.check_flags(config, n_trials=n_trials, warm_start=warm_start)
    target = StorageURL.parse(url)
    picks = None
    if warm_start is not None:
            picks = load_sources(warm_start, target)  # read-only, before anything is written
    storage = open_storage(target)
    try:
        sid: int | None = storage.get_study_id_from_name(config.name)
    except KeyError:
        sid = None
    stored_budget = None
    if sid is not None:
        attrs = storage.get_study_user_attrs(sid)
        stored = attrs.get(keys.CONFIG)
        if stored is None:
            empty = not attrs and not storage.get_all_trials(sid, deepcopy=False)
            directions = storage.get_study_directions(sid)
            if not empty or [d.name.lower() for d in directions] != [config.direction]:
                raise ConfigError(f"study {config.name!r} exists but was not created by tuner; "
                                  "pick another name with --study-name", key="name", file=config.source)
        else:
            old = config_from_stored(stored, config.name)
            changed = [k for k, v in config.fingerprint().items() if old.fingerprint()[k] != v]
            if changed:
                raise ConfigError(
                    f"study {config.name!r} already exists with a different {', '.join(changed)}; to start a new "
                    f"study, run again with --study-name {config.name}-v2 (or rename it in the file)",
                    file=config.source, key=changed[0])
        stored_budget = attrs.get(keys.N_TRIALS)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.create_study(storage=storage, study_name=config.name,
                                direction=StudyDirection[config.direction.upper()], load_if_exists=True)
        sid = storage.get_study_id_from_name(config.name)
    storage.set_study_user_attr(sid, keys.CONFIG, config.to_dict())
    budget = n_trials
    if budget is None:
        budget = config.n_trials
        if isinstance(stored_budget, int) and (budget is None or stored_budget > budget):
            budget = stored_budget
    storage.set_study_user_attr(sid, keys.N_TRIALS, budget)
    if keep_checkpoints is not None:
        storage.set_study_user_attr(sid, keys.CHECKPOINTS, {"keep": keep_checkpoints})
    if warm_start is not None and picks is not None:
        _warm_start(storage, target, sid, config, budget, warm_start, picks)
    return storage


def _warm_start(storage: Any, url: StorageURL, sid: int, config: StudyConfig, budget: int | None, ws: WarmStart,
                picks: list[Any]) -> None:
    """Queue the warm start's configs with the study's budget gate held (gate.py): two sweeps
    warm-starting one study at once queue them once (the second finds the first's marker), and no
    worker leases meanwhile."""
    gate = Gate(url, sid)
    try:
        with gate:
            enqueue(storage, sid, picks, config.space, budget, ws.labels, ws.say)  # also completes an interrupted one
    finally:
        gate.close()


def stored_config(storage: Any, name: str) -> StudyConfig:
    sid = require_study(storage, name)
    return config_from_stored(storage.get_study_user_attrs(sid).get(keys.CONFIG), name)


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    study_name: str
    storage: str  # redacted
    wall_seconds: float
    counts: dict[str, int]
    best: FrozenTrial | None
    ran: int
    trials: list[FrozenTrial] = field(default_factory=list)


def run_sweep(config: StudyConfig, settings: Settings | Flags | None = None, *, study_name: str | None = None,
              n_trials: int | None = None, workers: int = 1, handle_signals: bool = True,
              on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
              on_poll: Callable[[list[FrozenTrial]], None] | None = None,
              on_start: Callable[[list[FrozenTrial], int | None], None] | None = None,
              warm_start: WarmStart | None = None) -> SweepResult:
    """Run a sweep: in this process with one worker, or as `workers` local processes (which get
    `settings` as they are, settings.child_env). `settings`: resolved (settings.resolve with this
    study's config), or the `Flags` to resolve here against this process's environment and `config`.
    `on_start(trials, budget)` sees the study's trials and trial budget before any worker starts (a
    continued study's progress starts from them)."""
    if study_name:
        config = replace(config, name=study_name)
    if not isinstance(settings, Settings):
        settings = resolve(settings, study=config)
    url = settings.storage
    started = time.time()
    rdb = prepare_study(config, url, n_trials, keep_checkpoints=settings.given.keep_checkpoints,
                        warm_start=warm_start)
    sid = require_study(rdb, config.name)
    before = rdb.get_all_trials(sid, deepcopy=False)
    if on_start is not None:
        on_start(before, rdb.get_study_user_attrs(sid).get(keys.N_TRIALS))
    # Sampler seeds: study seed + worker index + a stride per process that joined the study before
    # (lease.open_lease_manager): a fresh study is reproducible, and a continued one or a second
    # sweep on it does not re-sample the same points.
    seeded = settings
    if workers <= 1:
        from tuner.engine.worker import run_worker  # torch: not for a supervisor of worker processes

        ran = run_worker(seeded, config.name, on_trial=on_trial, handle_signals=handle_signals)
    else:
        ran = _run_processes(seeded, config.name, workers, rdb, on_poll, handle_signals)
    retry = Retry(url.shown, settings.retry_seconds)
    result = retry(lambda: summarize(rdb, config.name, url, time.time() - started, ran))
    _publish(rdb, config.name, result.trials)  # the trials just read: not read again
    return result


def _publish(storage: Any, name: str, trials: list[FrozenTrial] | None = None) -> None:
    """The dashboard's metric name, study note and tuner's panels (best effort)."""
    try:
        from tuner.insight.dashboard import publish  # optuna-dashboard: only once a sweep has finished
    except ImportError:
        return
    try:
        publish(storage, name, trials)
    except Exception as exc:  # noqa: BLE001 - the sweep is done; the dashboard extras are not essential
        print(f"warning: dashboard panels not written: {exc}", file=sys.stderr)


def run_worker_processes(settings: Settings, name: str, workers: int, *, handle_signals: bool = True,
                         on_poll: Callable[[list[FrozenTrial]], None] | None = None,
                         on_start: Callable[[list[FrozenTrial], int | None], None] | None = None) -> SweepResult:
    """`tuner worker --workers-per-gpu K`: `workers` local `tuner worker` processes on an existing
    study, pinned to GPUs as `plan_workers` says, until its budget is used; then the study's summary.
    The study must exist (exit 2 otherwise: no process is started)."""
    target = settings.storage
    started = time.time()
    rdb = open_storage(target, must_exist=True)
    sid = require_study(rdb, name)
    retry = Retry(target.shown, settings.retry_seconds)
    if on_start is not None:
        before = retry(lambda: rdb.get_all_trials(sid, deepcopy=False))
        on_start(before, retry(lambda: rdb.get_study_user_attrs(sid)).get(keys.N_TRIALS))
    ran = _run_processes(settings, name, workers, rdb, on_poll, handle_signals)
    result = retry(lambda: summarize(rdb, name, target, time.time() - started, ran))
    _publish(rdb, name, result.trials)
    return result


def _run_processes(settings: Settings, name: str, workers: int, rdb: Any,
                   on_poll: Callable[[list[FrozenTrial]], None] | None, handle_signals: bool) -> int:
    """N `tuner worker` processes, given `settings` by environment (with the URL: never on a command
    line, ps).

    Workers run in their own session, so a terminal's Ctrl-C reaches only this process, which
    forwards SIGINT/SIGTERM to them: once for a graceful stop, again to abort."""
    url = settings.storage
    gpus = visible_gpus() if settings.device != "cpu" else []
    launches = worker_processes(settings, name, workers, gpus, cpus=os.cpu_count() or 1)
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
    if handle_signals and threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for env, cmd in launches:
            if got:
                break
            with lock:
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        sid = require_study(rdb, name)
        retry = Retry(url.shown, settings.retry_seconds)  # the workers ride out a restart; so does the poll
        while any(p.poll() is None for p in procs):
            if on_poll is not None:
                on_poll(retry(lambda: rdb.get_all_trials(sid, deepcopy=False)))
            time.sleep(1.0)
        if on_poll is not None:
            on_poll(retry(lambda: rdb.get_all_trials(sid, deepcopy=False)))
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


# ---------------------------------------------------------------------------------------------
# Local worker processes: which GPU each one gets, and how it is started (pure, so testable on a CPU)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """How one local worker process starts: pinned to `gpu` through CUDA_VISIBLE_DEVICES (None: it
    sees what this process sees), with `threads` OpenMP threads (None: inherited), given `--device`."""

    gpu: str | None
    threads: int | None
    device: str


_CUDA_N = re.compile(r"cuda:(\d+)")


def worker_gpus(device: str, gpus: list[str]) -> list[str]:
    """The GPUs local worker processes may use, given `--device` and the visible GPUs (`visible_gpus()`,
    in order): `cpu` none, `cuda:N` only the N-th visible one, `auto`/`cuda` all of them."""
    if device == "cpu":
        return []
    if device.startswith("cuda:"):
        match = _CUDA_N.fullmatch(device)
        if match is None:
            raise ConfigError(f"expected cuda or cuda:N with N a GPU index, got {device!r}", key="--device")
        n = int(match.group(1))
        if n >= len(gpus):
            seen = f"only {len(gpus)} GPU{'s are' if len(gpus) > 1 else ' is'} visible (cuda:0" \
                   f"{f' to cuda:{len(gpus) - 1}' if len(gpus) > 1 else ''})" if gpus else "no GPU is visible"
            raise ConfigError(f"{device} asked for, but {seen}", key="--device")
        return [gpus[n]]
    return list(gpus)


def assign_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The GPU each local worker is pinned to: round-robin, so `--workers-per-gpu K` puts K on each.
    With one GPU or none, workers are not pinned (None: they see what the parent sees)."""
    if len(gpus) <= 1:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def plan_workers(workers: int, device: str, gpus: list[str], cpus: int) -> list[Launch]:
    """Each local worker's GPU, thread count and `--device`, given `--device`, the visible GPUs and the cores.

    - `cpu`: no worker is pinned; the cores are shared (OMP_NUM_THREADS = cores // workers).
    - `cuda:N`: every worker is pinned to visible GPU N and given `--device cuda`: the only device
      it sees is its index 0, so `cuda:N` there would be an invalid device ordinal.
    - `auto`, `cuda`: round-robin over the visible GPUs when there are several (`assign_gpus`);
      with none visible, the cores are shared as for `cpu`."""
    chosen = worker_gpus(device, gpus)
    if _CUDA_N.fullmatch(device):
        return [Launch(chosen[0], None, "cuda") for _ in range(workers)]
    threads = None if chosen else max(1, cpus // workers)
    return [Launch(gpu, threads, device) for gpu in assign_gpus(workers, chosen)]


def worker_processes(settings: Settings, name: str, workers: int, gpus: list[str], *, cpus: int,
                     environ: Mapping[str, str] | None = None) -> list[tuple[dict[str, str], list[str]]]:
    """The (environment, argv) of each local `tuner worker` process. Each gets `settings`, resolved, in
    its environment (settings.child_env), with its own device and sampler seed (`worker_index` + i),
    which its argv also shows; `environ` is the environment they start from (None: this process's).
    The storage URL goes in the environment, never in argv (ps)."""
    out = []
    for i, launch in enumerate(plan_workers(workers, settings.device, gpus, cpus)):
        index = (settings.worker_index or 0) + i
        mine = replace(settings, device=launch.device, worker_index=index,
                       artifact_dir=settings.artifact_dir.resolve(), data_dir=settings.data_dir.resolve())
        # CPU workers share the cores: oversubscribed OpenMP threads spin and run ~10x slower
        env = child_env(mine, gpu=launch.gpu, threads=launch.threads, env=environ)
        cmd = [sys.executable, "-m", "tuner", "worker", "--study-name", name, "--device", launch.device,
               "--worker-index", str(index), "--quiet"]
        out.append((env, cmd))
    return out


# ---------------------------------------------------------------------------------------------
# Visible GPUs
# ---------------------------------------------------------------------------------------------

def parse_visible(value: str) -> list[str]:
    """`CUDA_VISIBLE_DEVICES` as a list: entries stripped; empty, or starting with -1, is none.
    Indices and GPU-/MIG- UUIDs are kept as they are (a child pinned to one gets it verbatim)."""
    out = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry
        out.append(entry)
    return out


_SMI_GPU = re.compile(r"^GPU\s+(\d+):.*?\(UUID:\s*(GPU-[^)\s]+)\)")
_SMI_MIG = re.compile(r"^\s+MIG\s.*?Device\s+\d+:\s*\(UUID:\s*(MIG-[^)\s]+)\)")


def parse_nvidia_smi(text: str) -> list[str]:
    """The devices a worker can be pinned to, from `nvidia-smi -L`: each MIG slice by its UUID
    (`MIG-...`), and each GPU without MIG slices by its UUID (`GPU-...`; its index when the line has
    none). A GPU with MIG slices is not counted as a whole GPU: CUDA sees only its slices. UUIDs are
    unambiguous, where an index would follow CUDA's device order, which need not be nvidia-smi's."""
    gpus: list[tuple[str, list[str]]] = []  # (the GPU's UUID or index, its MIG slices)
    for line in text.splitlines():
        gpu = _SMI_GPU.match(line)
        if gpu is not None:
            gpus.append((gpu.group(2), []))
            continue
        if line.startswith("GPU "):  # a GPU line without a UUID: fall back to its index
            index = re.match(r"GPU\s+(\d+):", line)
            if index is not None:
                gpus.append((index.group(1), []))
            continue
        mig = _SMI_MIG.match(line)
        if mig is not None and gpus:
            gpus[-1][1].append(mig.group(1))
    return [device for whole, slices in gpus for device in (slices or [whole])]


def visible_gpus() -> list[str]:
    """The devices local workers can be pinned to: CUDA_VISIBLE_DEVICES's entries when it is set;
    else `nvidia-smi -L`'s GPUs and MIG slices (`parse_nvidia_smi`); else torch's device count."""
    env = visible_gpus_env()
    if env is not None:
        return parse_visible(env)
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            run = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            run = None
        devices = parse_nvidia_smi(run.stdout) if run is not None and run.returncode == 0 else []
        if devices:
            return devices
    try:
        import torch  # only to count GPUs when nvidia-smi cannot: the supervisor trains nothing

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def summarize(storage: Any, name: str, url: str | StorageURL, wall: float, ran: int) -> SweepResult:
    sid = require_study(storage, name)
    trials = storage.get_all_trials(sid, deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    return SweepResult(study_name=name, storage=StorageURL.parse(url).shown, wall_seconds=wall, counts=counts,
                       best=keys.best_complete(trials), ran=ran if ran >= 0 else len(trials), trials=list(trials))
