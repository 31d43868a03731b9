"""Fault handling for workers: retry copies of crashed or interrupted trials, the zombie reaper,
and graceful stops on SIGINT/SIGTERM.

- A trial whose worker died (kill -9, OOM, lost machine) stays RUNNING with an old heartbeat, or
  none. `reap()` fails it and queues a WAITING retry copy (same params; system attrs
  `failed_trial` / `retry_history` as Optuna's RetryHeartbeatStaleTrialCallback writes them); the
  copy resumes from the last checkpoint of its predecessors (see `artifacts.Checkpointer`).
  Workers reap when they start, before each trial (Optuna), and every heartbeat interval in a
  background thread.
- The first SIGINT/SIGTERM stops taking trials; the running trial ends at its next epoch boundary
  with a checkpoint, gets a retry copy (marked `tuner_interrupted`, not counted against
  `max_retry`) and is told FAIL. The worker then exits 128+signal (130, 143). A second signal
  aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import TunerError
from .resilient import CLAIM_ATTR, INTERRUPTED_ATTR, TOKEN_ATTR, DuplicateRetry

# user attrs of a failed trial that its retry copy must not inherit
DROP_USER_ATTRS = ("checkpoint", "resumed_from_epoch", "resumed_from_trial", "error", "seconds", "history",
                   "epochs", "interrupted")


class GracefulStop(Exception):
    """Raised at an epoch boundary after a stop signal; the trial has been queued to resume."""


class Interrupted(TunerError):
    """The worker stopped on a signal. Exit code 128 + signal number (130 SIGINT, 143 SIGTERM)."""

    signal_exit = True  # the CLI prints the message as is, not as "error: ..."

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def retry_template(trial: FrozenTrial, *, interrupted: bool = False) -> FrozenTrial:
    """A WAITING copy of `trial` with Optuna's retry system attrs (`failed_trial`, `retry_history`)."""
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    system = {k: v for k, v in trial.system_attrs.items()
              if not k.startswith("artifacts:") and k not in (TOKEN_ATTR, CLAIM_ATTR)}
    system["failed_trial"] = trial.system_attrs.get("failed_trial", trial.number)
    system["retry_history"] = history
    if interrupted:
        system[INTERRUPTED_ATTR] = list(trial.system_attrs.get(INTERRUPTED_ATTR, [])) + [trial.number]
    user = {k: v for k, v in trial.user_attrs.items() if k not in DROP_USER_ATTRS}
    return optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                     distributions=trial.distributions, user_attrs=user, system_attrs=system)


def queue_retry(study: optuna.Study, trial: FrozenTrial, *, interrupted: bool = False) -> bool:
    """Add the retry copy of `trial` unless one exists. True if this call added it."""
    try:
        study._storage.create_new_trial(study._study_id, template_trial=retry_template(trial, interrupted=interrupted))
    except DuplicateRetry:
        return False
    return True


class ResumeRetryCallback(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """RetryHeartbeatStaleTrialCallback that adds a copy at most once per failed trial, drops the
    failed trial's checkpoint attrs from the copy, and does not count signal stops as retries."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        crashes = len(trial.system_attrs.get("retry_history", [])) + 1 - len(trial.system_attrs.get(INTERRUPTED_ATTR, []))
        if self._max_retry is not None and crashes > self._max_retry:
            return
        queue_retry(study, trial)


def reap(study: optuna.Study) -> None:
    """Fail stale RUNNING trials of the study and queue their retries (see storage's staleness rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


class Reaper:
    """Reaps stale trials every `interval` seconds in a daemon thread until stopped."""

    def __init__(self, study: optuna.Study, interval: float) -> None:
        self.study = study
        self.interval = max(0.5, float(interval))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuner-reaper", daemon=True)

    def start(self) -> "Reaper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reap(self.study)
            except Exception:  # noqa: BLE001 - the main thread reports a dead database
                if getattr(self.study._storage, "_backend", None) is not None and \
                        getattr(self.study._storage._backend, "gave_up", False):
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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

    def install(self) -> "StopController":
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
        name = signal.Signals(self.signum).name
        queued = ", ".join(map(str, self.interrupted))
        tail = (f"trial {queued} will resume from its checkpoint" if len(self.interrupted) == 1 else
                f"trials {queued} will resume from their checkpoints") if self.interrupted else "no trial was running"
        raise Interrupted(f"interrupted by {name}: {tail} on the next `tuner sweep` or `tuner worker`", self.signum)
