"""Parallel coordinates: one line per COMPLETE trial over the knobs that varied, coloured by accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import LABELS, LOG_KNOBS

PARALLEL_KNOBS = ("lr", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay", "warmup_fraction",
                  "clip_threshold", "optimizer", "schedule", "clipping", "amsgrad")


@dataclass
class Dimension:
    key: str
    label: str
    values: list[float]  # as drawn: log10 for log knobs, indices for categorical ones
    tickvals: list[float] | None = None
    ticktext: list[str] | None = None


@dataclass
class ParallelInfo:
    numbers: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    dimensions: list[Dimension] = field(default_factory=list)
    missing: str | None = None


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Ticks for a log10 axis: both ends (so the axis spans the data) and the decades between them."""
    decades = [float(v) for v in range(math.ceil(lo), math.floor(hi) + 1) if min(v - lo, hi - v) > 0.2]
    vals = sorted({lo, hi, *decades})
    return vals, [f"1e{v:.0f}" if v in decades else f"{10 ** v:.2g}" for v in vals]


def parallel_info(data: StudyData) -> ParallelInfo:
    rows = [t for t in data.complete if t.knobs]
    rows.sort(key=lambda t: t.number)
    info = ParallelInfo(numbers=[t.number for t in rows],
                        accuracy=[float(t.value) for t in rows])  # type: ignore[arg-type]
    if len(rows) < 2:
        info.missing = (f"parallel coordinates need at least 2 COMPLETE trials with params, this study has "
                        f"{len(rows)} ({reasons(data)})")
        return info
    for key in PARALLEL_KNOBS:
        raw = [t.knobs.get(key) for t in rows]
        if len({repr(v) for v in raw}) < 2:
            continue  # fixed in this study: nothing to see
        if key == "clip_threshold":
            logs = [math.log10(v) for v in raw if v is not None and v > 0]
            if not logs:
                continue
            off = math.floor(min(logs)) - 1.0
            tv, tt = _log_ticks(min(logs), max(logs))
            info.dimensions.append(Dimension(key, LABELS[key], [math.log10(v) if v else off for v in raw],
                                             [off] + tv, ["off"] + tt))
        elif key in LOG_KNOBS or (key == "weight_decay" and all(v and v > 0 for v in raw)):
            logs = [math.log10(float(v)) for v in raw if v is not None]
            tv, tt = _log_ticks(min(logs), max(logs))
            info.dimensions.append(Dimension(key, LABELS[key] + " (log)", logs, tv, tt))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            info.dimensions.append(Dimension(key, LABELS[key], [float(v) for v in raw if v is not None]))
        else:
            cats = sorted({str(v) for v in raw})
            info.dimensions.append(Dimension(key, LABELS[key], [float(cats.index(str(v))) for v in raw],
                                             [float(i) for i in range(len(cats))], cats))
    if not info.dimensions:
        info.missing = "every knob had the same value in all COMPLETE trials"
    return info


def parallel_figure(info: ParallelInfo) -> Any:
    dims = [{"label": d.label, "values": d.values, **({"tickvals": d.tickvals, "ticktext": d.ticktext}
                                                       if d.tickvals is not None else {})}
            for d in info.dimensions]
    dims.append({"label": "val accuracy", "values": info.accuracy})
    fig = go.Figure(go.Parcoords(line={"color": info.accuracy, "colorscale": "Viridis", "showscale": True,
                                       "colorbar": {"title": {"text": "val acc"}}},
                                 dimensions=dims))
    fig.update_layout(margin={"l": 70, "r": 60, "t": 80, "b": 30})
    return fig
