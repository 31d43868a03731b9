"""The lineage of a population-based (PBT) study, read from its trials: what `tuner best`, the report
and the dashboard note show.

Each trial of a PBT study is one segment of one member (see `tuner.storage.keys`). `pbt_lineage`
reads the live segments into plain `Segment`s and finds

- the winner: the best COMPLETE segment that ends the run (its last epoch is the training's
  `epochs`), and its chain, generation 0 first (`keys.lineage`);
- the exploit events: each segment whose `pbt_exploit` is set started from another member's
  checkpoint, at the epoch that segment ended, with knobs explored from the parent's.

The text helpers write that as plain lines (`tuner best`) or Markdown (the dashboard note). This
module imports neither plotly nor torch; a study with no segment has no lineage (None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.storage import keys

# The mutable knobs in the order they are shown (space names); knobs not listed follow, sorted
KNOB_ORDER = ("lr", "one_minus_beta1", "beta1", "one_minus_beta2", "beta2", "eps", "weight_decay", "clip_threshold")

_STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
           TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass(frozen=True)
class Segment:
    number: int  # the trial
    member: int
    generation: int
    parent: int | None  # the trial whose checkpoint it started from (None at generation 0)
    exploit: bool  # the parent is another member's segment
    knobs: dict[str, Any]  # the mutable knobs in force (space names)
    first: int  # the first epoch it trained (1-based)
    last: int  # the last epoch it trained (inclusive)
    value: float | None  # the val accuracy at its end (COMPLETE segments only)
    state: str  # complete, pruned, failed, running, waiting


@dataclass(frozen=True)
class Exploit:
    epoch: int  # the epoch whose end it happened at (the parent's last epoch)
    member: int  # the member that copied
    trial: int  # the segment that started from the copy
    source_member: int  # the member it copied
    source_trial: int  # the segment whose checkpoint it copied
    source_value: float | None  # that segment's val accuracy
    explored: dict[str, tuple[Any, Any]]  # knob -> (the source's value, the new value), changed knobs only


@dataclass
class Lineage:
    segments: list[Segment]  # the live segments, by trial number
    knobs: list[str]  # the mutable knobs, in KNOB_ORDER
    winner: Segment | None  # the best COMPLETE segment that ends its run
    chain: list[Segment] = field(default_factory=list)  # the winner's lineage, generation 0 first
    exploits: list[Exploit] = field(default_factory=list)  # by epoch, then member

    @property
    def members(self) -> list[int]:
        return sorted({s.member for s in self.segments})

    @cached_property
    def by_number(self) -> dict[int, Segment]:
        return {s.number: s for s in self.segments}


def _epochs(t: FrozenTrial) -> tuple[int, int]:
    value = t.user_attrs.get(keys.PBT_EPOCHS)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return 0, 0


def segment_of(t: FrozenTrial) -> Segment:
    first, last = _epochs(t)
    knobs = t.user_attrs.get(keys.PBT_KNOBS)
    value = t.value if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value) else None
    return Segment(number=t.number, member=int(t.user_attrs[keys.PBT_MEMBER]),
                   generation=int(t.user_attrs.get(keys.PBT_GENERATION) or 0), parent=keys.parent(t),
                   exploit=bool(t.user_attrs.get(keys.PBT_EXPLOIT)), knobs=dict(knobs) if isinstance(knobs, dict)
                   else {}, first=first, last=last, value=value, state=_STATES.get(t.state, t.state.name.lower()))


def ordered_knobs(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [k for k in KNOB_ORDER if k in names] + sorted(names - set(KNOB_ORDER))


def pbt_lineage(trials: Iterable[FrozenTrial]) -> Lineage | None:
    """The lineage of a PBT study from its trials (any order), or None if none is a segment."""
    trials = list(trials)
    live = keys.segments(trials)
    if not live:
        return None
    segments = [segment_of(t) for t in live]
    by_number = {s.number: s for s in segments}
    frozen = {t.number: t for t in live}
    best = keys.pbt_winner(live)
    winner = by_number[best.number] if best is not None else None
    chain = [by_number[t.number] for t in keys.lineage(frozen[winner.number], frozen)] if winner else []
    exploits = []
    for s in segments:
        source = by_number.get(s.parent) if s.parent is not None else None
        if s.exploit and source is not None:
            explored = {k: (source.knobs.get(k), v) for k, v in s.knobs.items() if source.knobs.get(k) != v}
            exploits.append(Exploit(epoch=source.last, member=s.member, trial=s.number, source_member=source.member,
                                    source_trial=source.number, source_value=source.value, explored=explored))
    exploits.sort(key=lambda e: (e.epoch, e.member, e.trial))
    return Lineage(segments=segments, knobs=ordered_knobs(k for s in segments for k in s.knobs), winner=winner,
                   chain=chain, exploits=exploits)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    """A knob value, short: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def acc(value: float | None) -> str:
    """A val accuracy as `tuner best` shows it (4 decimals), None as '-'."""
    return "-" if value is None else f"{value:.4f}"


def knobs_text(knobs: dict[str, Any], names: list[str]) -> str:
    return " ".join(f"{k}={fmt(knobs.get(k))}" for k in names if k in knobs)


def source_text(s: Segment, by_number: dict[int, Segment]) -> str:
    """'← member M (trial N)' for a segment that started from another member's checkpoint, else ''."""
    source = by_number.get(s.parent) if s.parent is not None else None
    return f"← member {source.member} (trial {source.number})" if s.exploit and source is not None else ""


def explored_text(e: Exploit) -> str:
    return ", ".join(f"{k} {fmt(a)} → {fmt(b)}" for k, (a, b) in e.explored.items()) or "no knob changed"


def exploit_text(e: Exploit) -> str:
    """One exploit event in words."""
    return (f"member {e.member} copied member {e.source_member}'s segment trial {e.source_trial} "
            f"(val_acc {acc(e.source_value)}) and explored: {explored_text(e)} (now trial {e.trial})")


def lineage_lines(lin: Lineage) -> list[str]:
    """Plain lines: the winner's chain, one segment a line, then the exploit events by epoch."""
    lines: list[str] = []
    by_number = lin.by_number
    if lin.winner is None:
        lines.append(f"lineage: no member has finished its run yet ({len(lin.segments)} segments, "
                     f"{len(lin.members)} members)")
    else:
        w = lin.winner
        lines.append(f"lineage of trial {w.number} (member {w.member}, val_acc {acc(w.value)}), "
                     f"{len(lin.chain)} segments:")
        rows = [(f"epochs {s.first}-{s.last}", f"member {s.member}", f"trial {s.number}", source_text(s, by_number),
                 knobs_text(s.knobs, lin.knobs), f"val_acc {acc(s.value)}") for s in lin.chain]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    if not lin.exploits:
        lines.append("exploit events: none")
        return lines
    lines.append(f"exploit events ({len(lin.exploits)}):")
    epoch = None
    for e in lin.exploits:
        if e.epoch != epoch:
            epoch = e.epoch
            lines.append(f"  at epoch {e.epoch}:")
        lines.append(f"    {exploit_text(e)}")
    return lines


def lineage_markdown(lin: Lineage) -> str:
    """Markdown: the winner's chain as a table, then the exploit events as a list."""
    by_number = lin.by_number
    out = ["### Population-based training", "",
           f"{len(lin.members)} members, {len(lin.segments)} segments, {len(lin.exploits)} exploit events.", ""]
    if lin.winner is None:
        out += ["No member has finished its run yet.", ""]
    else:
        w = lin.winner
        out += [f"**Winner: trial {w.number}** (member {w.member}, val_accuracy {acc(w.value)}). Its lineage:", "",
                "| epochs | member | trial | started from | " + " | ".join(f"`{k}`" for k in lin.knobs)
                + " | val_accuracy |", "| --- " * (5 + len(lin.knobs)) + "|"]
        for s in lin.chain:
            out.append(f"| {s.first}–{s.last} | {s.member} | {s.number} | {source_text(s, by_number) or 'own'} | "
                       + " | ".join(fmt(s.knobs.get(k)) for k in lin.knobs) + f" | {acc(s.value)} |")
        out.append("")
    out += ["#### Exploit events", ""]
    if not lin.exploits:
        out.append("None.")
    out += [f"- epoch {e.epoch}: {exploit_text(e)}" for e in lin.exploits]
    out.append("")
    return "\n".join(out)
