"""Options shared by several commands, as typed aliases, and terminal output helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="cifar10, cifar100, synthetic, synthetic:N, imagefolder:PATH, or a path to an .npz file. "
                      "Overrides the file.")]


def _resolved_data_dir(value: Path | None) -> Path:
    """--data-dir, else TUNER_DATA_DIR, else the per-user cache dir (settings.data_dir): every command
    hands the data folder on resolved."""
    from tuner.study.settings import data_dir  # optuna (the storage URL's module): not before the version check

    return data_dir(value).expanduser()


DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Where cifar10 and cifar100 are downloaded [env TUNER_DATA_DIR; default ~/.cache/tuner/data].",
    show_default=False, callback=_resolved_data_dir)]
StorageOpt = Annotated[str | None, typer.Option(
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


def progress_bar(*, transient: bool = False):  # noqa: ANN201 - rich.progress.Progress, imported lazily
    """The one Rich progress bar tuner shows on a terminal: description, bar, done/total, elapsed."""
    from rich.progress import (  # rich's progress bars: ~20 ms, only while something runs on a terminal
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
    )

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=transient)


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table on stdout: a Rich table on a terminal, aligned plain columns otherwise."""
    if interactive():
        from rich.table import Table  # rich's tables: only for output on a terminal

        shown = Table(title=title)
        for h in headers:
            shown.add_column(h)
        for r in rows:
            shown.add_row(*r)
        console.print(shown)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
