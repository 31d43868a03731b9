"""Gradient norms and clipping, per trial: the p90 global gradient norm of the last evaluated epoch
(measured before clipping) and the fraction of steps clipped, each against val accuracy."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import KINDS, STYLE


@dataclass
class GradPoint:
    number: int
    kind: str
    grad_norm_p90: float  # of the last evaluated epoch
    clip_fraction: float  # over all evaluated epochs
    accuracy: float  # val accuracy of the last evaluated epoch


@dataclass
class GradInfo:
    points: list[GradPoint] = field(default_factory=list)
    any_clipped: bool = False
    missing: str | None = None


def grad_info(data: StudyData) -> GradInfo:
    info = GradInfo()
    for t in data.trials:
        recs = [h for h in t.history if "grad_norm_p90" in h and "val_accuracy" in h]
        if not recs:
            continue
        last = recs[-1]
        clip = statistics.fmean(float(h.get("clip_fraction", 0.0)) for h in recs)
        if not (math.isfinite(float(last["grad_norm_p90"])) and math.isfinite(float(last["val_accuracy"]))):
            continue
        info.points.append(GradPoint(t.number, t.kind, float(last["grad_norm_p90"]), clip,
                                     float(t.value if t.value is not None else last["val_accuracy"])))
        info.any_clipped = info.any_clipped or clip > 0
    if not info.points:
        info.missing = f"no trial recorded a training epoch ({reasons(data)})"
    return info


def grad_figure(info: GradInfo) -> Any:
    from plotly.subplots import make_subplots  # plotly.subplots (~50 ms): only when this figure is drawn

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("gradient norm p90 (last epoch)",
                                        "clip fraction (all epochs)"
                                        + ("" if info.any_clipped else ": no trial clipped")))
    for kind in KINDS:
        pts = [p for p in info.points if p.kind == kind]
        if not pts:
            continue
        color = STYLE[kind][0]
        for col, attr in ((1, "grad_norm_p90"), (2, "clip_fraction")):
            fig.add_trace(go.Scatter(
                x=[getattr(p, attr) for p in pts], y=[p.accuracy for p in pts], mode="markers", name=kind,
                legendgroup=kind, showlegend=col == 1, customdata=[p.number for p in pts],
                marker={"color": color, "size": 8, "symbol": "x" if kind == "diverged" else "circle"},
                hovertemplate="trial %{customdata}<br>%{x:.3g}<br>val acc %{y:.4f}<extra>" + kind + "</extra>"),
                row=1, col=col)
    fig.update_xaxes(type="log", title_text="global grad norm, p90", row=1, col=1)
    fig.update_xaxes(title_text="fraction of steps clipped", range=[-0.05, 1.05], row=1, col=2)
    fig.update_yaxes(title_text="val accuracy", row=1, col=1)
    return fig
