"""`tuner sweep STUDY_FILE` and `tuner worker --study-name NAME`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from optuna.trial import FrozenTrial, TrialState

from tuner.cli.app import app
from tuner.cli.common import (
    DataDirOpt,
    DatasetOpt,
    Debug,
    DeviceOpt,
    StorageOpt,
    console,
    err_console,
    interactive,
    progress_bar,
    say,
)
from tuner.errors import ConfigError
from tuner.storage import keys
from tuner.study import settings
from tuner.study.config import check_study_model, load_study_file

if TYPE_CHECKING:
    from tuner.engine.sweep import SweepResult

HeartbeatOpt = Annotated[int | None, typer.Option(
    "--heartbeat-interval", help="Seconds between trial heartbeats [default: study file, else 60].")]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help="Stop taking new trials after S seconds.")]
ArtifactDirOpt = Annotated[Path | None, typer.Option(
    "--artifact-dir", show_default=False,
    help="Checkpoint artifact store [env TUNER_ARTIFACT_DIR; default: <db>.artifacts beside a SQLite "
         "database, else ./tuner-artifacts].")]
ArtifactStoreOpt = Annotated[str | None, typer.Option(
    "--artifact-store", show_default=False, metavar="s3://BUCKET/PREFIX",
    help="Keep checkpoints in an S3 bucket instead of a folder, so workers share only the database and "
         "the bucket; credentials from the AWS variables or credentials file [env TUNER_ARTIFACT_STORE; "
         "not with --artifact-dir].")]
KeepOpt = Annotated[str | None, typer.Option(
    "--keep-checkpoints", help="Checkpoints of finished trials: none (delete) or best (keep the best "
                               "trial's) [default: the study's policy, else none].")]

EveryOpt = Annotated[float | None, typer.Option(
    "--checkpoint-every", show_default=False, metavar="SECONDS",
    help="Checkpoint a running trial at the first epoch boundary after S seconds of training (0: after "
         "every epoch); a crash loses at most that much of a trial [env TUNER_CHECKPOINT_EVERY; default: 60].")]
PackOpt = Annotated[str | None, typer.Option(
    "--pack", metavar="K|auto",
    help="Train K trials at once per worker, as one fused model (1: off; auto: by GPU memory and a short "
         "probe on CUDA, 1 on a CPU) [default: the study file's training.pack, else auto].")]


def describe(params: dict[str, Any] | None) -> str:
    """A short one-line view of a trial's Adam settings."""
    if not params:
        return ""
    o, s, c = params["optimizer"], params["schedule"], params["clipping"]
    clip = "" if c["mode"] == "none" else f" clip={c['mode']}({c['threshold']:.3g})"
    warmup = f"+warmup{s['warmup_fraction']:.2f}" if s["warmup_fraction"] else ""
    return (f"{o['name']} lr={o['lr']:.3g} betas=({o['betas'][0]:.4g}, {o['betas'][1]:.5g}) eps={o['eps']:.2g} "
            f"wd={o['weight_decay']:.2g} {s['name']}{warmup}{clip}")


class SweepProgress:
    """Per-trial lines, plus a Rich bar on a terminal; fed by callbacks or by polling storage."""

    def __init__(self, total: int | None, quiet: bool = False, bar: bool = True) -> None:
        self.total = total
        self.quiet = quiet
        self.seen: set[int] = set()
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.best: float | None = None
        self.bar = None
        if bar and interactive() and not quiet:
            self.bar = progress_bar()
            self.task = self.bar.add_task("trials", total=total)

    def begin(self, trials: list[FrozenTrial], budget: int | None) -> None:
        """The bar's total is the study's budget; a continued study's earlier trials count
        towards the bar and the best, silently."""
        self.total = budget
        if self.bar is not None:
            self.bar.update(self.task, total=budget)
        gone = keys.superseded(trials)
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
                self.seen.add(t.number)
                if t.number not in gone:
                    self.counts[t.state.name] += 1
                if t.state == TrialState.COMPLETE and t.value is not None:
                    self.best = t.value if self.best is None else max(self.best, t.value)
        self._update()

    def _update(self) -> None:
        if self.bar is not None:
            done = sum(self.counts.values())
            self.bar.update(self.task, completed=done, description=(
                f"done {self.counts['COMPLETE']} pruned {self.counts['PRUNED']} failed {self.counts['FAIL']} "
                f"best {'-' if self.best is None else format(self.best, '.4f')}"))

    def __enter__(self) -> SweepProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def trial(self, _study: Any, t: FrozenTrial) -> None:
        if t.number in self.seen or t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            return
        self.seen.add(t.number)
        if not t.user_attrs.get(keys.INTERRUPTED):  # its retry copy counts, when it finishes
            self.counts[t.state.name] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            self.best = t.value if self.best is None else max(self.best, t.value)
        if self.quiet:
            return
        state = "DIVERGED" if t.user_attrs.get(keys.DIVERGED) else t.state.name
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = t.value if t.value is not None else (t.intermediate_values[last] if last else None)
        secs = t.user_attrs.get("seconds")
        line = (f"trial {t.number:>3}  {state:<8} "
                f"{'val_acc ' + format(value, '.4f') if value is not None else 'val_acc   -   '}"
                f"  epochs {t.user_attrs.get('epochs', last or 0)}  {describe(t.user_attrs.get(keys.PARAMS))}"
                f"{f'  {secs:.1f}s' if secs else ''}  best {'-' if self.best is None else format(self.best, '.4f')}")
        if t.user_attrs.get("interrupted"):
            line = line.replace(f"{state:<8}", f"{'STOPPED':<8}", 1)
            ck = t.user_attrs.get("checkpoint") or {}
            line += f"  queued to resume from epoch {ck.get('epoch', 0)}"
        elif t.state == TrialState.FAIL:
            line += f"  error: {t.user_attrs.get('error') or t.system_attrs.get('fail_reason', '')}".rstrip()
        if t.user_attrs.get("resumed_from_epoch"):
            line += f"  (resumed from epoch {t.user_attrs['resumed_from_epoch']})"
        if self.bar is not None:
            self.bar.console.print(line)
            self._update()
        else:
            say(line)

    def poll(self, trials: list[FrozenTrial]) -> None:
        for t in sorted(trials, key=lambda t: t.number):
            self.trial(None, t)


def _count_text(result: SweepResult) -> str:
    """"complete 7, fail 2 (2 retried)": FAIL trials replaced by a retry copy are said so."""
    retried = {t.system_attrs["retry_history"][-1] for t in result.trials if t.system_attrs.get("retry_history")}
    parts = []
    for k, v in result.counts.items():
        if not v:
            continue
        text = f"{k.lower()} {v}"
        if k == "FAIL" and retried:
            text += f" ({len(retried)} retried)"
        parts.append(text)
    return ", ".join(parts)


def print_summary(result: SweepResult) -> None:
    best = result.best
    if interactive():
        from rich.table import Table  # rich's tables: only for a summary on a terminal

        table = Table(title=f"study {result.study_name}", show_header=False)
        table.add_row("storage", result.storage)
        table.add_row("trials", _count_text(result) or "none")
        table.add_row("wall time", f"{result.wall_seconds:.1f}s")
        if best is not None:
            table.add_row("best value", f"{best.value:.4f} (trial {best.number})")
            table.add_row("best params", describe(best.user_attrs.get(keys.PARAMS)))
        console.print(table)
        return
    say(f"study {result.study_name}: " + _count_text(result)
        + f"; wall time {result.wall_seconds:.1f}s; storage {result.storage}")
    if best is not None:
        say(f"best value {best.value:.4f} (trial {best.number}): {describe(best.user_attrs.get(keys.PARAMS))}")
    else:
        say("no trial completed")


@app.command("sweep")
def sweep_command(
    study_file: Annotated[Path, typer.Argument(help="Study YAML (see studies/).")],
    storage: StorageOpt = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Override the file's name.")] = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", help="Total trials in the study.")] = None,
    timeout: TimeoutOpt = None,
    workers: Annotated[int, typer.Option("--workers", help="Local worker processes (one per GPU when several).")] = 1,
    workers_per_gpu: Annotated[int | None, typer.Option(
        "--workers-per-gpu", metavar="K",
        help="Run K workers on each visible GPU (small trials share a GPU; MIG slices count as GPUs; with "
             "--device cuda:N, K on GPU N).")] = None,
    device: DeviceOpt = "auto",
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    artifact_dir: ArtifactDirOpt = None,
    artifact_store: ArtifactStoreOpt = None,
    keep_checkpoints: KeepOpt = None,
    checkpoint_every: EveryOpt = None,
    pack: PackOpt = None,
    warm_start: Annotated[str | None, typer.Option(
        "--warm-start", metavar="STUDY[,STUDY...]",
        help="Queue the best configs of earlier studies (in this storage, or URL#STUDY in another) as a new "
             "study's first trials, mapped into its space.")] = None,
    warm_top: Annotated[int, typer.Option(
        "--warm-top", metavar="K", help="With --warm-start: the top K COMPLETE trials of each source.")] = 5,
    create_only: Annotated[bool, typer.Option(
        "--create-only",
        help="Create (or update) the study and its budget, run nothing: start `tuner worker`s.")] = False,
    debug: Debug = False,
) -> None:
    """Run (or continue) an Optuna study over Adam's knobs, pruning hopeless trials.

    Ctrl-C (SIGINT) or SIGTERM stops at the next epoch boundary and queues the running trial to
    resume from its checkpoint on the next run (exit 130 / 143); a second signal aborts."""
    from tuner.engine import pbt, stages, sweep, warmstart  # the engine: only when a sweep runs (a fast --help)

    for flag, value in (("--n-trials", n_trials), ("--workers", workers), ("--workers-per-gpu", workers_per_gpu)):
        if value is not None and value < 1:
            raise ConfigError(f"must be >= 1, got {value}", key=flag)
    flags = settings.Flags(storage=storage, data_dir=data_dir, artifact_dir=artifact_dir,
                           artifact_store=artifact_store, checkpoint_every=checkpoint_every, device=device,
                           timeout=timeout, heartbeat_interval=heartbeat_interval,
                           keep_checkpoints=keep_checkpoints, pack=pack)
    edge = settings.resolve(flags)  # flags and environment checked (exit 2) before the file is read
    warmstart.check_top(warm_top)
    warm = None
    if warm_start is not None:
        warmstart.parse_sources(warm_start)  # the syntax, before anything is read
        warm = warmstart.WarmStart([warm_start], warm_top, say=say)
    if create_only:
        # (--data-dir and --checkpoint-every also come from the environment, so they are not refused)
        _refuse_worker_flags(workers=workers != 1, workers_per_gpu=workers_per_gpu, device=device != "auto",
                             pack=edge.given.pack is not None)
    config = load_study_file(study_file, check_model=False)
    if dataset:
        config = replace(config, training=replace(config.training, dataset=dataset))
    if study_name:
        config = replace(config, name=study_name)
    resolved = settings.resolve(flags, study=config)  # the study file's storage, timeout, heartbeat, pack
    check_study_model(config, data_dir=resolved.data_dir)  # a model reference, on the data's shape
    stages.check_flags(config.stages, config.source, n_trials=n_trials, warm_start=warm)  # a staged study: exit 2 here
    pbt.check_flags(config, n_trials=n_trials, warm_start=warm)  # a population-based study: exit 2 here
    name = config.name
    if create_only:
        # what applies to workers that join later is stored with the study: its timeout and heartbeat
        if timeout is not None:
            config = replace(config, timeout=timeout)
        if heartbeat_interval is not None:
            hb = config.heartbeat
            grace = hb.grace_period if hb.grace_period and hb.grace_period >= heartbeat_interval else None
            config = replace(config, heartbeat=replace(hb, interval=heartbeat_interval, grace_period=grace))
        rdb = sweep.prepare_study(config, resolved.storage, n_trials, keep_checkpoints=keep_checkpoints,
                                  warm_start=warm)
        total = rdb.get_study_user_attrs(rdb.get_study_id_from_name(name)).get(keys.N_TRIALS)
        say(f"study {name} ready in {resolved.storage.shown}: {total or 'unlimited'} trials of {config.training.model} "
            f"on {config.training.dataset}; run `tuner worker --study-name {name}` on any machine that reaches it")
        return
    if workers_per_gpu:
        gpus = _worker_gpus(device)
        if gpus:
            workers = max(workers, workers_per_gpu * len(gpus))
        else:
            err_console.print("note: --workers-per-gpu ignored: no GPU visible")
    elif workers > 1:
        _worker_gpus(device)  # --device cuda:N names a visible GPU (checked before the study is written)
    say(f"sweep {name}: {n_trials or config.n_trials or 'unlimited'} trials of {config.training.model} on "
        f"{config.training.dataset}, {config.training.epochs} epochs each; sampler {config.sampler.name}, "
        f"pruner {config.pruner.name}, {workers} worker{'s' if workers > 1 else ''}")
    with SweepProgress(None) as progress:
        result = sweep.run_sweep(config, resolved, n_trials=n_trials, workers=workers, on_trial=progress.trial,
                           on_poll=progress.poll, on_start=progress.begin, warm_start=warm)
    print_summary(result)


WorkersPerGpuOpt = Annotated[int | None, typer.Option(
    "--workers-per-gpu", metavar="K",
    help="Start K worker processes on each visible GPU (MIG slices count as GPUs), each pinned to its GPU "
         "with CUDA_VISIBLE_DEVICES; with --device cuda:N, K on GPU N. With no GPU visible, one worker "
         "runs in this process.")]


def _worker_gpus(device: str) -> list[str]:
    """The visible GPUs local worker processes would run on under `--device` (ConfigError, exit 2,
    for a `cuda:N` that is not visible)."""
    from tuner.engine.sweep import visible_gpus, worker_gpus  # the engine: only when a sweep runs (a fast --help)

    return worker_gpus(device, visible_gpus() if device != "cpu" else [])


def _refuse_worker_flags(**given: Any) -> None:
    """--create-only runs no worker: flags that only a worker uses are refused (exit 2)."""
    for name, value in given.items():
        if value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError("applies to workers, and --create-only starts none; pass it to `tuner worker`",
                              key=flag)


@app.command("worker")
def worker_command(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to join.")],
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    timeout: TimeoutOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    worker_index: Annotated[int | None, typer.Option("--worker-index", hidden=True)] = None,
    workers_per_gpu: WorkersPerGpuOpt = None,
    artifact_dir: ArtifactDirOpt = None,
    artifact_store: ArtifactStoreOpt = None,
    keep_checkpoints: KeepOpt = None,
    checkpoint_every: EveryOpt = None,
    pack: PackOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-trial lines.")] = False,
    debug: Debug = False,
) -> None:
    """Join an existing study (from any machine) and run its trials; the config comes from the storage.

    With --workers-per-gpu K, start K worker processes per visible GPU, each pinned to its GPU.
    SIGINT/SIGTERM stop at the next epoch boundary (exit 130 / 143); a second signal aborts."""
    from tuner.engine.sweep import run_worker_processes  # the engine: only when a sweep runs (a fast --help)
    from tuner.engine.worker import run_worker  # torch: only when this process trains

    if workers_per_gpu is not None and workers_per_gpu < 1:
        raise ConfigError(f"must be >= 1, got {workers_per_gpu}", key="--workers-per-gpu")
    # a local worker process of `tuner sweep --workers N`: its parent's settings, resolved (child_env)
    resolved = settings.inherited() or settings.resolve(settings.Flags(
        storage=storage, data_dir=data_dir, artifact_dir=artifact_dir, artifact_store=artifact_store,
        checkpoint_every=checkpoint_every, device=device, timeout=timeout, heartbeat_interval=heartbeat_interval,
        keep_checkpoints=keep_checkpoints, pack=pack, worker_index=worker_index))
    if debug or settings.debug_env():
        err_console.print(f"worker settings: {resolved.describe()}", highlight=False, markup=False, soft_wrap=True)
    progress = SweepProgress(None, quiet=quiet, bar=False)  # workers print plain lines
    if workers_per_gpu:
        gpus = _worker_gpus(device)
        if gpus:
            workers = workers_per_gpu * len(gpus)
            if not quiet:
                say(f"worker: {workers} processes on {len(gpus)} GPU{'s' if len(gpus) > 1 else ''} "
                    f"({workers_per_gpu} per GPU), study {study_name}")
            result = run_worker_processes(resolved, study_name, workers, on_poll=progress.poll,
                                          on_start=progress.begin)
            if not quiet:
                print_summary(result)
            return
        err_console.print("note: --workers-per-gpu ignored: no GPU visible")
    ran = run_worker(resolved, study_name, on_trial=progress.trial)
    if not quiet:
        say(f"worker done: {ran} trials")
