"""SIGINT and SIGTERM while a command runs: both stop it, and the process exits 128 + the signal's
number (130, 143) with one line on stderr, as README's exit-code table says.

Python turns SIGINT into KeyboardInterrupt and leaves SIGTERM to end the process at once (no
`finally`, no exit code of its own). While a command runs, both raise KeyboardInterrupt in the
main thread and the signal is remembered, so `tuner.cli.main` knows which one stopped it; a
signal whose handler was SIG_IGN when tuner started (`nohup`, `cmd &` in a script) stays ignored.
A sweep worker installs its own graceful handlers (tuner.engine.faults.StopController) on top.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOST_SIGNAL_GRACE_S = 0.5  # after a KeyboardInterrupt was lost in a finalizer: time for other threads' output
LOST_SIGNAL_S = 10.0  # seconds a command may take to unwind after a signal before the process exits anyway


def stopped_message(signum: int) -> str:
    """The line printed when a signal stopped a command outside a worker."""
    return f"interrupted by {signal.Signals(signum).name}"


def _exit_on(signum: int) -> None:
    print(stopped_message(signum), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def ignore_signals() -> None:
    """Exiting after a signal: a further Ctrl-C/SIGTERM must not turn exit 130/143 into a traceback."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class CommandSignals:
    """While a command runs (a context manager): SIGINT and SIGTERM raise KeyboardInterrupt, and
    `signum` is the first one received. On leaving, the previous handlers come back, unless the
    command is stopping on a signal (`stopping()`): then further signals are ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._stopping = False
        self._old_hook = sys.unraisablehook

    def __enter__(self) -> CommandSignals:
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN or old is None:  # ignored by whoever started us, or not Python's
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            # a KeyboardInterrupt raised while the interpreter runs a finalizer (a weakref callback,
            # __del__) is lost (seen with optuna-dashboard's server loop): `_unraisable` sees that; and
            # should the process still run after LOST_SIGNAL_S for any other reason, it exits anyway
            watchdog = threading.Timer(LOST_SIGNAL_S, _exit_on, (signum,))
            watchdog.daemon = True
            watchdog.start()
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        """A KeyboardInterrupt raised while a finalizer ran is lost (Python would print "Exception
        ignored" and go on): the command cannot be unwound from here, so the process exits with the
        signal's code and line shortly (a signal delivered again could land in a finalizer too)."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.signum is not None:
            threading.Timer(LOST_SIGNAL_GRACE_S, _exit_on, (self.signum,)).start()
            return
        self._old_hook(unraisable)

    def stopping(self) -> None:
        """The command stops on a signal: ignore any further one until the process has exited."""
        self._stopping = True
        ignore_signals()

    def __exit__(self, *exc: object) -> None:
        sys.unraisablehook = self._old_hook
        if not self._stopping:
            for sig, old in self._old.items():
                signal.signal(sig, old)
        self._old.clear()
