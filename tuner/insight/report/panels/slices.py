"""Slices: accuracy against lr, eps, 1 − β1, 1 − β2 and the clip threshold (COMPLETE trials).

1 − β comes from the stored betas, so the plot is the same whichever way the space sampled β.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, no_complete
from tuner.insight.report.style import LABELS

SLICE_KNOBS = ("lr", "eps", "one_minus_beta1", "one_minus_beta2", "clip_threshold")


@dataclass
class SliceSeries:
    key: str
    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    fixed: float | None = None  # the one value, when all trials had the same
    note: str | None = None  # why there are no points


@dataclass
class SliceInfo:
    series: dict[str, SliceSeries] = field(default_factory=dict)
    missing: str | None = None


def slice_info(data: StudyData) -> SliceInfo:
    info = SliceInfo()
    rows = sorted((t for t in data.complete if t.knobs), key=lambda t: t.number)
    if not rows:
        info.missing = no_complete(data)
        return info
    for key in SLICE_KNOBS:
        s = SliceSeries(key, LABELS[key])
        for t in rows:
            v = t.knobs.get(key)
            if v is not None and v > 0:
                s.x.append(float(v))
                s.y.append(float(t.value))  # type: ignore[arg-type]
                s.numbers.append(t.number)
        if not s.x:
            s.note = "no clipped trial" if key == "clip_threshold" else "no values"
        elif len(set(s.x)) == 1:
            s.fixed = s.x[0]
        info.series[key] = s
    return info


def slice_figure(info: SliceInfo) -> Any:
    from plotly.subplots import make_subplots  # plotly.subplots (~50 ms): only when this figure is drawn

    series = list(info.series.values())
    titles = [s.label + (f" (fixed {s.fixed:.3g})" if s.fixed is not None else "") for s in series]
    fig = make_subplots(rows=1, cols=len(series), subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.03)
    for i, s in enumerate(series, start=1):
        fig.add_trace(go.Scatter(x=s.x, y=s.y, mode="markers", showlegend=False, customdata=s.numbers,
                                 marker={"color": s.numbers, "colorscale": "Blues", "size": 8,
                                         "line": {"width": 0.5, "color": "#333"},
                                         "cmin": 0, "cmax": max([1, *(n for t in series for n in t.numbers)])},
                                 hovertemplate="trial %{customdata}<br>" + s.label
                                 + " %{x:.3g}<br>val acc %{y:.4f}<extra></extra>"), row=1, col=i)
        fig.update_xaxes(type="log", title_text=s.label, exponentformat="e", row=1, col=i)
        if s.note:
            fig.add_annotation(text=s.note, showarrow=False, xref=f"x{i} domain" if i > 1 else "x domain",
                               yref="y domain", x=0.5, y=0.5, font={"color": "#888"})
    fig.update_yaxes(title_text="val accuracy", row=1, col=1)
    return fig
