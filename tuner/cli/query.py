"""`tuner studies`, `tuner best`, `tuner export` and `tuner dashboard`: read a study storage."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from optuna.trial import TrialState

from tuner.cli.app import app
from tuner.cli.common import Debug, StorageOpt, err_console, say, table
from tuner.cli.sweep import describe
from tuner.errors import ConfigError
from tuner.insight.export import write_export
from tuner.insight.lineage import lineage_lines, pbt_lineage
from tuner.storage import keys
from tuner.storage._optuna import study_id
from tuner.storage.database import open_storage, require_study
from tuner.study.settings import Settings

NameArg = Annotated[str, typer.Argument(help="Study name.")]


@app.command("studies")
def studies_command(storage: StorageOpt = None, debug: Debug = False) -> None:
    """List the studies in a storage: trials by state, best value, last activity."""
    url = Settings.resolve(storage).storage
    rdb = open_storage(url, must_exist=True)
    rows = []
    for s in rdb.get_all_studies():
        trials = rdb.get_all_trials(study_id(s), deepcopy=False)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        stamps = [d for t in trials for d in (t.datetime_complete, t.datetime_start) if d is not None]
        last = max(stamps).strftime("%Y-%m-%d %H:%M:%S") if stamps else "-"
        rows.append([s.study_name, str(len(trials)), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-",
                     f"{max(values):.4f}" if values else "-", last])
    if not rows:
        say(f"no studies in {url.shown}")
        return
    table("studies", ["name", "trials", "by state", "best", "last activity"], rows)


@app.command("best")
def best_command(name: NameArg, top: Annotated[int, typer.Option("--top", help="How many trials.")] = 1,
                 storage: StorageOpt = None, debug: Debug = False) -> None:
    """Show the best COMPLETE trials of a study; for a population-based study, also the winner's lineage
    (one line per segment) and the population's exploit events."""
    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--top")
    rdb = open_storage(Settings.resolve(storage).storage, must_exist=True)
    every = rdb.get_all_trials(require_study(rdb, name), deepcopy=False)
    trials = keys.completed(every)[:top]
    if not trials:
        say(f"study {name!r} has no COMPLETE trial yet")
        return
    staged = any(keys.STAGE in t.user_attrs for t in trials)  # a staged study: which stage found it
    table(f"best of {name}", ["rank", "trial", "val_acc", *(["stage"] if staged else []), "params"],
           [[str(i + 1), str(t.number), f"{t.value:.4f}", *([str(t.user_attrs.get(keys.STAGE, "-"))] if staged else []),
             describe(t.user_attrs.get(keys.PARAMS))] for i, t in enumerate(trials)])
    lineage = pbt_lineage(every)  # a population-based study: the winner's lineage and the exploit events
    if lineage is not None:
        for line in lineage_lines(lineage):
            say(line)


@app.command("export")
def export_command(name: NameArg,
                   output: Annotated[Path | None,
                                     typer.Option("-o", "--output", help="Write here (else stdout).")] = None,
                   storage: StorageOpt = None, debug: Debug = False) -> None:
    """Write the best trial's params as YAML that `tuner train` and plain PyTorch read."""
    rdb = open_storage(Settings.resolve(storage).storage, must_exist=True)
    text = write_export(rdb, name, output)
    if output is None:
        print(text, end="")
    else:
        err_console.print(f"wrote {output}")


@app.command("dashboard")
def dashboard_command(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="Bind address; it has no authentication.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    debug: Debug = False,
) -> None:
    """Serve optuna-dashboard on the same storage (localhost only unless --host says otherwise).
    Before it starts, each tuner study gets its metric name, a note and tuner's panels."""
    import optuna_dashboard  # optuna_dashboard: its server (bottle) only for `tuner dashboard`, not every start-up

    if not 0 < port < 65536:
        raise ConfigError(f"must be 1..65535, got {port}", key="--port")
    url = Settings.resolve(storage).storage
    rdb = open_storage(url, must_exist=True)
    if not _is_loopback(host):
        err_console.print(f"warning: binding the dashboard to {host}: it has no authentication, "
                          "anyone who can reach this port can read and change the studies")
    _publish_all(rdb)
    say(f"optuna-dashboard for {url.shown} at http://{host}:{port}/dashboard/  (Ctrl-C to stop)")
    optuna_dashboard.run_server(rdb, host=host, port=port)


def _publish_all(rdb) -> None:  # noqa: ANN001
    try:
        from tuner.insight.dashboard import publish  # optuna_dashboard, report panels: `tuner dashboard` only
    except ImportError:
        return
    for s in rdb.get_all_studies():
        if keys.CONFIG in s.user_attrs:
            try:
                publish(rdb, s.study_name)
            except Exception as exc:  # noqa: BLE001 - the dashboard still serves Optuna's own views
                err_console.print(f"warning: study {s.study_name}: tuner panels not written: {exc}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
