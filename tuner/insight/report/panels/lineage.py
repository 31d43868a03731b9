"""A population-based (PBT) study's lineage: the tree of segments, and each mutable knob over epochs.

The tree: x = the epoch a segment ended at, y = its member, a marker per segment and a line from
each segment to its parent (the segment whose checkpoint it started from). Exploit edges (a copy of
another member) are highlighted; the winner's chain is a dark band under its edges, its segments
large dark diamonds. The knobs: one row per mutable knob, a faint step line per member (the value
in force from each segment's start) and the winner's lineage bold. The lineage itself is read by
`tuner.insight.lineage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from tuner.insight.lineage import Lineage, Segment, acc, knobs_text, pbt_lineage
from tuner.insight.report.data import StudyData
from tuner.insight.report.style import LABELS, LOG_KNOBS, PALETTE, STYLE

OWN_EDGE = "#b0b0b0"  # a segment continued from its own member's checkpoint
EXPLOIT_EDGE = "#ff7f0e"  # a segment started from another member's checkpoint
WINNER = "#111111"  # the winner's chain: its markers and, in the knobs figure, its line
WINNER_BAND = "rgba(17, 17, 17, 0.28)"  # the winner's chain in the tree: a band under the edges

TREE_TITLE = "PBT lineage: segments by member and epoch"
KNOBS_TITLE = "PBT knobs over epochs: each member, and the winner's lineage"


@dataclass
class LineageInfo:
    lineage: Lineage | None = None
    missing: str | None = None


def lineage_info(data: StudyData) -> LineageInfo:
    """The lineage of a PBT study; `missing` says why there is none to draw."""
    lin = pbt_lineage(data.frozen)
    if lin is None:
        return LineageInfo(missing="not a population-based study (no trial is a segment)")
    if not any(s.last for s in lin.segments):
        return LineageInfo(lin, missing="no segment has recorded its epochs yet")
    return LineageInfo(lin)


def _hover(s: Segment, lin: Lineage) -> str:
    source = lin.by_number.get(s.parent) if s.parent is not None else None
    start = ("from its own checkpoint" if source is not None and not s.exploit else
             f"copied member {source.member} (trial {source.number})" if source is not None else "fresh start")
    return (f"trial {s.number} ({s.state})<br>member {s.member}, epochs {s.first}–{s.last}<br>{start}<br>"
            f"{knobs_text(s.knobs, lin.knobs).replace(' ', '<br>')}<br>val acc {acc(s.value)}")


def _edges(segments: list[Segment], lin: Lineage) -> tuple[list[Any], list[Any]]:
    """x, y of line pieces from each segment's parent (or its member's start) to it, None-separated."""
    x: list[Any] = []
    y: list[Any] = []
    by_number = lin.by_number
    for s in segments:
        source = by_number.get(s.parent) if s.parent is not None else None
        x0, y0 = (source.last, source.member) if source is not None else (s.first - 1, s.member)
        x += [x0, s.last, None]
        y += [y0, s.member, None]
    return x, y


def lineage_figure(info: LineageInfo) -> Any:
    lin = info.lineage
    assert lin is not None
    drawn = [s for s in lin.segments if s.last]
    fig = go.Figure()
    if lin.winner is not None:  # underneath, wide and translucent: the edges drawn on it stay readable
        x, y = _edges(lin.chain, lin)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"winner's lineage (trial {lin.winner.number})",
                                 line={"color": WINNER_BAND, "width": 9}, hoverinfo="skip"))
    for name, color, width, dash, pick in (
            ("own checkpoint", OWN_EDGE, 1.2, "solid", lambda s: not s.exploit),
            ("exploit: copied another member", EXPLOIT_EDGE, 2.5, "dash", lambda s: s.exploit)):
        x, y = _edges([s for s in drawn if pick(s)], lin)
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, line={"color": color, "width": width,
                                                                               "dash": dash}, hoverinfo="skip"))
    for kind in STYLE:
        group = [s for s in drawn if s.state == kind]
        if group:
            color, _, label = STYLE[kind]
            fig.add_trace(go.Scatter(
                x=[s.last for s in group], y=[s.member for s in group], mode="markers", name=f"segment ({label})",
                marker={"color": color, "size": 9, "line": {"color": "white", "width": 1}},
                customdata=[s.number for s in group], text=[_hover(s, lin) for s in group],
                hovertemplate="%{text}<extra></extra>"))
    if lin.winner is not None:
        fig.add_trace(go.Scatter(
            x=[s.last for s in lin.chain], y=[s.member for s in lin.chain], mode="markers+text",
            name="winner's segments", showlegend=False, marker={"color": WINNER, "size": 13, "symbol": "diamond"},
            text=[f"trial {s.number}" for s in lin.chain], textposition="top center",
            customdata=[s.number for s in lin.chain], hovertext=[_hover(s, lin) for s in lin.chain],
            hovertemplate="%{hovertext}<extra></extra>"))
    fig.update_xaxes(title_text="epoch (at the segment's end)", rangemode="tozero", dtick=_dtick(drawn))
    fig.update_yaxes(title_text="member", tickmode="array", tickvals=lin.members,
                     ticktext=[f"member {m}" for m in lin.members], range=[min(lin.members) - 0.6,
                                                                            max(lin.members) + 0.6])
    fig.update_layout(legend_title_text="lines: where a segment started")
    return fig


def _dtick(segments: list[Segment]) -> int | None:
    lengths = {s.last - s.first + 1 for s in segments}
    return lengths.pop() if len(lengths) == 1 else None


def _steps(segments: list[Segment], knob: str) -> tuple[list[int], list[Any]]:
    """x, y of a step line: each segment's value from its start (epoch first - 1) to its end."""
    segments = sorted((s for s in segments if s.last), key=lambda s: (s.first, s.number))
    if not segments:
        return [], []
    return ([s.first - 1 for s in segments] + [segments[-1].last],
            [s.knobs.get(knob) for s in segments] + [segments[-1].knobs.get(knob)])


def knobs_figure(info: LineageInfo) -> Any:
    from plotly.subplots import make_subplots  # plotly.subplots (~50 ms): only when this figure is drawn

    lin = info.lineage
    assert lin is not None
    rows = max(1, len(lin.knobs))
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08 if rows > 1 else 0.0,
                        subplot_titles=[LABELS.get(k, k) for k in lin.knobs] or ["no mutable knob"])
    for row, knob in enumerate(lin.knobs, start=1):
        for m in lin.members:
            x, y = _steps([s for s in lin.segments if s.member == m], knob)
            color = PALETTE[m % len(PALETTE)]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=f"member {m}",
                                     legendgroup=f"member {m}", showlegend=row == 1, opacity=0.45,
                                     line={"color": color, "width": 1.3},
                                     hovertemplate=f"member {m}<br>from epoch %{{x}}<br>{knob} %{{y:.4g}}"
                                                   "<extra></extra>"),
                          row=row, col=1)
        if lin.winner is not None:
            x, y = _steps(lin.chain, knob)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line_shape="hv",
                                     name=f"winner's lineage (trial {lin.winner.number})", legendgroup="winner",
                                     showlegend=row == 1, line={"color": WINNER, "width": 3.5},
                                     marker={"color": WINNER, "size": 6},
                                     hovertemplate=f"winner's lineage<br>from epoch %{{x}}<br>{knob} %{{y:.4g}}"
                                                   "<extra></extra>"), row=row, col=1)
        fig.update_yaxes(type="log" if knob in LOG_KNOBS else "linear", title_text=LABELS.get(knob, knob),
                         row=row, col=1)
    fig.update_xaxes(title_text="epoch", row=rows, col=1)
    return fig


def knobs_height(info: LineageInfo) -> int:
    return 120 + 200 * max(1, len(info.lineage.knobs) if info.lineage else 1)
