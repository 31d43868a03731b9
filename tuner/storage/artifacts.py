"""Trial checkpoints in a folder (the checkpoint store), so a retried trial resumes where its
predecessor stopped. This module knows files and trials' attrs, not how trials run.

At an epoch boundary, once `every` seconds (default 60; 0 = every epoch) have passed since the
trial started or was last checkpointed, the engine writes a checkpoint, and always when a stop
signal came (the trial is queued to resume) or, with keep policy `best`, after the last epoch. The
file goes into the store atomically (a worker killed while saving leaves the previous one intact)
under a random id; the trial's user attr `checkpoint` = {artifact_id, epoch} points at it.

A retry copy (system attrs `failed_trial` / `retry_history`) resumes from the newest predecessor
in its retry history that has a checkpoint (`resume_point`).

The store: `--artifact-dir` / env TUNER_ARTIFACT_DIR, else `<database>.artifacts/` beside a SQLite
file, else `./tuner-artifacts` (PostgreSQL, MySQL); see settings.py. Checkpoints of finished
trials are deleted (`cleanup`); with keep policy `best` the best COMPLETE trial's stays.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError
from tuner.files import atomic_write, remove_stale_temp_files
from tuner.storage import keys

KEEP_POLICIES = ("none", "best")


def check_keep(value: str | None) -> str | None:
    if value is not None and value not in KEEP_POLICIES:
        raise ConfigError(f"unknown value {value!r} (valid: {', '.join(KEEP_POLICIES)})", key="--keep-checkpoints")
    return value


class CheckpointStore:
    """A folder of checkpoint files named by id (created on the first write)."""

    def __init__(self, base_path: str | Path) -> None:
        self.base_path = Path(base_path)

    def path(self, artifact_id: str) -> Path:
        if not artifact_id or "/" in artifact_id or artifact_id.startswith("."):
            raise ValueError(f"not a checkpoint id: {artifact_id!r}")
        return self.base_path / artifact_id

    def new_id(self, trial_number: int) -> str:
        return f"checkpoint-trial-{trial_number}-{uuid.uuid4().hex[:12]}.pt"

    def write(self, artifact_id: str, source: str | Path | BinaryIO) -> None:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as fh:
                atomic_write(self.path(artifact_id), fh)
        else:
            atomic_write(self.path(artifact_id), source)

    def copy_to(self, artifact_id: str, target: Path) -> None:
        shutil.copyfile(self.path(artifact_id), target)

    def exists(self, artifact_id: str) -> bool:
        try:
            return self.path(artifact_id).is_file()
        except ValueError:
            return False

    def remove(self, artifact_id: str) -> bool:
        try:
            self.path(artifact_id).unlink()
            return True
        except (FileNotFoundError, ValueError):
            return False


class CheckpointPolicy:
    """When a trial checkpoints: every `every` seconds of training at an epoch boundary, always
    when a stop signal came (unless the trial just finished), and after the last epoch only for
    keep policy `best`."""

    def __init__(self, every: float = 60.0, keep: str = "none", stop: Any = None) -> None:
        self.every = float(every)
        self.keep = keep
        self.stop = stop  # a faults.StopController, or None

    def due(self, epoch: int, total: int, since: float) -> bool:
        if epoch >= total:
            return self.keep == "best"  # the trial ends here; only a kept best needs the weights
        if self.stop is not None and self.stop.stop_requested:
            return True  # the trial is queued to resume from here
        return time.monotonic() - since >= self.every


def resume_point(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> tuple[int, dict[str, Any]] | None:
    """(predecessor number, its `checkpoint` attr) of the newest predecessor with a checkpoint: the
    trials it retries, newest first, then (a PBT segment) the parent segment it starts from."""
    parent = keys.parent(trial)
    for number in [*reversed(keys.history(trial)), *([parent] if parent is not None else [])]:
        pred = by_number.get(number)
        ck = pred.user_attrs.get(keys.CHECKPOINT) if pred is not None else None
        if isinstance(ck, dict) and ck.get("artifact_id"):
            return number, ck
    return None


def checkpoint_ids(trial: FrozenTrial) -> list[str]:
    ck = trial.user_attrs.get(keys.CHECKPOINT)
    return [ck["artifact_id"]] if isinstance(ck, dict) and ck.get("artifact_id") else []


def cleanup(store: CheckpointStore, trials: Iterable[FrozenTrial], keep: str = "none",
            max_retry: int | None = None, also: Iterable[int] = ()) -> int:
    """Delete the checkpoint files no trial needs any more; returns how many were removed.

    Needed: those of RUNNING and WAITING trials and of their predecessors (a retry resumes from
    them) and parents (a PBT segment starts from one), of failed trials whose retry copy is still
    to be made, with keep="best" the best COMPLETE trial's, and those named in `also` (PBT
    segments a later one may still start from: pbt.needed_checkpoints). Idempotent, safe from any worker. A
    finished trial keeps its `checkpoint` attr (finished trials are read-only in Optuna); a file
    already gone costs a `stat`."""
    if not store.base_path.is_dir():
        return 0
    trials = list(trials)
    gone = keys.superseded(trials)
    needed = {t.number for t in trials if t.number not in gone and keys.needs_retry(t, max_retry)}
    needed.update(also)
    for t in trials:
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            needed.add(t.number)
            needed.update(keys.history(t))
            if keys.parent(t) is not None:
                needed.add(keys.parent(t))  # type: ignore[arg-type]
    if keep == "best":
        best = keys.best_complete(t for t in trials if checkpoint_ids(t))
        if best is not None:
            needed.add(best.number)
    removed = 0
    for t in trials:
        if t.number in needed or not t.state.is_finished():
            continue
        for artifact_id in checkpoint_ids(t):
            removed += store.remove(artifact_id)
    remove_stale_temp_files(store.base_path)
    return removed
