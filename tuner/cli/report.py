"""`tuner report`, `tuner compare` and `tuner verify`: look at studies and check their winners."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli.app import app
from tuner.cli.common import (
    DataDirOpt,
    Debug,
    DeviceOpt,
    StorageOpt,
    err_console,
    interactive,
    progress_bar,
    say,
    table,
)
from tuner.errors import ConfigError
from tuner.insight.export import choose_best
from tuner.storage.database import open_storage
from tuner.study.settings import Settings

NameArg = Annotated[str, typer.Argument(help="Study name.")]


@app.command("report")
def report_command(
    name: NameArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")] = Path("report.html"),
    top: Annotated[int, typer.Option("--top", help="How many configs in the top-k table.")] = 10,
    storage: StorageOpt = None,
    debug: Debug = False,
) -> None:
    """Write one self-contained HTML report of a study (plots work offline)."""
    from tuner.insight.report import write_report  # the report package (~30 ms): only for `tuner report`

    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--top")
    url = Settings.resolve(storage).storage
    data = write_report(open_storage(url, must_exist=True), name, output, top=top, url=url.url)
    counts = ", ".join(f"{v} {k}" for k, v in data.counts.items() if v) or "no trials"
    say(f"wrote {output} ({name}: {counts})")


@app.command("compare")
def compare_command(
    names: Annotated[list[str], typer.Argument(help="Two or more study names.", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Also write an HTML comparison here.")] = None,
    storage: StorageOpt = None,
    debug: Debug = False,
) -> None:
    """Compare studies side by side: trials, best value, top-5 median, time to 95% of the best."""
    from tuner.insight.compare import load_compare, table_rows, write_compare  # ~30 ms: only for `tuner compare`

    if len(names) < 2:
        raise ConfigError("give at least two study names to compare", key="NAMES")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"study {dupes[0]!r} is given more than once", key="NAMES")
    info = load_compare(open_storage(Settings.resolve(storage).storage, must_exist=True), list(names))
    headers, rows = table_rows(info)
    table("compare", headers, rows)
    if output is not None:
        write_compare(info, output)
        err_console.print(f"wrote {output}")


@app.command("verify")
def verify_command(
    name: NameArg,
    top: Annotated[int, typer.Option("--top", help="Verify the configs of the K best COMPLETE trials.")] = 3,
    seeds: Annotated[int, typer.Option("--seeds", help="New seeds per config (1000, 1001, ...).")] = 3,
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    debug: Debug = False,
) -> None:
    """Retrain the top configs with new seeds at the full budget; `tuner export` then picks the best mean.

    Each run is stored as it finishes: run again after an interruption to continue."""
    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--top")
    if seeds < 1:
        raise ConfigError(f"must be >= 1, got {seeds}", key="--seeds")
    from tuner.insight import verify  # retraining (statistics, params checks): only for `tuner verify`

    rdb = open_storage(Settings.resolve(storage).storage, must_exist=True)
    bar = None
    task = None

    def on_start(todo: int, skipped: int) -> None:
        nonlocal bar, task
        msg = f"verify {name}: top {top} configs × {seeds} seeds, {todo} runs to do"
        say(msg + (f" ({skipped} already stored)" if skipped else ""))
        if interactive() and todo:
            bar = progress_bar()
            bar.__enter__()
            task = bar.add_task("runs", total=todo)

    def on_run(r: verify.Run) -> None:
        line = (f"run {r.index}/{r.total}  trial {r.trial:>3}  seed {r.seed}  "
                + ("DIVERGED (counts as 0)" if r.diverged else f"val_acc {r.value:.4f}")
                + (f"  test_acc {r.test_value:.4f}" if r.test_value is not None else "") + f"  {r.seconds:.1f}s")
        if bar is not None:
            bar.console.print(line)
            bar.update(task, advance=1, description=f"trial {r.trial} seed {r.seed}")
        else:
            say(line)

    try:
        result = verify.run_verify(rdb, name, top=top, n_seeds=seeds, device=device,
                            data_dir=str(data_dir) if data_dir else None, on_run=on_run, on_start=on_start)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    best, block = choose_best(rdb, name)
    rows = []
    for r in result.rows:
        e = r.entry or {}
        tests = [v for v in e.get("test_values") or [] if v is not None]
        rows.append([str(r.trial), f"{r.single:.4f}",
                     f"{e['mean']:.4f} ± {e['std']:.4f}" if e.get("n") else "–", str(e.get("n", 0)),
                     f"{sum(tests) / len(tests):.4f}" if tests else "–",
                     "export" if r.trial == best.number else ""])
    table(f"verify {name}", ["trial", "single run", "mean ± std", "n", "test mean", "pick"], rows)
    say(f"tuner export picks trial {best.number} ({block['selected_by']})")
