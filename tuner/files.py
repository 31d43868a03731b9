"""Atomic file writes: a temporary file in the same folder, fsync, then a rename. A process killed
while writing leaves the previous file (or none) in place, never half of a new one."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, data: bytes | str | BinaryIO, *, mode: int = 0o644) -> Path:
    """Write `data` (bytes, text as UTF-8, or a binary stream) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                shutil.copyfileobj(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; a dashboard may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | Path, older_than: float = 600.0) -> None:
    """Temp files of atomic writes that killed processes left behind (`.<name>.XXXX.tmp`)."""
    now = time.time()
    for p in Path(folder).glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > older_than:
                p.unlink()
        except OSError:
            pass
