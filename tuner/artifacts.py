"""Trial checkpoints as Optuna artifacts, so a retried trial resumes where its predecessor stopped.

At an epoch boundary, once `every` seconds (default 60; 0 = every epoch) have passed since the
trial started or was last checkpointed, the engine writes a checkpoint (`train(checkpoint_path=...,
checkpoint_when=...)`), and always when a stop signal came (the trial is queued to resume) or, with
keep policy `best`, after the last epoch. `Checkpointer` uploads it to the study's artifact store:
the first time through `optuna.artifacts.upload_artifact` (the dashboard lists it under the
trial), later ones replace the same artifact atomically. The trial's user attr `checkpoint` =
{artifact_id, epoch} points at it. A crash loses at most `every` seconds of a trial's training;
short trials (a few seconds) pay nothing for checkpoints.

A retry copy (WAITING, system attrs `failed_trial` / `retry_history`) walks its retry history
backwards to the newest predecessor with a checkpoint, downloads it, checks it (`weights_only`
load, same params), re-reports the earlier epochs' validation accuracy so the learning curve is
complete, records user attr `resumed_from_epoch`, and trains on from there.

The store: `--artifact-dir` / env TUNER_ARTIFACT_DIR, else `<database>.artifacts/` beside a SQLite
file, else `./tuner-artifacts` (PostgreSQL, MySQL). Checkpoints of finished trials are deleted;
with keep policy `best` the best COMPLETE trial's checkpoint stays.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from .errors import CheckpointError, ConfigError
from .faults import GracefulStop
from .storage import sqlite_path

ATTR_CHECKPOINT = "checkpoint"  # trial user attr: {"artifact_id": ..., "epoch": ...}
ATTR_RESUMED = "resumed_from_epoch"
ATTR_RESUMED_TRIAL = "resumed_from_trial"
ARTIFACT_PREFIX = "artifacts:"
CHECKPOINT_NAME = "checkpoint-trial-{number}.pt"
KEEP_POLICIES = ("none", "best")
DEFAULT_CHECKPOINT_EVERY = 60.0  # seconds of training a crash may cost a trial
DEFAULT_DIR = "tuner-artifacts"


def artifact_dir_for(url: str, configured: str | Path | None = None) -> Path:
    """The artifact folder for a storage: flag/env, else beside a SQLite file, else ./tuner-artifacts."""
    chosen = configured or os.environ.get("TUNER_ARTIFACT_DIR")
    if chosen:
        return Path(chosen)
    db = sqlite_path(url)
    if db is not None:
        return db.with_name(db.name + ".artifacts")
    return Path(DEFAULT_DIR)


def check_keep(value: str | None) -> str | None:
    if value is not None and value not in KEEP_POLICIES:
        raise ConfigError(f"unknown value {value!r} (valid: {', '.join(KEEP_POLICIES)})", key="--keep-checkpoints")
    return value


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """FileSystemArtifactStore whose writes are atomic (temp file + fsync + rename): a worker killed
    while saving leaves the previous checkpoint intact."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.base_path = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self._get_filepath(artifact_id)
        self.base_path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{artifact_id}.", suffix=".tmp", dir=self.base_path)
        try:
            with os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(content_body, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a dashboard may run as another user
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, artifact_id: str) -> bool:
        try:
            return self._get_filepath(artifact_id).is_file()
        except ValueError:  # an id that would leave the folder
            return False


def open_store(path: str | Path) -> AtomicFileSystemArtifactStore:
    """The artifact store in `path` (created on the first write)."""
    return AtomicFileSystemArtifactStore(Path(path))


# ---------------------------------------------------------------------------------------------
# Checkpointing trials
# ---------------------------------------------------------------------------------------------

def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resume_point(storage: optuna.storages.BaseStorage, study_id: int,
                 system_attrs: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(predecessor number, its `checkpoint` attr) of the newest predecessor with a checkpoint,
    from a trial's system attrs (a retry copy's `retry_history`)."""
    for number in reversed(system_attrs.get("retry_history", [])):
        try:
            tid = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            continue
        ck = storage.get_trial(tid).user_attrs.get(ATTR_CHECKPOINT)
        if isinstance(ck, dict) and ck.get("artifact_id"):
            return number, ck
    return None


def checkpoint_every(value: float | None = None) -> float:
    """Seconds between a trial's checkpoints: the flag, else env TUNER_CHECKPOINT_EVERY, else 60."""
    key = "--checkpoint-every"
    if value is None:
        raw = os.environ.get("TUNER_CHECKPOINT_EVERY", "").strip()
        if not raw:
            return DEFAULT_CHECKPOINT_EVERY
        key = "TUNER_CHECKPOINT_EVERY"
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"must be a number of seconds >= 0, got {raw!r}", key=key) from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"must be a number of seconds >= 0, got {value!r}", key=key)
    return float(value)


class Checkpointer:
    """The `train_fn` of `Objective` that checkpoints into the artifact store (every `every`
    seconds of training, at epoch boundaries), resumes retried trials, and stops at an epoch
    boundary when `stop` is asked (see faults.py). `keep="best"` also checkpoints the last epoch."""

    def __init__(self, store_dir: str | Path, *, stop: Any = None, every: float = DEFAULT_CHECKPOINT_EVERY,
                 keep: str = "none", on_interrupt: Callable[[optuna.Trial], None] | None = None,
                 on_abort: Callable[[optuna.Trial], None] | None = None) -> None:
        self.store = open_store(store_dir)
        self.stop = stop  # a faults.StopController, or None
        self.every = float(every)
        self.keep = keep
        self.on_interrupt = on_interrupt  # queue the trial to resume (graceful stop)
        self.on_abort = on_abort  # the same, best effort, on a second signal
        self.current: optuna.Trial | None = None
        self.uploaded = False  # the current (or last) trial uploaded a checkpoint
        self._tmp = Path(tempfile.mkdtemp(prefix="tuner-ckpt-"))

    def _due(self, epoch: int, total: int, since: float) -> bool:
        """Checkpoint after this epoch? (see the module docstring)"""
        if epoch >= total:
            return self.keep == "best"  # the trial ends here; only a kept best needs the weights
        if self.stop is not None and self.stop.stop_requested:
            return True  # the trial is queued to resume from here
        return time.monotonic() - since >= self.every

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __call__(self, params: Any, data: Any, *, on_epoch: Callable[[Any], bool], trial: optuna.Trial) -> Any:
        from .train import train

        self.current = trial
        storage, study_id = trial.storage, trial.study._study_id
        # only the system attrs: one query, where reading the whole trial costs several
        system_attrs = getattr(storage, "_backend", storage).get_trial_system_attrs(trial._trial_id)
        local = self._tmp / f"trial-{trial.number}.pt"
        resume = self._download(storage, study_id, trial.number, system_attrs, params)
        artifact_id: str | None = None
        total = params.training.epochs
        self.uploaded = False
        last_saved = time.monotonic()
        saved_epoch = -1

        def when(record: Any) -> bool:
            nonlocal last_saved, saved_epoch
            if not self._due(record.epoch, total, last_saved):
                return False
            last_saved, saved_epoch = time.monotonic(), record.epoch
            return True

        if resume is not None:
            path, number, state = resume
            trial.set_user_attr(ATTR_RESUMED, int(state["epoch"]))
            trial.set_user_attr(ATTR_RESUMED_TRIAL, number)
            for rec in state["history"]:  # the earlier epochs of the learning curve
                trial.report(float(rec["val_accuracy"]), int(rec["epoch"]))
        elif system_attrs.get("retry_history"):
            trial.set_user_attr(ATTR_RESUMED, 0)

        def hook(record: Any) -> bool:
            nonlocal artifact_id
            if saved_epoch == record.epoch:
                if artifact_id is None:
                    renamed = local.with_name(CHECKPOINT_NAME.format(number=trial.number))
                    os.replace(local, renamed)
                    artifact_id = upload_artifact(artifact_store=self.store, file_path=str(renamed),
                                                  study_or_trial=trial, mimetype="application/octet-stream")
                    renamed.unlink(missing_ok=True)
                else:
                    with open(local, "rb") as fh:
                        self.store.write(artifact_id, fh)
                self.uploaded = True
                trial.set_user_attr(ATTR_CHECKPOINT, {"artifact_id": artifact_id, "epoch": record.epoch})
            stop = bool(on_epoch(record))
            # a signal stops the trial at the first epoch boundary that has its checkpoint (one that
            # came after `when` decided for this epoch waits for the next)
            if (not stop and self.stop is not None and self.stop.stop_requested and record.epoch < total
                    and saved_epoch == record.epoch):
                if self.on_interrupt is not None:
                    self.on_interrupt(trial)
                raise GracefulStop(f"stopped by a signal after epoch {record.epoch}")
            return stop

        try:
            return train(params, data, on_epoch=hook, checkpoint_path=local, checkpoint_when=when,
                         resume_from=resume[0] if resume is not None else None)
        except KeyboardInterrupt:  # a second signal: abort now, but still queue the trial to resume
            if self.on_abort is not None:
                try:
                    self.on_abort(trial)
                except BaseException:  # noqa: BLE001 - best effort only
                    pass
            raise
        finally:
            for p in (local, local.with_name(CHECKPOINT_NAME.format(number=trial.number)),
                      self._tmp / f"resume-{trial.number}.pt"):
                p.unlink(missing_ok=True)
            for p in self._tmp.glob(f"{local.name}.*.tmp"):
                p.unlink(missing_ok=True)

    def _download(self, storage: Any, study_id: int, trial_number: int, system_attrs: dict[str, Any],
                  params: Any) -> tuple[Path, int, dict[str, Any]] | None:
        from .train import load_checkpoint

        point = resume_point(storage, study_id, system_attrs)
        if point is None:
            return None
        number, ck = point
        path = self._tmp / f"resume-{trial_number}.pt"
        path.unlink(missing_ok=True)
        try:
            with self.store.open_reader(ck["artifact_id"]) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            state = load_checkpoint(path, params)
        except (ArtifactNotFound, OSError, ValueError) as exc:
            _warn(f"trial {trial_number}: checkpoint of trial {number} not found in {self.store.base_path} "
                  f"({type(exc).__name__}); starting from epoch 0")
            return None
        except CheckpointError as exc:
            _warn(f"trial {trial_number}: checkpoint of trial {number} unusable ({exc}); starting from epoch 0")
            return None
        return path, number, state


# ---------------------------------------------------------------------------------------------
# Cleanup
# ---------------------------------------------------------------------------------------------

def checkpoint_artifacts(trial: FrozenTrial) -> list[str]:
    """Artifact ids of this trial's checkpoints (from the artifact meta Optuna stores)."""
    ids = []
    for key, value in trial.system_attrs.items():
        if not key.startswith(ARTIFACT_PREFIX):
            continue
        try:
            meta = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            continue
        if isinstance(meta, dict) and str(meta.get("filename", "")).startswith("checkpoint-trial-"):
            ids.append(key[len(ARTIFACT_PREFIX):])
    return ids


def cleanup_checkpoints(storage: Any, study_id: int, store_dir: str | Path, keep: str = "none",
                        trials: list[FrozenTrial] | None = None) -> int:
    """Delete the checkpoints no trial needs any more; returns how many files were removed.

    Needed: those of RUNNING and WAITING trials and of their predecessors (a retry resumes from
    them), and with keep="best" the best COMPLETE trial's. Idempotent, safe to run from any worker.
    `trials` (e.g. `study.get_trials()`, which reads only what changed) saves re-reading them all;
    attrs of files already gone are left alone, so a cached copy that still lists them costs nothing.
    """
    store = open_store(store_dir)
    if not store.base_path.is_dir():
        return 0
    if trials is None:
        trials = storage.get_all_trials(study_id, deepcopy=False)
    needed: set[int] = set()
    for t in trials:
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            needed.add(t.number)
            needed.update(t.system_attrs.get("retry_history", []))
    if keep == "best":
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and checkpoint_artifacts(t)]
        if done:
            needed.add(max(done, key=lambda t: (t.value, -t.number)).number)
    removed = 0
    for t in trials:
        if t.number in needed or not t.state.is_finished():
            continue
        ids = [i for i in checkpoint_artifacts(t) if store.exists(i)]
        if not ids:
            continue
        for artifact_id in ids:
            try:
                store.remove(artifact_id)
                removed += 1
            except (ArtifactNotFound, ValueError):
                pass
        storage.delete_trial_attrs(t._trial_id, user_keys=[ATTR_CHECKPOINT],
                                   system_keys=[ARTIFACT_PREFIX + i for i in ids])
    _remove_stale_temp_files(store.base_path)
    return removed


def _remove_stale_temp_files(folder: Path, older_than: float = 600.0) -> None:
    """Temp files of atomic writes left by killed workers (`.<uuid>.XXXX.tmp`)."""
    now = time.time()
    for p in folder.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > older_than:
                p.unlink()
        except OSError:
            pass
