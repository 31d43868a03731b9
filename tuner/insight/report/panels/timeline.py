"""Timeline: each trial from start to end on the wall clock, coloured by state."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import KINDS, STYLE


@dataclass
class Bar:
    number: int
    kind: str
    start: dt.datetime
    end: dt.datetime
    stage: str | None = None  # a staged study: the trial's stage (each starts when the one before has ended)


@dataclass
class TimelineInfo:
    bars: list[Bar] = field(default_factory=list)
    missing: str | None = None


def timeline_info(data: StudyData, now: dt.datetime | None = None) -> TimelineInfo:
    info = TimelineInfo()
    for t in data.trials:
        if t.start is None:
            continue
        end = t.complete or now or dt.datetime.now()
        info.bars.append(Bar(t.number, t.kind, t.start, max(end, t.start), t.stage))
    if not info.bars:
        info.missing = f"no trial has started ({reasons(data)})"
    return info


def timeline_figure(info: TimelineInfo) -> Any:
    fig = go.Figure()
    for kind in KINDS:
        bars = [b for b in info.bars if b.kind == kind]
        if not bars:
            continue
        fig.add_trace(go.Bar(
            base=[b.start.isoformat() for b in bars],
            x=[max(1.0, (b.end - b.start).total_seconds() * 1000) for b in bars],  # ms on a date axis
            y=[b.number for b in bars], orientation="h", name=STYLE[kind][2], marker_color=STYLE[kind][0],
            customdata=[[(b.end - b.start).total_seconds(), b.start.strftime("%H:%M:%S"),
                         f"<br>stage {b.stage}" if b.stage else ""] for b in bars],
            hovertemplate="trial %{y}%{customdata[2]}<br>start %{customdata[1]}<br>%{customdata[0]:.1f} s<extra>"
                          + kind + "</extra>"))
    fig.update_layout(barmode="overlay", xaxis={"type": "date", "title": {"text": "wall time"}},
                      yaxis={"title": {"text": "trial"}, "autorange": "reversed"}, bargap=0.2)
    return fig
