"""Warm starts: a new study's first trials are the best configs of earlier studies.

`tuner sweep FILE --warm-start STUDY[,STUDY...] [--warm-top K]` reads the top K COMPLETE trials
(by value, in each source study's direction) of each source, maps each config into the new search
space (`map_config`) and queues them as the new study's first trials. A source is a study in the
sweep's storage, or `URL#STUDY` for one in another storage. Sources are read (never written)
before the new study is created, so a missing one leaves nothing behind.

The configs are queued the way a tuner worker queues its own trials: a WAITING trial made from a
template with a `tuner_queued` token (keys.QUEUED), created in one transaction through the
storage's `create_new_trial`, with the mapped params and their distributions set in it, so
`study.ask()` pops them first and `suggest` returns their values. They count toward `n_trials`
like every trial; at most `n_trials` configs are queued. A study is warm-started once, before its
first trial; the study user attr `tuner_warm_start` records it once every config is queued.

An interrupted warm start (Ctrl-C after 22 of 300 configs) has no `tuner_warm_start` yet: the
next `tuner sweep --warm-start` completes it, queuing only the configs not queued before (each
queued trial names its source in the system attr `tuner_warm_start_pick`), then records it. A study
whose trials are none of a warm start's is not warm-started.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from tuner.errors import ConfigError, StudyNotFoundError
from tuner.storage import keys
from tuner.storage.database import StorageURL, display, open_storage, require_study
from tuner.study.space import KNOBS, Choices, Fixed, Range, SearchSpace

FLAG = "--warm-start"
DEFAULT_TOP = 5
# system attr of a queued warm-start trial: [source label, source trial number], which pick it is
PICK = "tuner_warm_start_pick"


@dataclass
class WarmStart:
    """What `--warm-start` / `--warm-top` asked for; `say` prints one line per queued config."""

    sources: list[str]
    top: int = DEFAULT_TOP
    say: Callable[[str], None] | None = None
    labels: list[str] = field(default_factory=list)  # the sources as recorded: STUDY or SHOWN-URL#STUDY


@dataclass
class Pick:
    """One config of a source study: its study, trial number and knob values; `label` names the
    source as recorded (STUDY, or SHOWN-URL#STUDY for another storage)."""

    study: str
    number: int
    values: dict[str, Any]
    label: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.label or self.study, self.number)


@dataclass
class Mapped:
    params: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_sources(text: str) -> list[tuple[str | None, str]]:
    """`STUDY[,STUDY...]`, each `STUDY` or `URL#STUDY`, as (url or None, study name). A bad part
    is a ConfigError naming `--warm-start`; a URL in it is shown without its password."""
    out: list[tuple[str | None, str]] = []
    for part in text.split(","):
        part = part.strip()
        url, sep, name = part.rpartition("#")
        if not part or not name or (sep and not url):
            shown = f"{_shown(url)}#{name}" if sep else part
            raise ConfigError(f"expected STUDY or URL#STUDY (comma-separated), got {shown!r}", key=FLAG)
        if sep:
            try:
                StorageURL.parse(url)
            except ConfigError:
                raise ConfigError(f"{_shown(url)!r} before '#{name}' is not a storage URL: expected STUDY or "
                                  "URL#STUDY, e.g. sqlite:///other.db#study or postgresql+psycopg://user@host/db#study",
                                  key=FLAG) from None
        out.append((url if sep else None, name))
    return out


def _shown(url: str) -> str:
    """`url` as it may be printed: a password after `user:` is `***`, with or without a scheme."""
    return re.sub(r":[^:@/\s]*@", ":***@", display(url))


def check_top(top: int) -> None:
    if top < 1:
        raise ConfigError(f"must be >= 1, got {top}", key="--warm-top")


def load_sources(ws: WarmStart, default: StorageURL) -> list[Pick]:
    """The top configs of every source study, best first per source, read-only. A source that
    does not exist is a ConfigError (exit 2) naming it."""
    check_top(ws.top)
    picks: list[Pick] = []
    ws.labels = []
    for url, name in parse_sources(",".join(ws.sources)):
        target = default if url is None else StorageURL.parse(url)
        where = f" in {target.shown}" if url is not None else ""
        ws.labels.append(name if url is None else f"{target.shown}#{name}")
        try:
            storage = open_storage(target, must_exist=True)
        except StudyNotFoundError:
            raise ConfigError(f"source study {name!r} not found{where or ' (the storage does not exist yet)'}",
                              key=FLAG) from None
        try:
            try:
                sid = require_study(storage, name)
            except StudyNotFoundError as exc:
                raise ConfigError(f"source {exc}{where}", key=FLAG) from None
            directions = storage.get_study_directions(sid)
            if len(directions) != 1:
                raise ConfigError(f"source study {name!r} has {len(directions)} objectives; only "
                                  "single-objective studies can warm-start", key=FLAG)
            fixed = _fixed_knobs(storage.get_study_user_attrs(sid).get(keys.CONFIG))
            done = [t for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and math.isfinite(t.value)]
        finally:
            storage.engine.dispose()
        sign = -1.0 if directions[0] == StudyDirection.MAXIMIZE else 1.0
        done.sort(key=lambda t: (sign * float(t.value), t.number))
        for t in done[:ws.top]:
            picks.append(Pick(name, t.number, {**fixed, **_knob_params(t)}, ws.labels[-1]))
    return picks


def _fixed_knobs(config: Any) -> dict[str, Any]:
    """The knobs a tuner study fixed (they are not trial params, but they were its config)."""
    space = config.get("space") if isinstance(config, dict) else None
    if not isinstance(space, dict):
        return {}
    return {k: v for k, v in space.items() if k in KNOBS and not isinstance(v, dict)}


def _knob_params(t: FrozenTrial) -> dict[str, Any]:
    return {k: v for k, v in t.params.items() if k in KNOBS}


def _old_value(values: dict[str, Any], name: str) -> Any:
    """The source's value for knob `name`, also across the β / 1−β spellings; None if it had none."""
    if name in values:
        return values[name]
    for a, b in (("beta1", "one_minus_beta1"), ("beta2", "one_minus_beta2")):
        other = {a: b, b: a}.get(name)
        if other is not None and other in values and name in (a, b):
            return 1.0 - float(values[other])
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".4g")
    return str(value)


def map_config(values: dict[str, Any], space: SearchSpace) -> Mapped:
    """Map a source config into `space`: a knob the new space fixes takes the new value, a value
    outside a new range is clipped into it (and onto its step grid), a categorical value that is
    not a new choice is dropped (the sampler picks), and a knob the source had not is sampled."""
    out = Mapped()
    for name, knob in space.knobs.items():
        old = _old_value(values, name)
        if isinstance(knob, Fixed) or (isinstance(knob, Range) and knob.low == knob.high):
            new = knob.value if isinstance(knob, Fixed) else knob.low
            if old is not None and old != new:
                out.notes.append(f"{name} {_fmt(old)} -> {_fmt(new)} (fixed)")
            continue
        if old is None:
            out.notes.append(f"{name} (sampled: not in the source)")
            continue
        if isinstance(knob, Choices):
            if any(old == c and isinstance(old, bool) == isinstance(c, bool) for c in knob.choices):
                out.params[name] = old
                out.distributions[name] = CategoricalDistribution(list(knob.choices))
                out.notes.append(f"{name} {_fmt(old)} (kept)")
            else:
                out.notes.append(f"{name} {_fmt(old)} (dropped: not a choice; sampled)")
            continue
        try:
            number = float(old)
        except (TypeError, ValueError):
            out.notes.append(f"{name} {_fmt(old)} (dropped: not a number; sampled)")
            continue
        value = min(max(number, knob.low), knob.high)
        if knob.step is not None:
            value = min(knob.low + round((value - knob.low) / knob.step) * knob.step, knob.high)
        out.params[name] = value
        out.distributions[name] = FloatDistribution(knob.low, knob.high, log=knob.log, step=knob.step)
        out.notes.append(f"{name} {_fmt(number)} -> {_fmt(value)} (clipped)" if value != number
                         else f"{name} {_fmt(number)} (kept)")
    return out


def template(mapped: Mapped, pick: Pick) -> FrozenTrial:
    """The WAITING trial to queue: the mapped params, the source as user attrs, a `tuner_queued`
    token (as keys.fresh_template) and which pick it is (PICK)."""
    return create_trial(state=TrialState.WAITING, params=dict(mapped.params),
                        distributions=dict(mapped.distributions),
                        user_attrs={keys.WARM_START_STUDY: pick.study, keys.WARM_START_TRIAL: pick.number},
                        system_attrs={keys.QUEUED: uuid.uuid4().hex, PICK: list(pick.key)})


def enqueue(storage: Any, study_id: int, picks: list[Pick], space: SearchSpace, budget: int | None,
            sources: list[str], say: Callable[[str], None] | None = None) -> int:
    """Queue the mapped picks as the study's first trials (at most `budget`, duplicates once) and
    record the warm start in the study. Returns how many were queued now.

    A study already warm-started, or with trials none of which a warm start queued, is left as it
    is (one `warm start skipped: ...` line). A warm start that was interrupted while queuing is
    completed: the picks it queued already are not queued again."""
    say = say or (lambda _line: None)
    name = storage.get_study_name_from_id(study_id)
    if keys.WARM_STARTED in storage.get_study_user_attrs(study_id):
        say(f"warm start skipped: study {name!r} was warm-started already (a study is warm-started once)")
        return 0
    existing = storage.get_all_trials(study_id, deepcopy=False)
    keyed, legacy = queued_picks(existing)
    if existing and not keyed and not legacy:
        say(f"warm start skipped: study {name!r} already has trials (a study is warm-started once, "
            "before its first trial)")
        return 0
    chosen = choose(picks, space, budget, say)
    todo = [(i, pick, mapped) for i, (pick, mapped) in enumerate(chosen, 1)
            if pick.key not in keyed and (pick.study, pick.number) not in legacy]
    if existing:
        say(f"warm start: completing the interrupted warm start of study {name!r}: "
            f"{len(chosen) - len(todo)} of {len(chosen)} configs were queued before")
    for i, pick, mapped in todo:
        storage.create_new_trial(study_id, template(mapped, pick))
        say(f"warm start {i}/{len(chosen)} from {pick.study} trial {pick.number}: "
            + (", ".join(mapped.notes) or "nothing to map"))
    storage.set_study_user_attr(study_id, keys.WARM_STARTED, {
        "sources": list(sources), "queued": [[p.study, p.number] for p, _ in chosen]})
    if not picks:
        say("warm start: the source studies have no COMPLETE trial; nothing queued")
    return len(todo)


def choose(picks: list[Pick], space: SearchSpace, budget: int | None,
           say: Callable[[str], None]) -> list[tuple[Pick, Mapped]]:
    """The picks to queue, mapped into `space`, in order: a config equal to an earlier one once,
    at most `budget` of them."""
    chosen: list[tuple[Pick, Mapped]] = []
    seen: dict[str, int] = {}
    for pick in picks:
        mapped = map_config(pick.values, space)
        key = repr(sorted(mapped.params.items()))
        if key in seen:
            say(f"warm start: {pick.study} trial {pick.number} skipped: the same config as warm start {seen[key]}")
            continue
        if budget is not None and len(chosen) >= budget:
            say(f"warm start: {pick.study} trial {pick.number} skipped: n_trials is {budget}")
            continue
        chosen.append((pick, mapped))
        seen[key] = len(chosen)
    return chosen


def queued_picks(trials: list[FrozenTrial]) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Which picks the study's trials were queued from: (label, number) from PICK; and, for trials
    queued before PICK was written, (study, number) from their user attrs."""
    keyed: set[tuple[str, int]] = set()
    legacy: set[tuple[str, int]] = set()
    for t in trials:
        pick = t.system_attrs.get(PICK)
        if isinstance(pick, list) and len(pick) == 2:
            keyed.add((str(pick[0]), int(pick[1])))
        elif keys.WARM_START_STUDY in t.user_attrs and keys.WARM_START_TRIAL in t.user_attrs:
            legacy.add((str(t.user_attrs[keys.WARM_START_STUDY]), int(t.user_attrs[keys.WARM_START_TRIAL])))
    return keyed, legacy
