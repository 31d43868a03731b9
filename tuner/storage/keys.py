"""What tuner records in an Optuna study: every attr key, and the budget and lineage rules.

This module is the schema of a tuner study. It imports nothing of tuner, so every other module
can import it. Everything here reads `FrozenTrial`s through Optuna's public API.

Study user attrs
    `tuner_config`       the resolved study config (never a storage URL)
    `tuner_n_trials`     the trial budget every worker follows
    `tuner_checkpoints`  {"keep": "none" | "best"}: the checkpoint policy
    `tuner_verify:N:S`   one `tuner verify` record: trial N retrained with seed S
    `tuner_warm_start`   the warm start done when the study was created (sources, queued configs)
    `tuner_joined`       worker processes that have joined the study (seeds their samplers apart)
    `tuner_grace_period` the heartbeat grace period every worker judges stale trials by

Trial user attrs (what `tuner` writes about each trial)
    `params` `env` `history` `seconds` `epochs` `diverged` `diverged_at` `error`
    `checkpoint` `resumed_from_epoch` `resumed_from_trial` `interrupted` `void`
    `pruning_held_until_epoch` (the first epoch the pruner may judge, past the lr warm-up)
    `warm_start_study` `warm_start_trial` (a config queued by --warm-start, and where it came from)
    `stage` `stage_index` `stage_fixed` (a staged study's trial: its stage, and the values the stage
    fixed for the knobs it does not search; see stages.py)
    `pbt_member` `pbt_generation` `pbt_parent` `pbt_exploit` `pbt_knobs` `pbt_epochs` (a segment of a
    population-based study: see below and tuner/engine/pbt.py)

Trial system attrs (Optuna's retry convention, shared with `RetryFailedTrialCallback`)
    `failed_trial` `retry_history`; tuner adds `tuner_interrupted` (predecessors stopped by a signal)
    and `tuner_queued` (a token on every trial a tuner worker queued: fresh ones and retry copies);
    a staged trial also carries Optuna's `fixed_params` (what `study.enqueue_trial` writes)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from optuna.trial import FrozenTrial, TrialState, create_trial

# -- study user attrs --------------------------------------------------------------------------
CONFIG = "tuner_config"
N_TRIALS = "tuner_n_trials"
CHECKPOINTS = "tuner_checkpoints"
VERIFY_PREFIX = "tuner_verify:"  # + f"{trial}:{seed}"
VERIFY_LEGACY = "tuner_verify"  # one dict of all records (before per-record keys); still read
WARM_STARTED = "tuner_warm_start"  # {"sources": [...], "queued": [[study, trial], ...]}: warm-started once
JOINED = "tuner_joined"  # how many worker processes have joined the study (each one's sampler seed differs)
GRACE = "tuner_grace_period"  # seconds without a heartbeat before any worker fails a trial: >= 2 × every interval


# -- trial user attrs --------------------------------------------------------------------------
PARAMS = "params"  # the full params in the export format
ENV = "env"  # device, torch and optuna versions, host, worker
HISTORY = "history"  # per-epoch records, with gradient-norm statistics and clip fraction
SECONDS = "seconds"
EPOCHS = "epochs"
DIVERGED = "diverged"
DIVERGED_AT = "diverged_at"
ERROR = "error"
CHECKPOINT = "checkpoint"  # {"artifact_id": ..., "epoch": ...}
RESUMED = "resumed_from_epoch"
RESUMED_TRIAL = "resumed_from_trial"
INTERRUPTED = "interrupted"  # stopped by a signal and queued to resume
VOID = "void"  # created past the budget after a lost gate; does not count (see worker.py)
WARM_START_STUDY = "warm_start_study"  # a warm-start trial: the source study (name, or shown URL#name)
WARM_START_TRIAL = "warm_start_trial"  # idem: the source trial's number
PRUNE_HELD_UNTIL = "pruning_held_until_epoch"  # schedule-aware pruning: first epoch the pruner judges
STAGE = "stage"  # a staged study's trial: the name of its stage (stages.py); retry copies keep it
STAGE_INDEX = "stage_index"  # idem: the stage's position in `stages:`, from 0
STAGE_FIXED = "stage_fixed"  # idem: {knob: value} the stage fixed (the knobs it does not search)
# A population-based (PBT) study: each trial is one segment of one member, `interval` epochs long
PBT_MEMBER = "pbt_member"  # the member (0 .. size-1)
PBT_GENERATION = "pbt_generation"  # the segment's index in the member's run (0 .. segments-1)
PBT_PARENT = "pbt_parent"  # the trial whose end-of-segment checkpoint this segment starts from (None at generation 0)
PBT_EXPLOIT = "pbt_exploit"  # True: the parent is a top member's segment (exploit, then explore); False: its own
PBT_KNOBS = "pbt_knobs"  # {knob: value} of the mutable knobs in force during the segment (space names)
PBT_EPOCHS = "pbt_epochs"  # [first, last]: the epochs (1-based, inclusive) the segment trains

# -- trial system attrs ------------------------------------------------------------------------
FAILED_TRIAL = "failed_trial"  # Optuna's RetryFailedTrialCallback convention
RETRY_HISTORY = "retry_history"  # idem
INTERRUPTED_NUMBERS = "tuner_interrupted"
QUEUED = "tuner_queued"  # written with the WAITING trial, in the transaction that creates it
FIXED_PARAMS = "fixed_params"  # Optuna's enqueue_trial convention: `suggest` returns these values as they are

# user attrs a retry copy must not inherit from the trial it replaces
NOT_INHERITED = (CHECKPOINT, RESUMED, RESUMED_TRIAL, ERROR, SECONDS, HISTORY, EPOCHS, INTERRUPTED,
                 DIVERGED, DIVERGED_AT, VOID, PRUNE_HELD_UNTIL)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ---------------------------------------------------------------------------------------------
# Lineage and budget
# ---------------------------------------------------------------------------------------------

def history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials this one retries, oldest first ([] for a first attempt)."""
    value = trial.system_attrs.get(RETRY_HISTORY) or []
    return [int(n) for n in value] if isinstance(value, list) else []


def parent(trial: FrozenTrial) -> int | None:
    """A PBT segment's parent: the trial whose checkpoint it starts from (None: no parent)."""
    value = trial.user_attrs.get(PBT_PARENT)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def is_segment(trial: FrozenTrial) -> bool:
    """A segment of a population-based study."""
    return isinstance(trial.user_attrs.get(PBT_MEMBER), int)


def segments(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The live segments of a population-based study: retried ones replaced by their retry copy,
    void ones left out. Ordered by trial number."""
    trials = list(trials)
    gone = superseded(trials)
    return sorted((t for t in trials if is_segment(t) and t.number not in gone and not t.user_attrs.get(VOID)),
                  key=lambda t: t.number)


def lineage(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> list[FrozenTrial]:
    """The chain of segments that trained `trial`'s weights, generation 0 first, `trial` last: each
    segment's parent, back to the start (parents are COMPLETE segments, never retried)."""
    chain = [trial]
    seen = {trial.number}
    while (number := parent(chain[-1])) is not None and number in by_number and number not in seen:
        seen.add(number)
        chain.append(by_number[number])
    return chain[::-1]


def ends_run(trial: FrozenTrial) -> bool:
    """A PBT segment that is its member's last: it trained up to the run's `training.epochs`."""
    span = trial.user_attrs.get(PBT_EPOCHS)
    params = trial.user_attrs.get(PARAMS)
    training = params.get("training") if isinstance(params, dict) else None
    return (isinstance(span, list) and len(span) == 2 and isinstance(training, dict)
            and span[1] == training.get("epochs"))


def pbt_winner(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """A population-based study's winner: its best COMPLETE segment that ends its member's run."""
    return next((t for t in completed(segments(trials)) if ends_run(t)), None)


def superseded(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of trials replaced by a retry copy (the copy counts, the trial it replaces not)."""
    return {h[-1] for h in map(history, trials) if h}


def budget_used(trials: Iterable[FrozenTrial]) -> int:
    """Trials that use up the budget: all but those replaced by a retry copy and void ones."""
    trials = list(trials)
    gone = superseded(trials)
    return sum(1 for t in trials if t.number not in gone and not t.user_attrs.get(VOID))


def is_tuner_trial(trial: FrozenTrial) -> bool:
    """A trial a tuner worker queued or ran; trials of plain Optuna users are not."""
    return QUEUED in trial.system_attrs or ENV in trial.user_attrs


def crashes(trial: FrozenTrial) -> int:
    """How often this lineage crashed, counting `trial` itself; signal stops do not count."""
    stops = trial.system_attrs.get(INTERRUPTED_NUMBERS) or []
    return len(history(trial)) + 1 - len(stops) - (1 if trial.user_attrs.get(INTERRUPTED) else 0)


def needs_retry(trial: FrozenTrial, max_retry: int | None) -> bool:
    """A FAIL tuner trial that crashed (stale) or was stopped by a signal, within its retries.
    A trial whose training raised (user attr `error`) is not retried: it would fail again."""
    if trial.state != TrialState.FAIL or not is_tuner_trial(trial):
        return False
    if trial.user_attrs.get(ERROR) is not None or trial.user_attrs.get(VOID):
        return False
    if trial.user_attrs.get(INTERRUPTED):
        return True
    return max_retry is None or crashes(trial) <= max_retry


def retry_template(trial: FrozenTrial) -> FrozenTrial:
    """A WAITING copy of `trial` with Optuna's retry system attrs, for `study.add_trial`."""
    system = {k: v for k, v in trial.system_attrs.items() if not k.startswith("artifacts:")}
    system[QUEUED] = uuid.uuid4().hex
    system[FAILED_TRIAL] = trial.system_attrs.get(FAILED_TRIAL, trial.number)
    system[RETRY_HISTORY] = history(trial) + [trial.number]
    if trial.user_attrs.get(INTERRUPTED):
        system[INTERRUPTED_NUMBERS] = list(trial.system_attrs.get(INTERRUPTED_NUMBERS) or []) + [trial.number]
    user = {k: v for k, v in trial.user_attrs.items() if k not in NOT_INHERITED}
    return create_trial(state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                        user_attrs=user, system_attrs=system)


def fresh_template(token: str, user_attrs: dict[str, Any] | None = None,
                   fixed_params: dict[str, Any] | None = None) -> FrozenTrial:
    """A WAITING trial marked as queued by a tuner worker (`study.add_trial`). Nothing is fixed, unless
    `fixed_params` (a staged trial: Optuna's enqueue convention, values `suggest` returns as they are)."""
    system: dict[str, Any] = {QUEUED: token}
    if fixed_params:
        system[FIXED_PARAMS] = dict(fixed_params)
    return create_trial(state=TrialState.WAITING, params={}, distributions={}, user_attrs=dict(user_attrs or {}),
                        system_attrs=system)


# ---------------------------------------------------------------------------------------------
# Best trials
# ---------------------------------------------------------------------------------------------

def completed(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with a value, best first (ties: the earlier trial). Diverged trials are
    pruned, so never here. The objective is validation accuracy, maximised."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (-float(t.value), t.number))  # type: ignore[arg-type]


def best_complete(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The best COMPLETE trial, or None."""
    done = completed(trials)
    return done[0] if done else None


def verify_records(user_attrs: dict[str, Any]) -> dict[int, dict[int, float]]:
    """{trial number: {seed: value}} from a study's user attrs (per-record and legacy keys)."""
    out: dict[int, dict[int, float]] = {}
    legacy = user_attrs.get(VERIFY_LEGACY)
    if isinstance(legacy, dict):
        for number, entry in legacy.items():
            if isinstance(entry, dict):
                for seed, value in zip(entry.get("seeds") or [], entry.get("values") or []):
                    out.setdefault(int(number), {})[int(seed)] = float(value)
    for key, value in user_attrs.items():
        if key.startswith(VERIFY_PREFIX) and isinstance(value, (int, float)):
            try:
                number, seed = (int(p) for p in key[len(VERIFY_PREFIX):].split(":"))
            except ValueError:
                continue
            out.setdefault(number, {})[seed] = float(value)
    return out


def verify_key(number: int, seed: int) -> str:
    return f"{VERIFY_PREFIX}{number}:{seed}"
