"""The `tuner` command line: thin commands that parse, call one function and print.

Every user error is a `TunerError`, printed here as one line (passwords redacted), with its exit
code: 2 for usage/config errors, 1 for runtime failures. `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from ..errors import TunerError, redact

app = typer.Typer(
    name="tuner",
    help="Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts contain [brackets] that are not markup
    context_settings={"help_option_names": ["-h", "--help"]},
)



@app.callback()
def _root() -> None:
    """Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export."""


from . import train as _train  # noqa: E402,F401  (registers its commands on `app`)

for _module in ("sweep", "query", "report", "bench"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # a command group not written yet
        if _exc.name != f"{__name__}.{_module}":
            raise


def _debug() -> bool:
    return "--debug" in sys.argv[1:] or os.environ.get("TUNER_DEBUG") == "1"


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

    from ..storage import close_all

    close_all()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`tuner ... | head`)
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """The command line (tests call it in-process; the console script is `run`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tuner prints its own lines
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="tuner", standalone_mode=False)
    except TunerError as exc:
        if _debug():
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
        if _debug():
            traceback.print_exc()
        fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _ignore_signals()
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if _debug():
            traceback.print_exc()
        fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
