"""Trial checkpoints in a folder (the checkpoint store), so a retried trial resumes where its
predecessor stopped. This module knows files and trials' attrs, not how trials run.

At an epoch boundary, once `every` seconds (default 60; 0 = every epoch) have passed since the
trial started or was last checkpointed, the engine writes a checkpoint, and always when a stop
signal came (the trial is queued to resume) or, with keep policy `best`, after the last epoch. The
file goes into the store atomically (a worker killed while saving leaves the previous one intact)
under a random id; the trial's user attr `checkpoint` = {artifact_id, epoch} points at it.

A retry copy (system attrs `failed_trial` / `retry_history`) resumes from the newest predecessor
in its retry history that has a checkpoint (`resume_point`).

The store: `--artifact-store s3://bucket/prefix` / env TUNER_ARTIFACT_STORE (`S3Store`, an object
storage bucket through Optuna's artifact API), else a folder (`CheckpointStore`): `--artifact-dir` /
env TUNER_ARTIFACT_DIR, else `<database>.artifacts/` beside a SQLite file, else `./tuner-artifacts`
(PostgreSQL, MySQL); see settings.py. `open_store` builds the one a worker uses. Checkpoints of
finished trials are deleted (`cleanup`); with keep policy `best` the best COMPLETE trial's stays.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, StorageError, redact
from tuner.files import atomic_write, remove_stale_temp_files
from tuner.storage import keys
from tuner.storage._optuna import BACKOFF_LOGGER

KEEP_POLICIES = ("none", "best")


def check_keep(value: str | None) -> str | None:
    if value is not None and value not in KEEP_POLICIES:
        raise ConfigError(f"unknown value {value!r} (valid: {', '.join(KEEP_POLICIES)})", key="--keep-checkpoints")
    return value


def _check_id(artifact_id: str) -> str:
    if not artifact_id or "/" in artifact_id or artifact_id.startswith("."):
        raise ValueError(f"not a checkpoint id: {artifact_id!r}")
    return artifact_id


def _new_id(trial_number: int) -> str:
    return f"checkpoint-trial-{trial_number}-{uuid.uuid4().hex[:12]}.pt"


class CheckpointBackend(Protocol):
    """What the engine and `cleanup` need of a checkpoint store (a folder, or an S3 bucket)."""

    @property
    def location(self) -> str:
        """Where the checkpoints are, for messages (no credentials)."""
        ...

    def new_id(self, trial_number: int) -> str: ...

    def write(self, artifact_id: str, source: str | Path | BinaryIO) -> None:
        """Store `source` under `artifact_id` atomically: readers see the previous checkpoint or the
        new one whole, never a part."""

    def copy_to(self, artifact_id: str, target: Path) -> None:
        """The checkpoint into the local file `target` (FileNotFoundError when there is none)."""

    def exists(self, artifact_id: str) -> bool: ...

    def remove(self, artifact_id: str) -> bool:
        """True when it was there (and is gone now)."""
        ...

    def in_use(self) -> bool:
        """False when the store cannot hold a checkpoint yet (a folder not created): nothing to clean."""
        ...

    def tidy(self) -> None:
        """Remove what killed writers left behind (a folder's temporary files)."""


class CheckpointStore:
    """A folder of checkpoint files named by id (created on the first write)."""

    def __init__(self, base_path: str | Path) -> None:
        self.base_path = Path(base_path)

    @property
    def location(self) -> str:
        return str(self.base_path)

    def path(self, artifact_id: str) -> Path:
        return self.base_path / _check_id(artifact_id)

    def new_id(self, trial_number: int) -> str:
        return _new_id(trial_number)

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

    def in_use(self) -> bool:
        return self.base_path.is_dir()

    def tidy(self) -> None:
        remove_stale_temp_files(self.base_path)


S3_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>[^\s]*))?")


def parse_s3_url(url: str, key: str = "--artifact-store") -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket[/prefix]`, the prefix without its slashes at either end
    (ConfigError naming `key`, exit 2, for anything else, such as credentials in the URL)."""
    m = S3_URL.fullmatch(url.strip())
    if m is None or ".." in (m.group("prefix") or "").split("/"):
        raise ConfigError(f"must be s3://BUCKET or s3://BUCKET/PREFIX (a bucket name: 3-63 of a-z 0-9 . -), "
                          f"got {redact(url)!r}", key=key)
    return m.group("bucket"), (m.group("prefix") or "").strip("/")


class S3Store:
    """Checkpoints as objects in an S3 bucket (AWS, MinIO, Ceph, ...) under `prefix/`, through
    Optuna's artifact API: `optuna.artifacts.Boto3ArtifactStore` wrapped in `optuna.artifacts.Backoff`
    (a failed call is retried with exponential backoff, `retries` tries, delays 0.1 s doubling up to
    `max_delay`). Workers on any machine that reach the bucket share it; no folder is shared.

    Atomic writes: a checkpoint is uploaded with one PUT (a multipart upload above 8 MiB), streamed
    from the local file (no copy in memory). S3 makes an object visible only when its upload
    completes, and an overwrite replaces it whole: a worker killed while uploading leaves the
    previous checkpoint (or none), never a partial object. A killed multipart upload leaves invisible
    parts, which a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes.

    Credentials come from boto3's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a shared
    credentials file and AWS_PROFILE, an instance role), the endpoint from AWS_ENDPOINT_URL (or the
    config file), the region from AWS_DEFAULT_REGION. Messages name `s3://bucket/prefix` only; S3
    errors become OSError (FileNotFoundError for a missing checkpoint), as a folder's would."""

    def __init__(self, url: str, *, client: Any = None, retries: int = 8, max_delay: float = 10.0) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self._secrets: list[str] = []
        if client is None:
            client = self._client()
        self.client = client
        from optuna.artifacts import Backoff, Boto3ArtifactStore  # it imports boto3 when installed: only here

        self.backend = Backoff(Boto3ArtifactStore(self.bucket, client=client, avoid_buf_copy=True),
                               max_retries=retries, max_delay=max_delay)
        _RETRY_LINES.store = self
        logging.getLogger(BACKOFF_LOGGER).addFilter(_RETRY_LINES)  # once: the same filter object

    def _client(self) -> Any:
        try:
            import boto3  # only for an s3:// store: boto3 is the optional `s3` extra
            from botocore.config import Config  # with boto3, for the same reason
        except ImportError:
            raise StorageError(f"checkpoint store {self.location}: boto3 is not installed "
                               "(pip install 'tuner[s3]')") from None
        try:
            session = boto3.session.Session()
            creds = session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                self._secrets = [v for v in (frozen.secret_key, frozen.token) if v]
            return session.client("s3", config=Config(connect_timeout=10, read_timeout=60,
                                                      retries={"max_attempts": 3, "mode": "standard"}))
        except Exception as exc:  # a malformed config or credentials file, an unknown profile, a bad endpoint
            raise StorageError(f"checkpoint store {self.location}: {self._reason(exc)}") from None

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, artifact_id: str) -> str:
        """The object key of a checkpoint: the prefix applied to its id."""
        _check_id(artifact_id)
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def new_id(self, trial_number: int) -> str:
        return _new_id(trial_number)

    def write(self, artifact_id: str, source: str | Path | BinaryIO) -> None:
        """One PUT (atomic in S3), streamed from `source` (a local file, or an open binary stream)."""
        key = self.key(artifact_id)
        with self._errors(f"writing {artifact_id}"):
            if isinstance(source, (str, Path)):
                with open(source, "rb") as fh:
                    self.backend.write(key, _kept_open(fh))
            else:
                self.backend.write(key, _kept_open(source))

    def copy_to(self, artifact_id: str, target: Path) -> None:
        key = self.key(artifact_id)
        with self._errors(f"reading {artifact_id}"):
            reader = self.backend.open_reader(key)
            try:
                with open(target, "wb") as out:
                    shutil.copyfileobj(reader, out)
            finally:
                reader.close()

    def exists(self, artifact_id: str) -> bool:
        try:
            key = self.key(artifact_id)
        except ValueError:
            return False
        with self._errors(f"looking up {artifact_id}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except Exception as exc:
                if _status(exc) == 404:
                    return False
                raise

    def remove(self, artifact_id: str) -> bool:
        if not self.exists(artifact_id):  # S3's DELETE succeeds on a missing key: ask first, for the count
            return False
        with self._errors(f"removing {artifact_id}"):
            self.backend.remove(self.key(artifact_id))
        return True

    def in_use(self) -> bool:
        return True

    def tidy(self) -> None:
        """Nothing: a killed upload leaves no object (see the class docstring)."""

    def check(self) -> None:
        """The bucket is there and these credentials reach it (a worker's first step): StorageError,
        one line and exit 1, naming `s3://bucket/prefix` and why, without the credentials."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(f"checkpoint store {self.location}: {self._reason(exc)}") from None

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """botocore's exceptions as OSError with a one-line reason (a missing object: FileNotFoundError)."""
        from optuna.artifacts.exceptions import ArtifactNotFound  # optuna.artifacts imports boto3: only here

        try:
            yield
        except ArtifactNotFound:
            raise FileNotFoundError(f"{self.location}: {doing}: no such checkpoint") from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer"):
                raise
            raise OSError(f"{self.location}: {doing}: {self._reason(exc)}") from None

    def _reason(self, exc: BaseException) -> str:
        name = type(exc).__name__
        status = _status(exc)
        if name == "NoCredentialsError":
            text = ("no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    "AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE)")
        elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            text = f"cannot reach the S3 endpoint ({exc})"
        elif status == 404:
            text = "no such bucket"
        elif status in (401, 403):
            text = f"access denied (HTTP {status}; check the credentials and the bucket's policy)"
        elif status is not None:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            text = f"S3 refused: {code or name} (HTTP {status})"
        else:
            text = f"{name}: {exc}"
        text = redact(" ".join(text.split()))
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _KeptOpen:
    """A stream for an upload that the uploader cannot close. boto3's upload_fileobj (s3transfer)
    closes its source when an upload fails (a lost connection, an unreachable endpoint); Optuna's
    Backoff then seeks the source back to 0 to try again, which raised "seek of closed file" and
    ended the worker instead of retrying. The owner closes the stream itself."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _kept_open(stream: BinaryIO) -> BinaryIO:
    """`stream` as the BinaryIO that Backoff.write takes, kept open through a failed upload."""
    return cast(BinaryIO, _KeptOpen(stream))


class _OneLineRetries(logging.Filter):
    """Backoff's log record of a failed try as one line: its message and the S3Store's reason (no
    traceback, nothing secret), not the traceback Optuna attaches."""

    store: S3Store | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and self.store is not None:
            record.msg = f"{self.store.location}: {record.getMessage()}: {self.store._reason(record.exc_info[1])}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


_RETRY_LINES = _OneLineRetries()


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def open_store(artifact_dir: str | Path, artifact_store: str | None = None) -> CheckpointBackend:
    """The checkpoint store a worker uses: the S3 bucket of `artifact_store` (checked: the bucket is
    reachable, else StorageError, exit 1), else the folder `artifact_dir`."""
    if artifact_store:
        store = S3Store(artifact_store)
        store.check()
        return store
    return CheckpointStore(artifact_dir)


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


def cleanup(store: CheckpointBackend, trials: Iterable[FrozenTrial], keep: str = "none",
            max_retry: int | None = None, also: Iterable[int] = ()) -> int:
    """Delete the checkpoint files no trial needs any more; returns how many were removed.

    Needed: those of RUNNING and WAITING trials and of their predecessors (a retry resumes from
    them) and parents (a PBT segment starts from one), of failed trials whose retry copy is still
    to be made, with keep="best" the best COMPLETE trial's, and those named in `also` (PBT
    segments a later one may still start from: pbt.needed_checkpoints). Idempotent, safe from any worker. A
    finished trial keeps its `checkpoint` attr (finished trials are read-only in Optuna); a file
    already gone costs a `stat`."""
    if not store.in_use():
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
    store.tidy()
    return removed
