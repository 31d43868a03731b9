"""Contours of two log-scaled knobs: accuracy interpolated between the COMPLETE trials (inverse distance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import LABELS

CONTOUR_PAIRS = (("lr", "one_minus_beta1"), ("lr", "eps"))
MIN_CONTOUR_POINTS = 4


@dataclass
class ContourInfo:
    x_key: str
    y_key: str
    x: list[float] = field(default_factory=list)  # knob values of COMPLETE trials
    y: list[float] = field(default_factory=list)
    z: list[float] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    grid_x: list[float] = field(default_factory=list)  # interpolated surface (knob units)
    grid_y: list[float] = field(default_factory=list)
    grid_z: list[list[float]] = field(default_factory=list)
    missing: str | None = None

    @property
    def title(self) -> str:
        return f"{LABELS[self.x_key]} × {LABELS[self.y_key]}"


def contour_info(data: StudyData, x_key: str, y_key: str, *, resolution: int = 40) -> ContourInfo:
    info = ContourInfo(x_key, y_key)
    for t in sorted(data.complete, key=lambda t: t.number):
        xv, yv = t.knobs.get(x_key), t.knobs.get(y_key)
        if xv is not None and yv is not None and xv > 0 and yv > 0:
            info.x.append(float(xv))
            info.y.append(float(yv))
            info.z.append(float(t.value))  # type: ignore[arg-type]
            info.numbers.append(t.number)
    fixed = [LABELS[k] for k, vals in ((x_key, info.x), (y_key, info.y)) if len(set(vals)) == 1]
    if len(info.x) < MIN_CONTOUR_POINTS:
        info.missing = (f"too few points: {len(info.x)} COMPLETE trial{'s' if len(info.x) != 1 else ''} with "
                        f"{LABELS[x_key]} and {LABELS[y_key]}, a contour needs at least {MIN_CONTOUR_POINTS}"
                        + (f" ({reasons(data)})" if not info.x else ""))
        return info
    if fixed:
        info.missing = f"{' and '.join(fixed)} had one value in every COMPLETE trial (not searched)"
        return info
    # inverse-distance weighting on a grid, in log10 space scaled to the unit square
    lx, ly, z = np.log10(info.x), np.log10(info.y), np.asarray(info.z)
    gx = np.linspace(lx.min(), lx.max(), resolution)
    gy = np.linspace(ly.min(), ly.max(), resolution)
    sx, sy = (lx.max() - lx.min()) or 1.0, (ly.max() - ly.min()) or 1.0
    X, Y = np.meshgrid(gx, gy)
    d2 = ((X[..., None] - lx) / sx) ** 2 + ((Y[..., None] - ly) / sy) ** 2
    w = 1.0 / np.maximum(d2, 1e-12)
    Z = (w * z).sum(-1) / w.sum(-1)
    info.grid_x = (10 ** gx).tolist()
    info.grid_y = (10 ** gy).tolist()
    info.grid_z = Z.tolist()
    return info


def contour_figure(info: ContourInfo) -> Any:
    fig = go.Figure()
    fig.add_trace(go.Contour(x=info.grid_x, y=info.grid_y, z=info.grid_z, colorscale="Viridis", ncontours=15,
                             colorbar={"title": {"text": "val acc"}}, opacity=0.85, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=info.x, y=info.y, mode="markers", customdata=list(zip(info.numbers, info.z)),
                             marker={"color": "white", "size": 8, "line": {"color": "black", "width": 1}},
                             showlegend=False,
                             hovertemplate="trial %{customdata[0]}<br>" + LABELS[info.x_key] + " %{x:.3g}<br>"
                             + LABELS[info.y_key] + " %{y:.3g}<br>val acc %{customdata[1]:.4f}<extra></extra>"))
    fig.update_xaxes(type="log", title_text=LABELS[info.x_key], exponentformat="e")
    fig.update_yaxes(type="log", title_text=LABELS[info.y_key], exponentformat="e")
    return fig
