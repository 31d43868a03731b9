"""The `tuner` command line: thin commands that parse, call one function and print.

Every user error is a `TunerError`, printed here as one line (passwords redacted), with its exit
code: 2 for usage/config errors, 1 for runtime failures. `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from functools import cache
from typing import Annotated

import typer

from tuner import __version__
from tuner.errors import TunerError, redact

# The Optuna releases tuner runs on; pyproject.toml's `optuna` dependency says the same
# (tests/test_startup.py checks that the two agree).
OPTUNA_REQUIREMENT = ">=5.0,<5.2"


@cache
def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, read from its metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def optuna_problem(found: str | None) -> str | None:
    """Why Optuna version `found` (None: not installed) cannot run tuner, as one line; None if it can.
    Development and pre-releases inside the range are accepted (5.1.0.dev0), those of its ends are not."""
    if found is not None:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            if SpecifierSet(OPTUNA_REQUIREMENT).contains(Version(found), prereleases=True):
                return None
        except InvalidVersion:
            pass
    return (f"tuner needs optuna{OPTUNA_REQUIREMENT}, found {found or 'none'} "
            f"(pip install 'optuna{OPTUNA_REQUIREMENT}')")


def _check_optuna() -> None:
    """Before anything imports Optuna: an unsupported version is one line and exit 1, not an ImportError."""
    problem = optuna_problem(installed_version("optuna"))
    if problem:
        fail(problem, 1)


def versions() -> dict[str, str]:
    """tuner's, Optuna's and torch's versions (from package metadata: torch is not imported)."""
    return {"tuner": __version__, "optuna": installed_version("optuna") or "not installed",
            "torch": installed_version("torch") or "not installed"}


app = typer.Typer(
    name="tuner",
    help="Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts contain [brackets] that are not markup
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_versions(value: bool) -> None:
    if value:
        for name, version in versions().items():
            print(f"{name} {version}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the versions of tuner, Optuna and torch, and exit.", is_eager=True,
        callback=_print_versions)] = False,
) -> None:
    """Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export."""
    import optuna  # a command runs: tuner prints its own lines, Optuna only its warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _register_commands() -> None:
    """Import the command modules; each registers its commands on `app`. They import Optuna, so
    only with a supported Optuna (otherwise `main` says so in one line)."""
    from tuner.cli import train  # noqa: F401

    for module in ("sweep", "query", "report", "bench"):
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


def fail(message: str, code: int) -> None:
    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def _ignore_signals() -> None:
    """Exiting after a signal: a further Ctrl-C/SIGTERM must not turn exit 130/143 into a traceback."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


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
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    import atexit

    if "tuner.storage.database" in sys.modules:  # a command that opened no storage need not import it now
        from tuner.storage.database import close_all

        close_all()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`tuner ... | head`)
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (tests call it in-process with `argv`; the console script is `run`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(args)
    _check_optuna()
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="tuner", standalone_mode=False)
    except TunerError as exc:
        if debug:
            traceback.print_exc()
        if getattr(exc, "signal_exit", False):  # stopped by SIGINT/SIGTERM: 130 / 143, not an error
            _ignore_signals()
            print(redact(str(exc)), file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        _ignore_signals()
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # usage errors: bad flag, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            raise SystemExit(2) from None
        if debug:
            traceback.print_exc()
        fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _ignore_signals()
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        from tuner.storage.database import is_transient, reason

        if is_transient(exc):  # a database that went away outside a worker's retried steps
            fail(f"storage: the database is unreachable ({reason(exc)})", 1)
        fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
