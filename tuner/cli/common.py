"""Options shared by several commands, as typed aliases, and terminal output helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="cifar10, synthetic, synthetic:N, or a path to an .npz file. Overrides the file.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Where cifar10 is downloaded [env TUNER_DATA_DIR; default ~/.cache/tuner/data].",
    envvar="TUNER_DATA_DIR")]
StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="SQLAlchemy URL of the study database [env TUNER_STORAGE; default sqlite:///tuner.db].",
    show_default=False)]

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def interactive() -> bool:
    """Rich progress bars only on a terminal; plain lines otherwise (CI, pipes, logs)."""
    return sys.stdout.isatty()


def say(message: str) -> None:
    """One plain line on stdout, flushed (so logs interleave correctly across workers)."""
    print(message, flush=True)
