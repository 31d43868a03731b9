"""The data dir's default, a leaf with no tuner import: `settings.resolve` uses it for every command,
the Python API and workers (which get the folder resolved), and `training/data.py` only for a library
caller that passes no folder. Kept apart so that data.py needs nothing from settings.py."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def data_dir(flag: str | Path | None, env: Mapping[str, str] | None = None) -> Path:
    """The folder cifar10 and cifar100 are downloaded to: flag, env TUNER_DATA_DIR, else
    `$XDG_CACHE_HOME/tuner/data` or `~/.cache/tuner/data`."""
    e = os.environ if env is None else env
    if flag:
        return Path(flag)
    if e.get("TUNER_DATA_DIR"):
        return Path(e["TUNER_DATA_DIR"])
    base = e.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tuner" / "data"
