"""Settings, resolved once: `resolve(flags, env, study, attrs)` turns what the user gave (a command's
flags, or `tuner.tune`'s arguments), the environment, the study file's config and the stored study's
attrs into one frozen `Settings`. Each rule below is written once, here; domain code receives the
resolved values and reads no environment variable (this module and `tuner/cli/` are the only places
that look at `os.environ`).

A command resolves at its edge: `tuner sweep` and `tuner.tune` with the study file's config, so that
bad input exits 2 (ConfigError) before anything is written; `tuner worker` with `study=None` (the study
is in the storage). A worker completes its settings once it has read the stored study
(`Settings.with_study(config, attrs)`, the same step `resolve` ends with). Local worker processes
started by `tuner sweep --workers N` receive the parent's resolved settings as JSON in their
environment (`TUNER_WORKER_SETTINGS`, with the storage URL and its password, never on a command line).

| setting | flag (`tuner.tune` argument) | environment | study file | stored study | default |
| --- | --- | --- | --- | --- | --- |
| storage URL | `--storage` (`storage=`) | `TUNER_STORAGE` (+ password file) | `storage:` | | `sqlite:///tuner.db` |
| retry bound of a storage step | | `TUNER_DB_RETRY_SECONDS` | | | 60 s |
| SQLite write-ahead log | | `TUNER_SQLITE_WAL` (0 turns it off) | | | on |
| data dir (cifar10, cifar100) | `--data-dir` (`data_dir=`) | `TUNER_DATA_DIR` | | | `$XDG_CACHE_HOME/tuner/data` |
| checkpoint store | `--artifact-dir` | `TUNER_ARTIFACT_DIR` | | | beside a SQLite file, else `./tuner-artifacts` |
| checkpoint store in S3 | `--artifact-store s3://BUCKET/PREFIX` | `TUNER_ARTIFACT_STORE` | | | none (the folder) |
| checkpoint interval | `--checkpoint-every` | `TUNER_CHECKPOINT_EVERY` | | | 60 s |
| device | `--device` (`device=`) | | | | auto |
| sampler seed offset | `--worker-index` (hidden) | | | | 0, + 1,000,003 × processes joined before |
| timeout | `--timeout` (`timeout=`) | | `timeout:` | `timeout:` of the stored config | none |
| heartbeat interval | `--heartbeat-interval` | | `heartbeat.interval` | the stored config's | 60 s |
| heartbeat grace period | | | `heartbeat.grace_period` | `tuner_grace_period`: >= 2 × every interval | 2 × interval |
| retries of a crashed trial | | | `heartbeat.max_retry` | the stored config's | 3 |
| checkpoints of finished trials | `--keep-checkpoints` | | | `tuner_checkpoints.keep` | none |
| trials per pack | `--pack` (K or auto) | | `training.pack` | the stored config's | auto (1 on a CPU) |
| local workers' GPUs | `--device cuda:N` | `CUDA_VISIBLE_DEVICES` | | | `nvidia-smi -L`, else torch |

The password file is `TUNER_STORAGE_PASSWORD_FILE` (a Docker secret: the URL's password). An S3
checkpoint store replaces the folder: `--artifact-store` and `--artifact-dir` together exit 2, as do
both variables; a flag beats the other's variable. Its credentials are boto3's (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, or AWS_SHARED_CREDENTIALS_FILE /
AWS_PROFILE), never part of the URL or the settings. Without
`XDG_CACHE_HOME` the data dir is `~/.cache/tuner/data`. The storage URL counts a study file's
`storage:` where a study file is read (`tuner sweep`, `tuner.tune`); a worker reads its study from
the storage it was given. The study-derived settings (timeout to trials per pack) are None until a
study config is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError
from tuner.storage import keys
from tuner.storage.artifacts import check_keep, parse_s3_url
from tuner.storage.database import DEFAULT_RETRY_SECONDS, DEFAULT_STORAGE, StorageURL
from tuner.study.config import Heartbeat, StudyConfig
from tuner.study.params import parse_pack

DEFAULT_CHECKPOINT_EVERY = 60.0  # seconds of training a crash may cost a trial
DEFAULT_ARTIFACT_DIR = "tuner-artifacts"
SETTINGS_ENV = "TUNER_WORKER_SETTINGS"  # a local worker process's settings, resolved by its parent (JSON)
# what a local worker process gets resolved in SETTINGS_ENV, so not again from its environment
SETTING_VARS = ("TUNER_STORAGE_PASSWORD_FILE", "TUNER_DB_RETRY_SECONDS", "TUNER_SQLITE_WAL", "TUNER_DATA_DIR",
                "TUNER_ARTIFACT_DIR", "TUNER_ARTIFACT_STORE", "TUNER_CHECKPOINT_EVERY", SETTINGS_ENV)


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


# ---------------------------------------------------------------------------------------------
# One rule per setting (resolve uses these; nothing else repeats them)
# ---------------------------------------------------------------------------------------------

def storage_url(flag: str | None, from_file: str | None = None, env: Mapping[str, str] | None = None) -> StorageURL:
    """The storage URL by precedence: flag, env TUNER_STORAGE, study file, default; with env
    TUNER_STORAGE_PASSWORD_FILE (a Docker secret) the password is read from that file."""
    e = _env(env)
    target = StorageURL.parse(flag or e.get("TUNER_STORAGE") or from_file or DEFAULT_STORAGE)
    secret = e.get("TUNER_STORAGE_PASSWORD_FILE")
    if secret:
        try:
            password = Path(secret).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the storage password file: {getattr(exc, 'strerror', None) or exc}",
                              key="TUNER_STORAGE_PASSWORD_FILE") from None
        target = target.with_password(password)
    return target


def _seconds(raw: str | float | None, key: str, default: float) -> float:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"must be a number of seconds >= 0, got {raw!r}", key=key) from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"must be a number of seconds >= 0, got {raw!r}", key=key)
    return value


def retry_seconds(env: Mapping[str, str] | None = None) -> float:
    return _seconds(_env(env).get("TUNER_DB_RETRY_SECONDS"), "TUNER_DB_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)


def checkpoint_every(flag: float | None, env: Mapping[str, str] | None = None) -> float:
    if flag is not None:
        return _seconds(flag, "--checkpoint-every", DEFAULT_CHECKPOINT_EVERY)
    return _seconds(_env(env).get("TUNER_CHECKPOINT_EVERY"), "TUNER_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY)


def artifact_dir(flag: str | Path | None, url: StorageURL, env: Mapping[str, str] | None = None) -> Path:
    """The checkpoint store: flag, env TUNER_ARTIFACT_DIR, beside a SQLite file, ./tuner-artifacts."""
    chosen = flag or _env(env).get("TUNER_ARTIFACT_DIR")
    if chosen:
        return Path(chosen)
    if url.sqlite_file is not None:
        return url.sqlite_file.with_name(url.sqlite_file.name + ".artifacts")
    return Path(DEFAULT_ARTIFACT_DIR)


def artifact_store(flag: str | None, dir_flag: str | Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The S3 checkpoint store `s3://bucket[/prefix]` (normalized), or None for the folder: flag, env
    TUNER_ARTIFACT_STORE unless `--artifact-dir` is given. Both flags, or both variables: ConfigError."""
    e = _env(env)
    if flag and dir_flag:
        raise ConfigError("cannot be combined with --artifact-dir (one checkpoint store)", key="--artifact-store")
    if dir_flag:
        return None
    chosen, key = (flag, "--artifact-store") if flag else (e.get("TUNER_ARTIFACT_STORE"), "TUNER_ARTIFACT_STORE")
    if not chosen:
        return None
    if not flag and e.get("TUNER_ARTIFACT_DIR"):
        raise ConfigError("cannot be combined with TUNER_ARTIFACT_DIR (one checkpoint store)", key=key)
    bucket, prefix = parse_s3_url(chosen, key)
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def sqlite_wal(env: Mapping[str, str] | None = None) -> bool:
    return _env(env).get("TUNER_SQLITE_WAL", "1").strip() != "0"


def pack(flag: str | int | None) -> int | str | None:
    """`--pack K|auto` checked (ConfigError, exit 2); None when not given: the worker then follows the
    study's `training.pack`, read from the storage."""
    if flag is None:
        return None
    try:
        return parse_pack(flag)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--pack") from None


def data_dir(flag: str | Path | None, env: Mapping[str, str] | None = None) -> Path:
    """The folder cifar10 and cifar100 are downloaded to: flag, env TUNER_DATA_DIR, else
    `$XDG_CACHE_HOME/tuner/data` or `~/.cache/tuner/data`."""
    e = _env(env)
    if flag:
        return Path(flag)
    if e.get("TUNER_DATA_DIR"):
        return Path(e["TUNER_DATA_DIR"])
    base = e.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tuner" / "data"


# ---------------------------------------------------------------------------------------------
# What was given, and what it resolves to
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flags:
    """What the user gave: a command's flags, or `tuner.tune`'s arguments. None: not given."""

    storage: str | None = field(default=None, repr=False)  # may hold a password
    data_dir: str | Path | None = None
    artifact_dir: str | Path | None = None
    artifact_store: str | None = None
    checkpoint_every: float | None = None
    device: str | None = None
    timeout: float | None = None
    heartbeat_interval: int | None = None
    keep_checkpoints: str | None = None
    pack: str | int | None = None
    worker_index: int | None = None


@dataclass(frozen=True)
class Settings:
    """Every setting of a command, a sweep and its workers, resolved (see the table above). The
    study-derived ones (`timeout` to `pack`) hold the flag, else the default, until `with_study`
    completes them from a study (`study_read`)."""

    storage: StorageURL = field(repr=False)  # with its password; `storage.shown` may be printed
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    sqlite_wal: bool = True
    data_dir: Path = field(default_factory=lambda: data_dir(None, {}))
    artifact_dir: Path = Path(DEFAULT_ARTIFACT_DIR)
    artifact_store: str | None = None  # s3://bucket/prefix: checkpoints there, not in artifact_dir
    checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY
    device: str = "auto"
    worker_index: int | None = None  # seeds the sampler; None: a random offset (standalone workers)
    given: Flags = field(default_factory=Flags)  # the flags, checked (for `with_study` and the stored policy)
    study_read: bool = False
    timeout: float | None = None  # seconds; None: no timeout
    heartbeat_interval: int = 60
    grace_period: int = 120
    max_retry: int = 3
    keep_checkpoints: str = "none"  # none | best
    pack: int | str = "auto"  # trials per pack (pack.py), or "auto"

    @classmethod
    def resolve(cls, storage_flag: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """For a command that needs only the storage: `resolve(Flags(storage=storage_flag), env)`."""
        return resolve(Flags(storage=storage_flag), env)

    def with_study(self, study: StudyConfig | None, attrs: Mapping[str, Any] | None = None) -> Settings:
        """The study-derived settings from the study's config (the file's, or the stored one; None:
        no study) and its stored attrs: a flag, else the study, else the default."""
        g = self.given
        hb = study.heartbeat if study is not None else Heartbeat()
        interval = g.heartbeat_interval or hb.interval
        policy = ((attrs or {}).get(keys.CHECKPOINTS) or {}).get("keep")
        return replace(self, study_read=study is not None,
                       timeout=g.timeout if g.timeout is not None else (study.timeout if study else None),
                       heartbeat_interval=interval, grace_period=hb.grace_period or 2 * interval,
                       max_retry=hb.max_retry, keep_checkpoints=g.keep_checkpoints or policy or "none",
                       pack=g.pack if g.pack is not None else (study.pack if study else "auto"))

    def describe(self) -> str:
        """One line, the password hidden (`tuner worker --debug` prints it)."""
        parts = [f"storage={self.storage.shown}"]
        parts += [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name not in ("storage", "given")]
        return " ".join(parts)

    def to_json(self) -> str:
        """For a local worker process (its environment, `SETTINGS_ENV`): the URL with its password."""
        out = asdict(self)
        out["storage"] = self.storage.url
        out["given"] = {**asdict(replace(self.given, storage=None)),
                        "data_dir": None, "artifact_dir": None, "artifact_store": None}  # resolved already
        for name in ("data_dir", "artifact_dir"):
            out[name] = str(getattr(self, name))
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        return cls(**{**raw, "storage": StorageURL.parse(raw["storage"]), "given": Flags(**raw["given"]),
                      "data_dir": Path(raw["data_dir"]), "artifact_dir": Path(raw["artifact_dir"])})


def _check(flags: Flags) -> Flags:
    """The flags' own values (ConfigError naming the flag, exit 2); `pack` parsed."""
    if flags.heartbeat_interval is not None and flags.heartbeat_interval < 1:
        raise ConfigError(f"must be >= 1, got {flags.heartbeat_interval}", key="--heartbeat-interval")
    if flags.timeout is not None and not flags.timeout > 0:
        raise ConfigError(f"must be > 0, got {flags.timeout}", key="--timeout")
    check_keep(flags.keep_checkpoints)
    return replace(flags, pack=pack(flags.pack))


def resolve(flags: Flags | None = None, env: Mapping[str, str] | None = None, study: StudyConfig | None = None,
            attrs: Mapping[str, Any] | None = None) -> Settings:
    """Every setting from the flags, the environment (None: this process's), the study file's config
    and the stored study's attrs, by the precedence of the table above. Bad input: ConfigError naming
    the flag, variable or key (exit 2). With `study=None` the study-derived settings are the flags'
    or the defaults until `Settings.with_study` completes them from a study."""
    e = _env(env)
    given = _check(flags or Flags())
    url = storage_url(given.storage, study.storage if study is not None else None, e)
    out = Settings(storage=url, retry_seconds=retry_seconds(e), sqlite_wal=sqlite_wal(e),
                   data_dir=data_dir(given.data_dir, e).expanduser(),
                   artifact_dir=artifact_dir(given.artifact_dir, url, e),
                   artifact_store=artifact_store(given.artifact_store, given.artifact_dir, e),
                   checkpoint_every=checkpoint_every(given.checkpoint_every, e), device=given.device or "auto",
                   worker_index=given.worker_index, given=replace(given, storage=None))
    return out.with_study(study, attrs)


def inherited(env: Mapping[str, str] | None = None) -> Settings | None:
    """The settings a parent resolved for this local worker process (`SETTINGS_ENV`), or None."""
    text = _env(env).get(SETTINGS_ENV)
    return Settings.from_json(text) if text else None


def child_env(settings: Settings, *, gpu: str | None = None, threads: int | None = None,
              env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a local worker process, from `env` (default: this process's): its resolved
    `settings` as JSON (`SETTINGS_ENV`) and the URL (with its password) go by environment, never on a
    command line that `ps` shows; the variables those settings came from do not (the child does not
    resolve them again); `gpu` pins it (CUDA_VISIBLE_DEVICES); `threads` sets OMP_NUM_THREADS unless
    the environment sets it already."""
    base = _env(env)
    out = {k: v for k, v in base.items() if k not in SETTING_VARS}
    out["TUNER_STORAGE"] = settings.storage.url
    out[SETTINGS_ENV] = settings.to_json()
    if gpu is not None:
        out["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None and "OMP_NUM_THREADS" not in base:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def visible_gpus_env() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def debug_env() -> bool:
    return os.environ.get("TUNER_DEBUG") == "1"
