"""Learning curves: val accuracy per epoch, as reported to the pruner.

Coloured by trial state (the report), or by learning-rate schedule (the dashboard); pruned trials
are dashed and diverged ones dotted with an x where the loss blew up either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import KINDS, PALETTE, STYLE


@dataclass
class Curve:
    number: int
    kind: str
    epochs: list[int]
    values: list[float]
    diverged_epoch: int | None = None
    schedule: str | None = None  # the learning-rate schedule (None: the trial has no params)


@dataclass
class CurvesInfo:
    curves: list[Curve] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # curves per kind
    missing: str | None = None


def curves_info(data: StudyData) -> CurvesInfo:
    info = CurvesInfo()
    for t in data.trials:
        if not t.curve and t.kind != "diverged":
            continue
        epochs = sorted(t.curve)
        info.curves.append(Curve(t.number, t.kind, epochs, [t.curve[e] for e in epochs], t.diverged_epoch,
                                 t.knobs.get("schedule")))
        info.counts[t.kind] = info.counts.get(t.kind, 0) + 1
    if not info.curves:
        info.missing = f"no trial reported a validation accuracy ({reasons(data)})"
    return info


def curves_figure(info: CurvesInfo, color_by: str = "state") -> Any:
    """`color_by`: "state" (one colour per trial kind) or "schedule" (one per learning-rate schedule)."""
    if color_by not in ("state", "schedule"):
        raise ValueError(f"color_by must be 'state' or 'schedule', got {color_by!r}")
    schedules = sorted({c.schedule or "unknown" for c in info.curves})
    fig = go.Figure()
    shown: set[str] = set()
    for c in sorted(info.curves, key=lambda c: KINDS.index(c.kind)):  # complete trials underneath
        color, dash, label = STYLE[c.kind]
        group = c.kind
        if color_by == "schedule":
            group = label = c.schedule or "unknown"
            color = PALETTE[schedules.index(group) % len(PALETTE)]
        first = group not in shown
        shown.add(group)
        x, y = list(c.epochs), list(c.values)
        symbols = ["circle"] * len(x)
        if c.kind == "diverged":  # an x where it blew up: after its last evaluated epoch
            x.append(c.diverged_epoch or (x[-1] + 1 if x else 1))
            y.append(y[-1] if y else 0.0)
            symbols.append("x")
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=label, legendgroup=group, showlegend=first,
            line={"color": color, "dash": dash, "width": 1.5 if c.kind == "complete" else 1.2},
            marker={"color": color, "symbol": symbols,
                    "size": [6 if c.kind == "complete" else 8] * (len(x) - 1) + [12 if c.kind == "diverged" else 8]},
            opacity=1.0 if c.kind == "complete" else 0.75,
            hovertemplate=f"trial {c.number} ({c.kind}{', ' + group if color_by == 'schedule' else ''})"
                          "<br>epoch %{x}<br>val acc %{y:.4f}<extra></extra>"))
    fig.update_layout(xaxis_title="epoch", yaxis_title="val accuracy",
                      legend_title_text="trial state" if color_by == "state" else "schedule (dash: pruned)")
    return fig
