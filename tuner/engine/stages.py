"""Staged studies: `stages:` in a study file searches a few knobs at a time, in order (the Google
tuning playbook's way: lr first, then lr and β1, then ...).

    stages:
      - {name: lr, knobs: [lr], trials: 8}
      - {name: lr+beta1, knobs: [lr, one_minus_beta1], trials: 12}

**Fixed values.** Stage k searches its knobs for its number of trials; every other knob that
`space:` searches is fixed for the stage (`fixed_values`): at its value in the best COMPLETE trial
of the stages before k (a knob that trial did not sample, such as `clip_threshold` with clipping
off, at the value that trial had it fixed at), else (the first stage, or no earlier trial
completed) at Adam's default (`KNOBS`; `one_minus_betaN` from `betaN`'s) put inside the knob's
range: a number is clipped into [low, high] (and onto its `step` grid), a default that is not
among the choices becomes the first choice. Knobs `space:` fixes keep their value throughout.

**How a trial gets them.** The worker queues each fresh trial of a stage with the stage's name,
index and fixed values as user attrs (`keys.STAGE`, `STAGE_INDEX`, `STAGE_FIXED`; a retry copy
inherits them) and the fixed values also in Optuna's `fixed_params` system attr (what
`study.enqueue_trial` writes), and samples it with `optuna.samplers.PartialFixedSampler(fixed,
base)`, so the study's sampler models only the stage's knobs. A conditional knob fixed by a stage
(`clip_threshold`) applies only when it is sampled, as everywhere.

**Order.** Stage k's trials are counted like the budget (keys.budget_used: a retry copy counts
instead of the trial it replaces, void trials not). A worker creates a trial of the first stage
that is not full, and only once no trial of an earlier stage is RUNNING or WAITING (`next_stage`);
otherwise it waits (worker.py, `Worker.await_stragglers`).

**Overlapping stages** are refused when the file is loaded: two stages with the same name, a knob
listed twice in one stage, and two consecutive stages with the same knobs (the second would
search the same knobs with the same others fixed: one stage with the trials of both). Stages that
share knobs are not overlapping: re-tuning lr in every stage is the playbook's advice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError
from tuner.storage import keys
from tuner.study.space import KNOBS, Choices, Fixed, Range, SearchSpace
from tuner.study.validate import Checker


@dataclass(frozen=True)
class Stage:
    name: str
    knobs: tuple[str, ...]  # the knobs it searches, as `space:` names them
    trials: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "knobs": list(self.knobs), "trials": self.trials}


def searched(space: SearchSpace) -> list[str]:
    """The knobs `space` really samples, in file order: a range with low < high, or two or more
    choices (a range with low == high or a single choice is a fixed value)."""
    out = []
    for name, knob in space.knobs.items():
        if isinstance(knob, Range) and knob.low < knob.high:
            out.append(name)
        elif isinstance(knob, Choices) and len(knob.choices) > 1:
            out.append(name)
    return out


def total(stages: Iterable[Stage]) -> int:
    return sum(s.trials for s in stages)


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------

def parse_stages(raw: Any, space: SearchSpace, *, file: str | None) -> tuple[Stage, ...]:
    """`stages:` of a study file, checked against its space. Every problem is a ConfigError
    naming the file and the key (`stages[1].knobs[0]`)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError("must be a non-empty list of stages, each {name, knobs, trials}", file=file, key="stages")
    sampled = searched(space)
    stages: list[Stage] = []
    for i, item in enumerate(raw):
        where = f"stages[{i}]"
        c = Checker(item, file=file, prefix=where, allowed=("name", "knobs", "trials"))
        name = c.str("name", f"stage{i + 1}")
        knobs = c.raw("knobs")
        if not isinstance(knobs, list) or not knobs:
            raise c.error("knobs", f"must be a non-empty list of the knobs the stage searches, got {knobs!r}")
        for j, knob in enumerate(knobs):
            _check_knob(knob, space, sampled, file, f"{where}.knobs[{j}]")
        twice = sorted({k for k in knobs if knobs.count(k) > 1})
        if twice:
            raise c.error("knobs", f"lists {', '.join(map(repr, twice))} twice (overlapping: name each knob once)")
        if not c.has("trials"):
            raise c.error("trials", "is required (how many trials the stage runs)")
        trials = c.int("trials", None, ge=1)
        for j, other in enumerate(stages):
            if other.name == name:
                raise c.error("name", f"{name!r} is also the name of stages[{j}] (overlapping: stage names "
                                      "must be unique)")
        stage = Stage(name=name, knobs=tuple(knobs), trials=trials)
        if stages and set(stages[-1].knobs) == set(stage.knobs):
            raise c.error("knobs", f"searches the same knobs as stages[{i - 1}] ({', '.join(stage.knobs)}) right "
                                   f"after it (overlapping: merge them into one stage with trials: "
                                   f"{stages[-1].trials + stage.trials})")
        stages.append(stage)
    named = {k for s in stages for k in s.knobs}
    missing = [k for k in sampled if k not in named]
    if missing:
        raise ConfigError(f"space searches {', '.join(missing)} but no stage names "
                          f"{'it' if len(missing) == 1 else 'them'}: add {'it' if len(missing) == 1 else 'them'} "
                          "to a stage, or fix the value in space", file=file, key="stages")
    return tuple(stages)


def _check_knob(knob: Any, space: SearchSpace, sampled: list[str], file: str | None, key: str) -> None:
    known = ", ".join(sampled) or "none"
    if not isinstance(knob, str) or knob not in KNOBS:
        raise ConfigError(f"unknown knob {knob!r} (the knobs space searches: {known})", file=file, key=key)
    if knob in sampled:
        return
    spec = space.knobs.get(knob)
    if spec is None:
        for a, b in (("beta1", "one_minus_beta1"), ("beta2", "one_minus_beta2")):
            other = {a: b, b: a}.get(knob)
            if other is not None and other in sampled:
                raise ConfigError(f"{knob!r} is not in space, which searches it as {other!r}: name {other!r}",
                                  file=file, key=key)
        why = "is not in space (it keeps Adam's default there)"
    elif isinstance(spec, Fixed):
        why = f"is fixed in space ({knob}: {spec.value!r})"
    elif isinstance(spec, Range):
        why = f"is fixed in space (a range with low == high, {spec.low!r})"
    else:
        why = f"is fixed in space (a single choice, {spec.choices[0]!r})"
    raise ConfigError(f"{knob!r} {why}: a stage can only search a knob that space searches "
                      f"(a range or choices; space searches: {known})", file=file, key=key)


def check_flags(stages: tuple[Stage, ...], file: str | None, *, n_trials: int | None = None,
                warm_start: Any = None) -> None:
    """Flags a staged study refuses (exit 2, before anything is written): `--n-trials` other than the
    stages' sum, and `--warm-start`."""
    if not stages:
        return
    where = f"{file} has stages:" if file else "the study has stages:"
    if n_trials is not None and n_trials != total(stages):
        raise ConfigError(f"is {n_trials}, but {where} that add up to {total(stages)} trials; change the stages' "
                          "trials instead", key="--n-trials")
    if warm_start is not None:
        raise ConfigError(f"{where} their first stage fixes the knobs it does not search at Adam's defaults, "
                          "then at the best of the earlier stages; a warm start cannot be combined with them",
                          key="--warm-start")


# ---------------------------------------------------------------------------------------------
# The fixed-value rule
# ---------------------------------------------------------------------------------------------

def default_value(name: str, knob: Range | Choices) -> Any:
    """Adam's default for a searched knob, put inside its range (clipped, onto the step grid) or
    among its choices (else the first choice). `one_minus_betaN` defaults to 1 − betaN's default."""
    default = KNOBS[name].default
    if name.startswith("one_minus_"):
        default = round(1.0 - float(KNOBS[name[len("one_minus_"):]].default), 12)
    if isinstance(knob, Choices):
        same = [c for c in knob.choices if c == default and isinstance(c, bool) == isinstance(default, bool)]
        return same[0] if same else knob.choices[0]
    value = min(max(float(default), knob.low), knob.high)
    if knob.step is not None:
        value = min(knob.low + round((value - knob.low) / knob.step) * knob.step, knob.high)
    return value


def stage_of(trial: FrozenTrial) -> int | None:
    """The stage index a trial was queued for (user attr `stage_index`), or None."""
    value = trial.user_attrs.get(keys.STAGE_INDEX)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fixed_values(index: int, stages: tuple[Stage, ...], space: SearchSpace,
                 trials: Iterable[FrozenTrial]) -> dict[str, Any]:
    """The values stage `index` fixes: for each knob `space` searches that the stage does not, its
    value in the best COMPLETE trial of the earlier stages (or the value that trial had it fixed
    at), else `default_value`."""
    earlier = [t for t in trials if (s := stage_of(t)) is not None and s < index]
    best = keys.best_complete(earlier)
    had: dict[str, Any] = {}
    if best is not None:
        had = {**(best.user_attrs.get(keys.STAGE_FIXED) or {}), **best.params}
    out: dict[str, Any] = {}
    for name in searched(space):
        if name in stages[index].knobs:
            continue
        knob = space.knobs[name]
        assert isinstance(knob, (Range, Choices))
        out[name] = had[name] if name in had else default_value(name, knob)
    return out


# ---------------------------------------------------------------------------------------------
# Which stage a new trial is in
# ---------------------------------------------------------------------------------------------

def counts(stages: tuple[Stage, ...], trials: Iterable[FrozenTrial]) -> list[int]:
    """Trials per stage, counted like the budget (keys.budget_used)."""
    trials = list(trials)
    gone = keys.superseded(trials)
    out = [0] * len(stages)
    for t in trials:
        s = stage_of(t)
        if s is not None and 0 <= s < len(stages) and t.number not in gone and not t.user_attrs.get(keys.VOID):
            out[s] += 1
    return out


@dataclass(frozen=True)
class Next:
    """The stage of the next fresh trial. `waiting_for`: unfinished trials of earlier stages; while
    there are any, no trial of this stage may be created."""

    index: int
    stage: Stage
    fixed: dict[str, Any] = field(default_factory=dict)
    waiting_for: tuple[int, ...] = ()

    def user_attrs(self) -> dict[str, Any]:
        return {keys.STAGE: self.stage.name, keys.STAGE_INDEX: self.index, keys.STAGE_FIXED: dict(self.fixed)}


def next_stage(stages: tuple[Stage, ...], space: SearchSpace, trials: Iterable[FrozenTrial]) -> Next | None:
    """The first stage that is not full (None: every stage is), with its fixed values once every
    trial of the earlier stages has finished."""
    trials = list(trials)
    per = counts(stages, trials)
    for index, stage in enumerate(stages):
        if per[index] < stage.trials:
            break
    else:
        return None
    open_ = tuple(sorted(t.number for t in trials if (s := stage_of(t)) is not None and s < index
                         and t.state in (TrialState.RUNNING, TrialState.WAITING)))
    if open_:
        return Next(index, stage, waiting_for=open_)
    return Next(index, stage, fixed_values(index, stages, space, trials))


def over_quota(stages: tuple[Stage, ...], trials: Iterable[FrozenTrial], number: int) -> bool:
    """Whether trial `number`'s stage now has more trials than it may (two workers created one after
    a lost gate)."""
    trials = list(trials)
    mine = next((stage_of(t) for t in trials if t.number == number), None)
    if mine is None or not 0 <= mine < len(stages):
        return False
    return counts(stages, trials)[mine] > stages[mine].trials


def fixed_of(trial: FrozenTrial) -> dict[str, Any] | None:
    """The values a staged trial's stage fixed (None for a trial without a stage)."""
    if stage_of(trial) is None:
        return None
    fixed = trial.user_attrs.get(keys.STAGE_FIXED)
    return dict(fixed) if isinstance(fixed, dict) else {}


__all__ = ["Next", "Stage", "check_flags", "counts", "default_value", "fixed_of", "fixed_values", "next_stage",
           "over_quota", "parse_stages", "searched", "stage_of", "total"]
