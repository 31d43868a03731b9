"""`tuner sweep STUDY_FILE` and `tuner worker --study-name NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from optuna.trial import FrozenTrial, TrialState

from ..config import load_study_file
from ..errors import ConfigError
from ..objective import ATTR_DIVERGED, ATTR_PARAMS
from ..artifacts import check_keep
from ..artifacts import checkpoint_every as checkpoint_every_seconds
from ..storage import display, resolve_url
from ..sweep import visible_gpus, SweepResult, WorkerOptions, prepare_study, run_sweep, run_worker
from . import app
from .common import DataDirOpt, DatasetOpt, Debug, DeviceOpt, StorageOpt, console, err_console, interactive, say

HeartbeatOpt = Annotated[Optional[int], typer.Option(
    "--heartbeat-interval", help="Seconds between trial heartbeats [default: study file, else 60].")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Stop taking new trials after S seconds.")]
ArtifactDirOpt = Annotated[Optional[Path], typer.Option(
    "--artifact-dir", envvar="TUNER_ARTIFACT_DIR", show_default=False,
    help="Checkpoint artifact store [env TUNER_ARTIFACT_DIR; default: <db>.artifacts beside a SQLite "
         "database, else ./tuner-artifacts].")]
KeepOpt = Annotated[Optional[str], typer.Option(
    "--keep-checkpoints", help="Checkpoints of finished trials: none (delete) or best (keep the best "
                               "trial's) [default: the study's policy, else none].")]

EveryOpt = Annotated[Optional[float], typer.Option(
    "--checkpoint-every", envvar="TUNER_CHECKPOINT_EVERY", show_default=False, metavar="SECONDS",
    help="Checkpoint a running trial at the first epoch boundary after S seconds of training (0: after "
         "every epoch); a crash loses at most that much of a trial [env TUNER_CHECKPOINT_EVERY; default: 60].")]


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

    def __init__(self, total: int | None, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet
        self.seen: set[int] = set()
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.best: float | None = None
        self.bar = None
        if interactive() and not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console)
            self.task = self.bar.add_task("trials", total=total)

    def __enter__(self) -> "SweepProgress":
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
        self.counts[t.state.name] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            self.best = t.value if self.best is None else max(self.best, t.value)
        if self.quiet:
            return
        state = "DIVERGED" if t.user_attrs.get(ATTR_DIVERGED) else t.state.name
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = t.value if t.value is not None else (t.intermediate_values[last] if last else None)
        secs = t.user_attrs.get("seconds")
        line = (f"trial {t.number:>3}  {state:<8} "
                f"{'val_acc ' + format(value, '.4f') if value is not None else 'val_acc   -   '}"
                f"  epochs {t.user_attrs.get('epochs', last or 0)}  {describe(t.user_attrs.get(ATTR_PARAMS))}"
                f"{f'  {secs:.1f}s' if secs else ''}  best {self.best if self.best is None else format(self.best, '.4f')}")
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
            done = sum(self.counts.values())
            self.bar.update(self.task, completed=done, description=(
                f"done {self.counts['COMPLETE']} pruned {self.counts['PRUNED']} failed {self.counts['FAIL']} "
                f"best {'-' if self.best is None else format(self.best, '.4f')}"))
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
        from rich.table import Table

        table = Table(title=f"study {result.study_name}", show_header=False)
        table.add_row("storage", result.storage)
        table.add_row("trials", _count_text(result) or "none")
        table.add_row("wall time", f"{result.wall_seconds:.1f}s")
        if best is not None:
            table.add_row("best value", f"{best.value:.4f} (trial {best.number})")
            table.add_row("best params", describe(best.user_attrs.get(ATTR_PARAMS)))
        console.print(table)
        return
    say(f"study {result.study_name}: " + _count_text(result)
        + f"; wall time {result.wall_seconds:.1f}s; storage {result.storage}")
    if best is not None:
        say(f"best value {best.value:.4f} (trial {best.number}): {describe(best.user_attrs.get(ATTR_PARAMS))}")
    else:
        say("no trial completed")


@app.command("sweep")
def sweep_command(
    study_file: Annotated[Path, typer.Argument(help="Study YAML (see studies/).")],
    storage: StorageOpt = None,
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Override the file's name.")] = None,
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", help="Total trials in the study.")] = None,
    timeout: TimeoutOpt = None,
    workers: Annotated[int, typer.Option("--workers", help="Local worker processes (one per GPU when several).")] = 1,
    workers_per_gpu: Annotated[Optional[int], typer.Option(
        "--workers-per-gpu", help="Run K workers on each visible GPU (small trials share a GPU).")] = None,
    device: DeviceOpt = "auto",
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    artifact_dir: ArtifactDirOpt = None,
    keep_checkpoints: KeepOpt = None,
    checkpoint_every: EveryOpt = None,
    create_only: Annotated[bool, typer.Option(
        "--create-only", help="Create (or update) the study and its budget, run nothing: start `tuner worker`s.")] = False,
    debug: Debug = False,
) -> None:
    """Run (or continue) an Optuna study over Adam's knobs, pruning hopeless trials.

    Ctrl-C (SIGINT) or SIGTERM stops at the next epoch boundary and queues the running trial to
    resume from its checkpoint on the next run (exit 130 / 143); a second signal aborts."""
    for flag, value in (("--n-trials", n_trials), ("--workers", workers), ("--heartbeat-interval", heartbeat_interval),
                        ("--workers-per-gpu", workers_per_gpu)):
        if value is not None and value < 1:
            raise ConfigError(f"must be >= 1, got {value}", key=flag)
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0, got {timeout}", key="--timeout")
    check_keep(keep_checkpoints)
    checkpoint_every_seconds(checkpoint_every)
    config = load_study_file(study_file)
    if dataset:
        from dataclasses import replace

        config = replace(config, training=replace(config.training, dataset=dataset))
    name = study_name or config.name
    total = n_trials or config.n_trials
    if create_only:
        from dataclasses import replace

        url = resolve_url(storage, config.storage)
        prepare_study(replace(config, name=name), url, n_trials, keep_checkpoints=keep_checkpoints)
        say(f"study {name} ready in {display(url)}: {total or 'unlimited'} trials of {config.training.model} on "
            f"{config.training.dataset}; run `tuner worker --study-name {name}` on any machine that reaches it")
        return
    if workers_per_gpu:
        gpus = visible_gpus() if device != "cpu" else []
        if gpus:
            workers = max(workers, workers_per_gpu * len(gpus))
        else:
            err_console.print("note: --workers-per-gpu ignored: no GPU visible")
    say(f"sweep {name}: {total or 'unlimited'} trials of {config.training.model} on {config.training.dataset}, "
        f"{config.training.epochs} epochs each; sampler {config.sampler.name}, pruner {config.pruner.name}, "
        f"{workers} worker{'s' if workers > 1 else ''}")
    opts = WorkerOptions(device=device, data_dir=str(data_dir) if data_dir else None,
                         heartbeat_interval=heartbeat_interval, artifact_dir=str(artifact_dir) if artifact_dir else None,
                         keep_checkpoints=keep_checkpoints, checkpoint_every=checkpoint_every)
    with SweepProgress(total) as progress:
        result = run_sweep(config, storage=storage, study_name=study_name, n_trials=n_trials, timeout=timeout,
                           workers=workers, opts=opts, on_trial=progress.trial, on_poll=progress.poll)
    print_summary(result)


@app.command("worker")
def worker_command(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to join.")],
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    timeout: TimeoutOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    worker_index: Annotated[Optional[int], typer.Option("--worker-index", hidden=True)] = None,
    artifact_dir: ArtifactDirOpt = None,
    keep_checkpoints: KeepOpt = None,
    checkpoint_every: EveryOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-trial lines.")] = False,
    debug: Debug = False,
) -> None:
    """Join an existing study (from any machine) and run its trials; the config comes from the storage.

    SIGINT/SIGTERM stop at the next epoch boundary (exit 130 / 143); a second signal aborts."""
    check_keep(keep_checkpoints)
    checkpoint_every_seconds(checkpoint_every)
    for flag, value in (("--heartbeat-interval", heartbeat_interval),):
        if value is not None and value < 1:
            raise ConfigError(f"must be >= 1, got {value}", key=flag)
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0, got {timeout}", key="--timeout")
    url = resolve_url(storage)
    opts = WorkerOptions(device=device, data_dir=str(data_dir) if data_dir else None, timeout=timeout,
                         heartbeat_interval=heartbeat_interval, worker_index=worker_index,
                         artifact_dir=str(artifact_dir) if artifact_dir else None, keep_checkpoints=keep_checkpoints,
                         checkpoint_every=checkpoint_every)
    progress = SweepProgress(None, quiet=quiet)
    progress.bar = None  # workers print plain lines
    ran = run_worker(url, study_name, opts, on_trial=progress.trial)
    if not quiet:
        say(f"worker done: {ran} trials")

