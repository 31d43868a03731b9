"""Population-based training (Jaderberg et al. 2017) on the study database, asynchronous as in Ray Tune.

A population of `size` members trains side by side; each member's run is cut into segments of
`interval` epochs, and each segment is one Optuna trial (user attrs in keys.py: member, generation,
parent, exploit, knobs, epochs). With the budget gate held, a worker that has nothing to run asks
`plan` for the next segment:

1. Generation 0: until every member has started, a fresh segment for the next member, sampled by
   the study's sampler.
2. Else the least advanced member whose latest segment has ended (COMPLETE; diverged or failed
   ones count as the worst result) and is not its last. It is ranked among the members that have
   finished the *same* generation so far (no barrier: whoever is there; the same generation, so a
   member that trained longer is not preferred for that alone, and every member runs exactly its
   segments). If it is in the bottom `quantile` (Ray's rule: ceil(k × quantile) of k, at most
   half), it **exploits**: its next segment starts from a top-quantile member's end-of-segment
   checkpoint (weights, optimizer state, data order), picked at random, and **explores**: each
   mutable knob is multiplied by one of `perturb`, or with `resample_probability` drawn afresh
   from its range (clipped to the range); with `explore: sampler` the study's sampler proposes the
   mutable knobs instead, conditioned on every finished segment, while the rest stay the parent's.
   Otherwise it continues from its own checkpoint with the same values.

The new segment is a trial made with Optuna's `fixed_params` convention (what `enqueue_trial`
writes), so every knob it does not explore is what its parent trained with. Random choices are
seeded by (study seed, member, generation): two workers planning the same segment would agree.
Only one does, under the gate.

The budget is exact: size × segments trials, counted like any study's (`tuner_n_trials`). A
segment whose worker died is failed by the heartbeat rule and retried like any trial; its retry
resumes from its own last checkpoint, else from its parent's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError
from tuner.storage import keys
from tuner.study.config import StudyConfig
from tuner.study.population import Population
from tuner.study.space import Range, SearchSpace

WORST = float("-inf")


@dataclass(frozen=True)
class Plan:
    """The next segment to create: its user attrs, the knob values it is given (None: sampled),
    and the trial whose checkpoint it starts from."""

    user_attrs: dict[str, Any]
    fixed: dict[str, Any] | None
    parent: int | None


def generation(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(keys.PBT_GENERATION, 0))


def member(t: FrozenTrial) -> int:
    return int(t.user_attrs[keys.PBT_MEMBER])


def ended(t: FrozenTrial) -> bool:
    """A segment that will not run again: COMPLETE, diverged (PRUNED), or failed for good."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get(keys.ERROR) is not None


def score(t: FrozenTrial) -> float:
    return float(t.value) if t.state == TrialState.COMPLETE and t.value is not None else WORST


def usable(t: FrozenTrial) -> bool:
    """A segment another may start from: COMPLETE, with its end-of-segment checkpoint."""
    return t.state == TrialState.COMPLETE and isinstance(t.user_attrs.get(keys.CHECKPOINT), dict)


def segment_attrs(pop: Population, epochs: int, who: int, gen: int, parent: int | None,
                  exploit: bool) -> dict[str, Any]:
    return {keys.PBT_MEMBER: who, keys.PBT_GENERATION: gen, keys.PBT_PARENT: parent, keys.PBT_EXPLOIT: exploit,
            keys.PBT_EPOCHS: list(pop.span(gen, epochs))}


def quantiles(peers: list[FrozenTrial], quantile: float) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """(bottom, top) of one generation's ended segments, worst first: ceil(k × quantile) each, at
    most half of k (Ray Tune's rule); ties go by trial number, the earlier counts as better."""
    ranked = sorted(peers, key=lambda t: (score(t), -t.number))
    n = min(math.ceil(len(ranked) * quantile), len(ranked) // 2)
    return ranked[:n], (ranked[-n:] if n else [])


def plan(config: StudyConfig, trials: list[FrozenTrial]) -> Plan | None:
    """The next segment of the population, or None when none can start now (members still train,
    or every segment exists)."""
    pop = config.population
    assert pop is not None
    epochs = config.training.epochs
    last_gen = pop.segments(epochs) - 1
    segs = keys.segments(trials)
    started = {member(t) for t in segs if generation(t) == 0}
    if len(started) < pop.size:
        who = min(set(range(pop.size)) - started)
        return Plan(segment_attrs(pop, epochs, who, 0, None, False), None, None)
    latest: dict[int, FrozenTrial] = {}
    for t in segs:
        if member(t) not in latest or generation(t) > generation(latest[member(t)]):
            latest[member(t)] = t
    ready = [t for t in latest.values() if generation(t) < last_gen and ended(t)]
    for seg in sorted(ready, key=lambda t: (generation(t), member(t))):
        gen = generation(seg)
        peers = [t for t in segs if generation(t) == gen and ended(t)]
        reached = {member(t) for t in peers} | {m for m, t in latest.items() if generation(t) > gen}
        made = _successor(config, pop, seg, peers, len(reached))
        if made is not None:
            return made
    return None


def _successor(config: StudyConfig, pop: Population, seg: FrozenTrial, peers: list[FrozenTrial],
               reached: int) -> Plan | None:
    gen, who = generation(seg), member(seg)
    rng = random.Random(f"{config.training.seed}:{who}:{gen}")
    bottom, top = quantiles(peers, pop.quantile)
    top = [t for t in top if usable(t)]
    exploit = seg in bottom and bool(top)
    if exploit:
        parent = rng.choice(top)
    elif usable(seg):
        parent = seg
    else:  # diverged or failed, and not (yet) ranked low with a usable top
        good = sorted((t for t in peers if usable(t)), key=lambda t: (-score(t), t.number))
        if good:
            parent, exploit = good[0], True
        elif reached < pop.size:
            return None  # wait for the other members to end this generation
        elif keys.parent(seg) is not None:  # nobody of this generation ended well: go on from before it
            number = keys.parent(seg)
            attrs = segment_attrs(pop, config.training.epochs, who, gen + 1, number, False)
            return Plan(attrs, dict(seg.params) or None, number)
        else:
            return None
    values = dict(parent.params)
    fixed: dict[str, Any] | None = values
    if exploit:
        if pop.explore == "sampler":
            fixed = {k: v for k, v in values.items() if k not in pop.mutable}
        else:
            fixed = explore(values, pop, config.space, rng)
    attrs = segment_attrs(pop, config.training.epochs, who, gen + 1, parent.number, exploit)
    return Plan(attrs, fixed, parent.number)


def explore(values: dict[str, Any], pop: Population, space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    """Perturb or resample each mutable knob the parent has, inside its range."""
    out = dict(values)
    for knob in pop.mutable:
        spec = space.knobs.get(knob)
        if knob not in out or not isinstance(spec, Range):
            continue
        if rng.random() < pop.resample_probability:
            if spec.log:
                value = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
            else:
                value = rng.uniform(spec.low, spec.high)
        else:
            value = float(out[knob]) * rng.choice(pop.perturb)
        value = min(max(value, spec.low), spec.high)
        if spec.step is not None:
            value = min(spec.low + round((value - spec.low) / spec.step) * spec.step, spec.high)
        out[knob] = value
    return out


def needed_checkpoints(config: StudyConfig, trials: list[FrozenTrial]) -> set[int]:
    """Segments whose checkpoints a later segment may still start from: those of a generation some
    member has not yet moved past (a member that ends it may exploit any of them)."""
    pop = config.population
    if pop is None:
        return set()
    segs = keys.segments(trials)
    moved: dict[int, set[int]] = {}
    for t in segs:
        moved.setdefault(generation(t), set()).add(member(t))
    return {t.number for t in segs if usable(t) and len(moved.get(generation(t) + 1, ())) < pop.size}


def check_flags(config: StudyConfig, *, n_trials: int | None = None, warm_start: Any = None) -> None:
    """Flags a population-based study refuses (exit 2, before anything is written): `--n-trials`
    other than size × segments, and `--warm-start`."""
    if config.population is None:
        return
    if n_trials is not None and n_trials != config.n_trials:
        raise ConfigError(f"is {n_trials}, but {config.source or 'the study'} has strategy: pbt with "
                          f"{config.n_trials} segments (size × segments); change population.size instead",
                          key="--n-trials")
    if warm_start is not None:
        raise ConfigError(f"{config.source or 'the study'} has strategy: pbt; its members start from the sampler's "
                          "values and learn their schedule, so a warm start cannot be combined with it",
                          key="--warm-start")


__all__ = ["Plan", "check_flags", "explore", "needed_checkpoints", "plan", "quantiles"]
