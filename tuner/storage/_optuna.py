"""The only module that names private Optuna attributes. Each use, and why:

- `Trial._trial_id` / `FrozenTrial._trial_id`: the storage id of a trial, which the heartbeat
  (`storage.record_heartbeat(trial_id)`, public) needs. Optuna has no public accessor; the public
  lookup, `storage.get_trial_id_from_study_id_trial_number`, costs a query per trial.
  optuna-dashboard reads the same attribute.
- `Study._study_id`: the storage id of a study, for the storage calls that take one. The public
  lookup, `storage.get_study_id_from_name`, costs a query; optuna-dashboard reads it too.
- `FrozenStudy._study_id`: the same, for `storage.get_all_studies()` (`tuner studies`).
- the logger `optuna.artifacts._backoff`: where `optuna.artifacts.Backoff` logs each failed try of
  the S3 checkpoint store, with a traceback; `S3Store` filters its records down to one line. The
  module's name is its logger's name; Optuna offers no public handle on it.

tests/test_private_names.py fails if any other module of the package names a private Optuna
attribute or module.
"""

from __future__ import annotations

from typing import Any

BACKOFF_LOGGER = "optuna.artifacts._backoff"  # the logger of optuna.artifacts.Backoff (its module's name)


def trial_id(trial: Any) -> int:
    """The storage id of an `optuna.Trial` or `FrozenTrial`."""
    return int(trial._trial_id)


def study_id(study: Any) -> int:
    """The storage id of an `optuna.Study` or `FrozenStudy`."""
    return int(study._study_id)
