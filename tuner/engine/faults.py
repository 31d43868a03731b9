"""Graceful stops on SIGINT/SIGTERM for one worker process.

The first SIGINT/SIGTERM stops taking trials; a running trial ends at its next epoch boundary with
a checkpoint, is marked `interrupted`, told FAIL and gets a retry copy (not counted against
`max_retry`). The worker then exits 128+signal (130, 143). A second signal aborts at once
(KeyboardInterrupt); the trial is still queued to resume, best effort.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from tuner.errors import TunerError


class GracefulStop(Exception):
    """Raised at an epoch boundary after a stop signal, once the trial's checkpoint is saved."""


class Interrupted(TunerError):
    """The worker stopped on a signal. Exit code 128 + signal number (130 SIGINT, 143 SIGTERM)."""

    signal_exit = True  # the CLI prints the message as is, not as "error: ..."

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopController:
    """SIGINT/SIGTERM handling for one worker process. The first signal asks for a graceful stop;
    a second one raises KeyboardInterrupt (abort). Only the main thread can install handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self._old: dict[int, Any] = {}
        self.interrupted: list[int] = []  # trials stopped at an epoch boundary and queued to resume

    @property
    def stop_requested(self) -> bool:
        return self.event.is_set()

    def install(self) -> StopController:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self.event.set()
            print(f"received {signal.Signals(signum).name}: stopping after the current epoch "
                  "(send it again to abort)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def raise_if_stopped(self) -> None:
        if self.signum is None:
            return
        raise Interrupted(stop_message(self.signum, self.interrupted), self.signum)


def stop_message(signum: int, interrupted: list[int]) -> str:
    """The line a worker stopped by signal `signum` prints: which trials (`interrupted`, stopped at
    an epoch boundary and queued) resume on the next run, or that none was running."""
    name = signal.Signals(signum).name
    if not interrupted:
        return f"interrupted by {name}: no trial was running, so none is left to resume"
    numbers = [str(n) for n in interrupted]
    listed = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
    which = (f"trial {listed} will resume from its checkpoint" if len(numbers) == 1
             else f"trials {listed} will resume from their checkpoints")
    return f"interrupted by {name}: {which} on the next `tuner sweep` or `tuner worker`"
