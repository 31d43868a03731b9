"""The `tuner` command line: thin commands that parse, call one function and print.

Every user error is a `TunerError`, printed here as one line (passwords redacted), with its exit
code: 2 for usage/config errors, 1 for runtime failures. `--debug` shows the traceback. SIGINT
and SIGTERM stop any command with exit 130 / 143 and one line (tuner/cli/signals.py).

The Typer `app` lives in tuner/cli/app.py; the command modules register their commands on it and
are imported here.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import typer

from tuner.cli.app import app
from tuner.cli.signals import CommandSignals, stopped_message
from tuner.cli.versions import OPTUNA_REQUIREMENT, installed_version, optuna_problem, versions
from tuner.errors import TunerError, redact

__all__ = ["OPTUNA_REQUIREMENT", "app", "installed_version", "main", "optuna_problem", "run", "versions"]


def _check_optuna() -> None:
    """Before anything imports Optuna: an unsupported version is one line and exit 1, not an ImportError."""
    problem = optuna_problem(installed_version("optuna"))
    if problem:
        fail(problem, 1)


def _register_commands() -> None:
    """Import the command modules; each registers its commands on `app` (tuner.cli.app). They
    import Optuna, so only with a supported Optuna (otherwise `main` says so in one line)."""
    for module in ("train", "sweep", "query", "report", "bench"):
        try:
            __import__(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # a command group not written yet
            if exc.name != f"{__name__}.{module}":
                raise


if optuna_problem(installed_version("optuna")) is None:
    _register_commands()


def _debug(argv: Sequence[str]) -> bool:
    """Tracebacks on: `--debug` among the arguments this command line was given, or env TUNER_DEBUG=1."""
    return "--debug" in argv or os.environ.get("TUNER_DEBUG") == "1"


def fail(message: str, code: int) -> NoReturn:
    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def run() -> None:
    """The console script: `main`, then a fast exit.

    With torch and its compiler stack loaded, finalising the interpreter (garbage-collecting
    thousands of module objects) takes about a second, once per `tuner` process; a sweep worker
    pays it at the end of its last trial. Here the exit handlers run and the storages close as
    usual, then the process ends without that teardown. When a non-daemon thread is still alive,
    the normal exit waits for it instead."""
    code: int | str | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = int(code or 0)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    if "tuner.storage.database" in sys.modules:  # a command that opened no storage need not import it now
        from tuner.storage.database import close_all  # only if loaded: it imports Optuna, maybe the refused one

        close_all()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`tuner ... | head`)
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (tests call it in-process with `argv`; the console script is `run`).

    Exits 0 when done, 1 on a runtime failure, 2 on bad input, 128 + the signal's number when
    SIGINT or SIGTERM stopped the command (130, 143), each failure with one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(args)
    _check_optuna()
    command = typer.main.get_command(app)
    with CommandSignals() as signals:
        code = _invoke(command, args, debug, signals)
        if signals.signum is not None or code == 130:  # typer returns a KeyboardInterrupt as 130
            _stopped(signals)
        if code:
            raise SystemExit(code)


def _stopped(signals: CommandSignals, message: str | None = None, code: int | None = None) -> NoReturn:
    """Stopped by a signal: one line (the worker's own, or which signal it was) and 128 + its number."""
    signals.stopping()
    signum = signals.signum or signal.SIGINT
    print(redact(message or stopped_message(signum)), file=sys.stderr, flush=True)
    raise SystemExit(code or 128 + signum)


def _invoke(command: Any, args: list[str], debug: bool, signals: CommandSignals) -> int:
    """Run the command; returns its exit code (an int it returned, a `typer.Exit`'s code, or 130
    for a KeyboardInterrupt, which typer turns into a returned 130 with standalone_mode=False)."""
    try:
        returned = command.main(args=args, prog_name="tuner", standalone_mode=False)
    except TunerError as exc:
        if debug:
            traceback.print_exc()
        if getattr(exc, "signal_exit", False):  # a worker stopped by SIGINT/SIGTERM: its own line, 130 / 143
            _stopped(signals, str(exc), exc.exit_code)
        if signals.signum is not None:  # a failure caused by the interruption
            _stopped(signals)
        fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:  # end of input at a prompt
        _stopped(signals, "interrupted", 130)
    except typer.TyperException as exc:  # usage errors: bad flag, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            raise SystemExit(2) from None
        if debug:
            traceback.print_exc()
        fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _stopped(signals)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        if signals.signum is not None:  # a failure caused by the interruption
            _stopped(signals)
        from tuner.storage.database import is_transient, reason  # it imports Optuna: only after its version check

        if is_transient(exc):  # a database that went away outside a worker's retried steps
            fail(f"storage: the database is unreachable ({reason(exc)})", 1)
        fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
    if isinstance(returned, bool) or not isinstance(returned, int):  # a command's return value is not a code
        return 0
    return returned
