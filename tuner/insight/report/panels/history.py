"""Optimization history: the val accuracy of each COMPLETE trial and the best so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, no_complete
from tuner.insight.report.style import STYLE


@dataclass
class HistoryInfo:
    numbers: list[int] = field(default_factory=list)  # COMPLETE trials, in trial order
    values: list[float] = field(default_factory=list)
    best_so_far: list[float] = field(default_factory=list)
    other: list[tuple[int, str, float]] = field(default_factory=list)  # (number, kind, last reported value)
    missing: str | None = None


def history_info(data: StudyData) -> HistoryInfo:
    info = HistoryInfo()
    best: float | None = None
    better = max if data.direction == "maximize" else min
    for t in data.trials:
        if t.kind == "complete" and t.value is not None:
            best = t.value if best is None else better(best, t.value)
            info.numbers.append(t.number)
            info.values.append(t.value)
            info.best_so_far.append(best)
        elif t.kind in ("pruned", "diverged") and t.last_value is not None:
            info.other.append((t.number, t.kind, t.last_value))
    if not info.numbers:
        info.missing = no_complete(data)
    return info


def history_figure(info: HistoryInfo) -> Any:
    fig = go.Figure()
    for kind in ("pruned", "diverged"):
        pts = [p for p in info.other if p[1] == kind]
        if pts:
            color, _, label = STYLE[kind]
            fig.add_trace(go.Scatter(
                x=[p[0] for p in pts], y=[p[2] for p in pts], mode="markers", name=f"{kind} (last reported)",
                marker={"color": color, "symbol": "x" if kind == "diverged" else "circle-open", "size": 8},
                hovertemplate="trial %{x}<br>last val acc %{y:.4f}<extra>" + kind + "</extra>"))
    fig.add_trace(go.Scatter(x=info.numbers, y=info.values, mode="markers", name="complete",
                             marker={"color": STYLE["complete"][0], "size": 8},
                             hovertemplate="trial %{x}<br>val acc %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=info.numbers, y=info.best_so_far, mode="lines", name="best so far",
                             line={"color": "#2ca02c", "shape": "hv", "width": 2}))
    fig.update_layout(xaxis_title="trial", yaxis_title="val accuracy")
    return fig
