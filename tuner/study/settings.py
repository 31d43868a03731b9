"""Settings, resolved once at the CLI edge: a flag, else the environment, else the study file,
else the default. Domain code receives the resolved values and reads no environment variable;
this module and `tuner/cli/` are the only places that look at `os.environ`.

| setting | flag | environment | study file | default |
| --- | --- | --- | --- | --- |
| storage URL | `--storage` | `TUNER_STORAGE` (+ `TUNER_STORAGE_PASSWORD_FILE`) | `storage:` | `sqlite:///tuner.db` |
| retry bound of a storage step | | `TUNER_DB_RETRY_SECONDS` | | 60 s |
| checkpoint interval | `--checkpoint-every` | `TUNER_CHECKPOINT_EVERY` | | 60 s |
| checkpoint store | `--artifact-dir` | `TUNER_ARTIFACT_DIR` | | beside a SQLite file, else `./tuner-artifacts` |
| SQLite write-ahead log | | `TUNER_SQLITE_WAL` (0 turns it off) | | on |
| data dir (cifar10) | `--data-dir` | `TUNER_DATA_DIR` | | `$XDG_CACHE_HOME/tuner/data` or `~/.cache/tuner/data` |
| timeout, heartbeat | `--timeout`, `--heartbeat-interval` | | `timeout:`, `heartbeat:` | none, 60 s |
| local workers' GPUs | `--device cuda:N` | `CUDA_VISIBLE_DEVICES` | | `nvidia-smi -L`, else torch |
| trials per pack | `--pack` (K or auto) | | `training.pack` | auto (1 on a CPU) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import ConfigError
from tuner.storage.database import DEFAULT_RETRY_SECONDS, DEFAULT_STORAGE, StorageURL

DEFAULT_CHECKPOINT_EVERY = 60.0  # seconds of training a crash may cost a trial
DEFAULT_ARTIFACT_DIR = "tuner-artifacts"


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


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


def sqlite_wal(env: Mapping[str, str] | None = None) -> bool:
    return _env(env).get("TUNER_SQLITE_WAL", "1").strip() != "0"


def pack(flag: str | None) -> int | str | None:
    """`--pack K|auto` checked (ConfigError, exit 2); None when not given: the worker then follows the
    study's `training.pack`, read from the storage."""
    if flag is None:
        return None
    from tuner.study.params import parse_pack

    try:
        return parse_pack(flag)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--pack") from None


def data_dir(flag: str | Path | None, env: Mapping[str, str] | None = None) -> Path:
    e = _env(env)
    if flag:
        return Path(flag)
    if e.get("TUNER_DATA_DIR"):
        return Path(e["TUNER_DATA_DIR"])
    base = e.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tuner" / "data"


@dataclass(frozen=True)
class Settings:
    """What a command needs from the environment, resolved once (see the table above)."""

    storage: StorageURL
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    sqlite_wal: bool = True

    @classmethod
    def resolve(cls, storage_flag: str | None = None, from_file: str | None = None,
                env: Mapping[str, str] | None = None) -> Settings:
        return cls(storage=storage_url(storage_flag, from_file, env), retry_seconds=retry_seconds(env),
                   sqlite_wal=sqlite_wal(env))


def child_env(url: StorageURL, *, gpu: str | None = None, threads: int | None = None,
              env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a local worker process, from `env` (default: this process's): the URL (with
    its password) goes by environment, never on a command line that `ps` shows; `gpu` pins it
    (CUDA_VISIBLE_DEVICES); `threads` sets OMP_NUM_THREADS unless the environment sets it already."""
    base = _env(env)
    out = {**base, "TUNER_STORAGE": url.url}
    out.pop("TUNER_STORAGE_PASSWORD_FILE", None)  # the URL has the password already
    if gpu is not None:
        out["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None and "OMP_NUM_THREADS" not in base:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def visible_gpus_env() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def debug_env() -> bool:
    return os.environ.get("TUNER_DEBUG") == "1"
