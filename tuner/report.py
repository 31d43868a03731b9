"""`tuner report`: one self-contained HTML file about a study, readable with no network.

Data extraction and drawing are separate. `load_study_data` reads a study once into plain
`TrialRow`s; each panel then has an `*_info(data) -> dataclass` function that extracts what the
panel shows, and a `*_figure(info) -> go.Figure` function that draws it. Tests check the info
objects, and the browser test checks the page. If a panel cannot be drawn (a study with one
trial, only failed or only pruned trials), its info has `missing` set to the reason, and the page
shows that reason in place of the plot.

The page inlines plotly.js once, in the head. Each figure is a `<div>` and a small script. A hook
that runs before plotly records JavaScript errors in `<pre id="js-errors">` so a headless browser
can check for them. The page shows the storage only through `storage.display` (password hidden).
"""

from __future__ import annotations

import datetime as dt
import html
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .export import ATTR_VERIFY
from .objective import ATTR_DIVERGED, ATTR_ERROR, ATTR_HISTORY, ATTR_PARAMS, ATTR_SECONDS
from .storage import display, require_study
from .sweep import ATTR_CONFIG

# How each kind of trial is drawn: (colour, line dash, legend label)
STYLE: dict[str, tuple[str, str, str]] = {
    "complete": ("#1f77b4", "solid", "complete"),
    "pruned": ("#ff7f0e", "dash", "pruned"),
    "diverged": ("#d62728", "dot", "diverged (x: where it blew up)"),
    "failed": ("#7f7f7f", "dashdot", "failed"),
    "running": ("#2ca02c", "solid", "running"),
    "waiting": ("#bcbd22", "solid", "waiting"),
}
KINDS = tuple(STYLE)

# Knobs as they are shown: key in TrialRow.knobs -> axis label
LABELS = {
    "lr": "lr", "one_minus_beta1": "1 − beta1", "one_minus_beta2": "1 − beta2", "beta1": "beta1",
    "beta2": "beta2", "eps": "eps", "weight_decay": "weight decay", "warmup_fraction": "warmup fraction",
    "clip_threshold": "clip threshold", "optimizer": "optimizer", "schedule": "schedule",
    "clipping": "clipping", "amsgrad": "amsgrad",
}
LOG_KNOBS = ("lr", "one_minus_beta1", "one_minus_beta2", "eps", "clip_threshold")
SLICE_KNOBS = ("lr", "eps", "one_minus_beta1", "one_minus_beta2", "clip_threshold")
CONTOUR_PAIRS = (("lr", "one_minus_beta1"), ("lr", "eps"))
MIN_CONTOUR_POINTS = 4
MIN_IMPORTANCE_TRIALS = 2
PARALLEL_KNOBS = ("lr", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay", "warmup_fraction",
                  "clip_threshold", "optimizer", "schedule", "clipping", "amsgrad")


# ---------------------------------------------------------------------------------------------
# Study data: read once, as plain rows
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialRow:
    number: int
    kind: str  # one of KINDS; "diverged" is a PRUNED trial whose loss blew up
    value: float | None  # the objective (val accuracy) of a COMPLETE trial
    params: dict[str, Any] | None  # the export-format params (user attr "params")
    knobs: dict[str, Any]  # flat knob values derived from params (see `knobs_of`)
    history: list[dict[str, Any]]  # per-epoch records
    curve: dict[int, float]  # epoch -> reported val accuracy (intermediate values)
    seconds: float | None  # training time (user attr "seconds")
    start: dt.datetime | None
    complete: dt.datetime | None
    diverged_epoch: int | None = None
    error: str | None = None

    @property
    def last_value(self) -> float | None:
        """The objective if COMPLETE, else the last reported val accuracy."""
        if self.value is not None:
            return self.value
        return self.curve[max(self.curve)] if self.curve else None


@dataclass
class StudyData:
    name: str
    config: dict[str, Any]  # the stored tuner config ({} if the study was not made by tuner)
    trials: list[TrialRow]  # by trial number
    verify: dict[int, dict[str, Any]] = field(default_factory=dict)  # from `tuner verify`
    storage: str | None = None  # for display: password hidden
    direction: str = "maximize"
    frozen: list[FrozenTrial] = field(default_factory=list, repr=False)

    @property
    def complete(self) -> list[TrialRow]:
        """COMPLETE trials with a value, best first."""
        rows = [t for t in self.trials if t.kind == "complete" and t.value is not None]
        sign = -1.0 if self.direction == "maximize" else 1.0
        return sorted(rows, key=lambda t: (sign * t.value, t.number))  # type: ignore[operator]

    @property
    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for t in self.trials:
            out[t.kind] += 1
        return out

    @property
    def best(self) -> TrialRow | None:
        rows = self.complete
        return rows[0] if rows else None


def knobs_of(params: dict[str, Any] | None) -> dict[str, Any]:
    """Flat Adam knobs from an export-format params dict, whichever way the space sampled them:
    1 − beta is computed from `betas`, and `clip_threshold` is None when clipping is off."""
    if not params:
        return {}
    o, s, c = params.get("optimizer") or {}, params.get("schedule") or {}, params.get("clipping") or {}
    b1, b2 = (list(o.get("betas") or (0.9, 0.999)) + [None, None])[:2]
    mode = c.get("mode", "none")
    return {
        "optimizer": o.get("name", "adam"), "lr": o.get("lr"), "beta1": b1, "beta2": b2,
        "one_minus_beta1": None if b1 is None else 1.0 - b1, "one_minus_beta2": None if b2 is None else 1.0 - b2,
        "eps": o.get("eps"), "weight_decay": o.get("weight_decay"), "amsgrad": bool(o.get("amsgrad", False)),
        "schedule": s.get("name"), "warmup_fraction": s.get("warmup_fraction"),
        "clipping": mode, "clip_threshold": None if mode == "none" else c.get("threshold"),
    }


def _kind(t: FrozenTrial) -> str:
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "diverged" if t.user_attrs.get(ATTR_DIVERGED) else "pruned"
    if t.state == TrialState.FAIL:
        return "failed"
    return "running" if t.state == TrialState.RUNNING else "waiting"


def _params_from_trial(t: FrozenTrial, config: dict[str, Any]) -> dict[str, Any] | None:
    """The params of a trial without the "params" attr, rebuilt from its sampled values."""
    if not config.get("space"):
        return None
    try:
        from .config import config_from_stored
        from .space import suggest

        cfg = config_from_stored(config, config.get("name", "study"))
        return suggest(optuna.trial.FixedTrial(t.params, t.number), cfg.space, cfg.training).to_dict()
    except Exception:  # noqa: BLE001 - a trial we cannot interpret just has no knobs
        return None


def row_of(t: FrozenTrial, config: dict[str, Any] | None = None) -> TrialRow:
    params = t.user_attrs.get(ATTR_PARAMS)
    if not isinstance(params, dict):
        params = _params_from_trial(t, config or {})
    history = t.user_attrs.get(ATTR_HISTORY) or []
    curve = {int(k): float(v) for k, v in t.intermediate_values.items() if v is not None and math.isfinite(v)}
    if not curve and history:
        curve = {int(h["epoch"]): float(h["val_accuracy"]) for h in history if "val_accuracy" in h}
    kind = _kind(t)
    diverged_epoch = None
    if kind == "diverged":
        at = t.user_attrs.get("diverged_at") or {}
        diverged_epoch = int(at.get("epoch") or (max(curve) + 1 if curve else 1))
    seconds = t.user_attrs.get(ATTR_SECONDS)
    return TrialRow(
        number=t.number, kind=kind, value=t.value if kind == "complete" else None, params=params,
        knobs=knobs_of(params), history=list(history), curve=curve,
        seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
        start=t.datetime_start, complete=t.datetime_complete, diverged_epoch=diverged_epoch,
        error=t.user_attrs.get(ATTR_ERROR) or (t.system_attrs or {}).get("fail_reason"),
    )


def study_data_from_trials(name: str, trials: Iterable[FrozenTrial], *, config: dict[str, Any] | None = None,
                           verify: dict[str, Any] | None = None, storage: str | None = None,
                           direction: str | None = None) -> StudyData:
    config = config or {}
    frozen = sorted(trials, key=lambda t: t.number)
    return StudyData(
        name=name, config=config, trials=[row_of(t, config) for t in frozen],
        verify={int(k): v for k, v in (verify or {}).items() if isinstance(v, dict)},
        storage=storage, direction=direction or config.get("direction", "maximize"), frozen=frozen)


def load_study_data(storage: optuna.storages.BaseStorage, name: str, url: str | None = None) -> StudyData:
    """Read a study (trials, stored config, verify statistics) from a storage."""
    study_id = require_study(storage, name)
    attrs = storage.get_study_user_attrs(study_id)
    directions = storage.get_study_directions(study_id)
    direction = "minimize" if directions and directions[0] == optuna.study.StudyDirection.MINIMIZE else "maximize"
    return study_data_from_trials(
        name, storage.get_all_trials(study_id, deepcopy=False), config=attrs.get(ATTR_CONFIG) or {},
        verify=attrs.get(ATTR_VERIFY) or {}, storage=display(url) if url else None, direction=direction)


def _reasons(data: StudyData) -> str:
    """Why there is nothing to plot, in terms of what the study has."""
    c = {k: v for k, v in data.counts.items() if v}
    if not c:
        return "the study has no trials yet"
    plural = "s" if sum(c.values()) > 1 else ""
    return "the study has " + ", ".join(f"{v} {k}" for k, v in c.items()) + " trial" + plural


def _no_complete(data: StudyData) -> str:
    return f"no COMPLETE trial with a value ({_reasons(data)})"


# ---------------------------------------------------------------------------------------------
# Panels: *_info extracts, *_figure draws
# ---------------------------------------------------------------------------------------------

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
        info.missing = _no_complete(data)
    return info


def history_figure(info: HistoryInfo) -> Any:
    import plotly.graph_objects as go

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


@dataclass
class Curve:
    number: int
    kind: str
    epochs: list[int]
    values: list[float]
    diverged_epoch: int | None = None


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
        info.curves.append(Curve(t.number, t.kind, epochs, [t.curve[e] for e in epochs], t.diverged_epoch))
        info.counts[t.kind] = info.counts.get(t.kind, 0) + 1
    if not info.curves:
        info.missing = f"no trial reported a validation accuracy ({_reasons(data)})"
    return info


def curves_figure(info: CurvesInfo) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for c in sorted(info.curves, key=lambda c: KINDS.index(c.kind)):  # complete trials underneath
        color, dash, label = STYLE[c.kind]
        first = c.kind not in shown
        shown.add(c.kind)
        x, y = list(c.epochs), list(c.values)
        symbols = ["circle"] * len(x)
        if c.kind == "diverged":  # an x where it blew up: after its last evaluated epoch
            x.append(c.diverged_epoch or (x[-1] + 1 if x else 1))
            y.append(y[-1] if y else 0.0)
            symbols.append("x")
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=label, legendgroup=c.kind, showlegend=first,
            line={"color": color, "dash": dash, "width": 1.5 if c.kind == "complete" else 1.2},
            marker={"color": color, "symbol": symbols,
                    "size": [6 if c.kind == "complete" else 8] * (len(x) - 1) + [12 if c.kind == "diverged" else 8]},
            opacity=1.0 if c.kind == "complete" else 0.75,
            hovertemplate=f"trial {c.number} ({c.kind})<br>epoch %{{x}}<br>val acc %{{y:.4f}}<extra></extra>"))
    fig.update_layout(xaxis_title="epoch", yaxis_title="val accuracy", legend_title_text="trial state")
    return fig


@dataclass
class ImportanceInfo:
    importances: dict[str, float] = field(default_factory=dict)  # knob name -> importance, largest first
    n_trials: int = 0
    note: str | None = None  # a caveat (few trials)
    missing: str | None = None


def importance_info(data: StudyData) -> ImportanceInfo:
    frozen = {t.number: t for t in data.frozen}
    complete = [frozen[t.number] for t in data.complete if t.number in frozen]
    info = ImportanceInfo(n_trials=len(complete))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        info.missing = (f"importances need at least {MIN_IMPORTANCE_TRIALS} COMPLETE trials, "
                        f"this study has {len(complete)} ({_reasons(data)})")
        return info
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            study = optuna.create_study(direction=data.direction)
            study.add_trials(complete)
            values = optuna.importance.get_param_importances(study)
        except Exception as exc:  # noqa: BLE001
            info.missing = f"importances could not be computed: {exc}"
            return info
    if not values:
        info.missing = "no knob was sampled in every COMPLETE trial (nothing to rank)"
        return info
    if any("importances will be equal" in str(w.message) for w in caught):
        info.missing = f"too few COMPLETE trials ({len(complete)}) to tell the knobs apart"
        return info
    info.importances = dict(sorted(values.items(), key=lambda kv: -kv[1]))
    if len(complete) < 10:
        info.note = f"based on only {len(complete)} COMPLETE trials: a rough ranking"
    return info


def importance_figure(info: ImportanceInfo) -> Any:
    import plotly.graph_objects as go

    names = list(info.importances)[::-1]
    fig = go.Figure(go.Bar(x=[info.importances[n] for n in names], y=names, orientation="h",
                           marker_color=STYLE["complete"][0],
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title=f"importance (PED-ANOVA, {info.n_trials} COMPLETE trials)", yaxis_title="knob")
    return fig


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
                        f"{len(rows)} ({_reasons(data)})")
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
            logs = [math.log10(float(v)) for v in raw]
            tv, tt = _log_ticks(min(logs), max(logs))
            info.dimensions.append(Dimension(key, LABELS[key] + " (log)", logs, tv, tt))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            info.dimensions.append(Dimension(key, LABELS[key], [float(v) for v in raw]))
        else:
            cats = sorted({str(v) for v in raw})
            info.dimensions.append(Dimension(key, LABELS[key], [float(cats.index(str(v))) for v in raw],
                                             [float(i) for i in range(len(cats))], cats))
    if not info.dimensions:
        info.missing = "every knob had the same value in all COMPLETE trials"
    return info


def parallel_figure(info: ParallelInfo) -> Any:
    import plotly.graph_objects as go

    dims = [{"label": d.label, "values": d.values, **({"tickvals": d.tickvals, "ticktext": d.ticktext}
                                                       if d.tickvals is not None else {})}
            for d in info.dimensions]
    dims.append({"label": "val accuracy", "values": info.accuracy})
    fig = go.Figure(go.Parcoords(line={"color": info.accuracy, "colorscale": "Viridis", "showscale": True,
                                       "colorbar": {"title": {"text": "val acc"}}},
                                 dimensions=dims))
    fig.update_layout(margin={"l": 70, "r": 60, "t": 80, "b": 30})
    return fig


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
        info.missing = _no_complete(data)
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
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

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
    import numpy as np

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
                        + (f" ({_reasons(data)})" if not info.x else ""))
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
    import plotly.graph_objects as go

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
        info.missing = f"no trial recorded a training epoch ({_reasons(data)})"
    return info


def grad_figure(info: GradInfo) -> Any:
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

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


@dataclass
class Bar:
    number: int
    kind: str
    start: dt.datetime
    end: dt.datetime


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
        info.bars.append(Bar(t.number, t.kind, t.start, max(end, t.start)))
    if not info.bars:
        info.missing = f"no trial has started ({_reasons(data)})"
    return info


def timeline_figure(info: TimelineInfo) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for kind in KINDS:
        bars = [b for b in info.bars if b.kind == kind]
        if not bars:
            continue
        fig.add_trace(go.Bar(
            base=[b.start.isoformat() for b in bars],
            x=[max(1.0, (b.end - b.start).total_seconds() * 1000) for b in bars],  # ms on a date axis
            y=[b.number for b in bars], orientation="h", name=STYLE[kind][2], marker_color=STYLE[kind][0],
            customdata=[[(b.end - b.start).total_seconds(), b.start.strftime("%H:%M:%S")] for b in bars],
            hovertemplate="trial %{y}<br>start %{customdata[1]}<br>%{customdata[0]:.1f} s<extra>" + kind + "</extra>"))
    fig.update_layout(barmode="overlay", xaxis={"type": "date", "title": {"text": "wall time"}},
                      yaxis={"title": {"text": "trial"}, "autorange": "reversed"}, bargap=0.2)
    return fig


@dataclass
class TopInfo:
    rows: list[dict[str, Any]] = field(default_factory=list)
    verified: bool = False
    missing: str | None = None


def top_info(data: StudyData, k: int = 10) -> TopInfo:
    info = TopInfo()
    for rank, t in enumerate(data.complete[:k], start=1):
        v = data.verify.get(t.number)
        info.rows.append({"rank": rank, "trial": t.number, "value": t.value,
                          "verified": v if v and v.get("n") else None, "knobs": t.knobs, "epochs": len(t.history) or None, "seconds": t.seconds})
        info.verified = info.verified or bool(v and v.get("n"))
    if not info.rows:
        info.missing = _no_complete(data)
    return info


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def top_table_html(info: TopInfo) -> str:
    heads = ["rank", "trial", "val acc"] + (["verified mean ± std (n)"] if info.verified else []) + [
        "optimizer", "lr", "beta1", "beta2", "eps", "weight decay", "amsgrad", "schedule", "warmup", "clipping",
        "epochs", "seconds"]
    body = []
    for r in info.rows:
        k, v = r["knobs"], r["verified"]
        clip = k.get("clipping") or "–"
        if clip != "none" and k.get("clip_threshold") is not None:
            clip = f"{clip} {k['clip_threshold']:.3g}"
        cells = [str(r["rank"]), str(r["trial"]), _fmt(r["value"], ".4f")]
        if info.verified:
            cells.append(f"{v['mean']:.4f} ± {v['std']:.4f} ({v['n']})" if v else "–")
        cells += [_fmt(k.get("optimizer")), _fmt(k.get("lr")), _fmt(k.get("beta1"), ".4g"), _fmt(k.get("beta2"), ".5g"),
                  _fmt(k.get("eps"), ".2g"), _fmt(k.get("weight_decay"), ".2g"), _fmt(k.get("amsgrad")),
                  _fmt(k.get("schedule")), _fmt(k.get("warmup_fraction"), ".2f"), clip, _fmt(r["epochs"]),
                  _fmt(r["seconds"], ".1f")]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table class='data'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads)
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

@dataclass
class Section:
    title: str
    description: str
    figure: Any = None  # a plotly Figure, or None
    body_html: str = ""  # extra HTML (tables), shown under the figure
    missing: str | None = None  # shown instead of the figure
    note: str | None = None  # a caveat shown above the figure
    height: int = 420


_ERROR_HOOK = """<script>
(function () {
  var errors = [];
  function show() {
    var pre = document.getElementById('js-errors');
    if (pre && errors.length) { pre.textContent = 'JavaScript errors:\\n' + errors.join('\\n'); pre.hidden = false; }
  }
  function put(msg) { errors.push(String(msg)); show(); }
  window.addEventListener('error', function (e) {
    put((e.message || 'error') + (e.filename ? ' (' + e.filename + ':' + e.lineno + ')' : ''));
  });
  window.addEventListener('unhandledrejection', function (e) {
    put('unhandled rejection: ' + (e.reason && e.reason.message ? e.reason.message : e.reason));
  });
  var original = console.error;
  console.error = function () { put('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                 return original.apply(console, arguments); };
  document.addEventListener('DOMContentLoaded', show);
})();
</script>"""

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; } .meta td { padding: 0.1em 1em 0.1em 0; vertical-align: top; }
.desc { color: #555; margin: 0.3em 0 0.6em 0; max-width: 70em; }
.missing { background: #fff6e5; border-left: 4px solid #f0a020; padding: 0.8em 1em; color: #6a4a00; }
.note { color: #8a5a00; font-style: italic; }
table.data { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.data th { background: #f4f4f4; } table.data tr.differs td { font-weight: bold; }
table.data td:first-child, table.data th:first-child { text-align: left; }
#js-errors { background: #fee; color: #900; padding: 1em; white-space: pre-wrap; }
.footer { color: #999; font-size: 0.8em; margin-top: 3em; }
"""


def figure_html(fig: Any, div_id: str, height: int) -> str:
    fig.update_layout(height=height, template="plotly_white")
    if not fig.layout.margin.to_plotly_json():
        fig.update_layout(margin={"l": 60, "r": 30, "t": 40, "b": 50})
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def render_page(title: str, header_html: str, sections: list[Section]) -> str:
    """A complete HTML document: plotly.js inlined once, every section a figure or a note."""
    from plotly.offline import get_plotlyjs

    parts = []
    for i, s in enumerate(sections):
        anchor = f"panel-{i + 1}"
        parts.append(f"<section id='{anchor}'><h2>{html.escape(s.title)}</h2>"
                     f"<p class='desc'>{html.escape(s.description)}</p>")
        if s.missing:
            parts.append(f"<p class='missing'>Not drawn: {html.escape(s.missing)}</p>")
        else:
            if s.note:
                parts.append(f"<p class='note'>{html.escape(s.note)}</p>")
            if s.figure is not None:
                parts.append(figure_html(s.figure, f"fig-{i + 1}", s.height))
            parts.append(s.body_html)
        parts.append("</section>")
    toc = " · ".join(f"<a href='#panel-{i + 1}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections))
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>\n{_ERROR_HOOK}\n"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head><body>\n"
        "<pre id='js-errors' hidden></pre>\n"
        f"{header_html}<p class='toc'>{toc}</p>\n" + "\n".join(parts)
        + f"\n<p class='footer'>generated by tuner on {html.escape(stamp)}; self-contained, works offline</p>"
        "\n</body></html>\n")


def _space_text(spec: Any) -> str:
    if isinstance(spec, dict) and "choices" in spec:
        return "{" + ", ".join(str(c) for c in spec["choices"]) + "}"
    if isinstance(spec, dict) and "low" in spec:
        return f"{spec['low']:g} … {spec['high']:g}" + (" (log)" if spec.get("log") else "")
    return f"fixed: {spec}"


def header_html(data: StudyData) -> str:
    c = data.config
    counts = ", ".join(f"{v} {k}" for k, v in data.counts.items() if v) or "none"
    best = data.best
    budget = (f"{c.get('model', '?')} on {c.get('dataset', '?')}, {c.get('epochs', '?')} epochs, "
              f"batch {c.get('batch_size', '?')}, seed {c.get('seed', '?')}") if c else "no tuner config stored"
    algos = f"{(c.get('sampler') or {}).get('name', '?')} / {(c.get('pruner') or {}).get('name', '?')}" if c else "–"
    rows = [("storage", data.storage or "–"), ("direction", data.direction), ("budget", budget),
            ("sampler / pruner", algos),
            ("trials", counts),
            ("best", f"{best.value:.4f} (trial {best.number})" if best else "no COMPLETE trial yet")]
    if data.verify:
        rows.append(("verified", ", ".join(f"trial {n}: {v['mean']:.4f} ± {v['std']:.4f} (n={v['n']})"
                                           for n, v in sorted(data.verify.items()) if v.get("n"))))
    space = c.get("space") or {}
    if space:
        rows.append(("space", "; ".join(f"{k} {_space_text(v)}" for k, v in space.items())))
    table = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h1>Study {html.escape(data.name)}</h1><table class='meta'>{table}</table>"


def report_sections(data: StudyData, top: int = 10) -> list[Section]:
    """Every panel of the report, as info -> figure, or a note when it cannot be drawn."""
    sections: list[Section] = []

    def add(title: str, desc: str, info: Any, draw: Callable[[Any], Any], height: int = 420,
            note: str | None = None) -> None:
        if info.missing:
            sections.append(Section(title, desc, missing=info.missing, height=height))
        else:
            sections.append(Section(title, desc, figure=draw(info), note=note, height=height))

    add("Optimization history", "Validation accuracy of each COMPLETE trial and the best so far; pruned and "
        "diverged trials at their last reported accuracy.", history_info(data), history_figure)
    add("Learning curves", "Validation accuracy per epoch (the values reported to the pruner). Pruned trials are "
        "dashed, diverged ones dotted red with an x where the loss blew up, failed ones grey.",
        curves_info(data), curves_figure, height=460)
    imp = importance_info(data)
    add("Hyperparameter importances", "How much each sampled knob explains the validation accuracy of COMPLETE "
        "trials (Optuna's PED-ANOVA evaluator).", imp, importance_figure, height=360, note=imp.note)
    add("Parallel coordinates", "One line per COMPLETE trial across the Adam knobs that varied (log axes for lr, "
        "1 − beta, eps; clip threshold 'off' when clipping was off), coloured by validation accuracy.",
        parallel_info(data), parallel_figure, height=460)
    add("Slices", "Validation accuracy against each knob (COMPLETE trials; darker = later trial). 1 − beta is "
        "computed from the stored betas whether the space sampled beta or 1 − beta.", slice_info(data),
        slice_figure, height=380)
    for x_key, y_key in CONTOUR_PAIRS:
        info = contour_info(data, x_key, y_key)
        add(f"Contour: {info.title}", "Validation accuracy interpolated (inverse-distance weighting, log axes) "
            "between the COMPLETE trials, which are the white dots.", info, contour_figure, height=460)
    add("Gradient norms and clipping", "Global gradient norm (90th percentile over the steps of the last "
        "evaluated epoch, before clipping) and the fraction of steps clipped, against validation accuracy.",
        grad_info(data), grad_figure, height=400)
    tl = timeline_info(data)
    add("Timeline", "Each trial from start to end on the wall clock, coloured by state (overlaps are parallel "
        "workers).", tl, timeline_figure, height=max(300, 60 + 18 * len(tl.bars)))
    ti = top_info(data, top)
    if ti.missing:
        sections.append(Section(f"Top {top} configs", "The best COMPLETE trials.", missing=ti.missing))
    else:
        sections.append(Section(f"Top {len(ti.rows)} configs", "The best COMPLETE trials by single-run "
                                "validation accuracy" + (", with `tuner verify` statistics over new seeds"
                                                         if ti.verified else "") + ".",
                                body_html=top_table_html(ti)))
    return sections


def build_report(data: StudyData, top: int = 10) -> str:
    return render_page(f"tuner report: {data.name}", header_html(data), report_sections(data, top))


def write_html(text: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


def write_report(storage: optuna.storages.BaseStorage, name: str, out: Path, *, top: int = 10,
                 url: str | None = None) -> StudyData:
    data = load_study_data(storage, name, url)
    write_html(build_report(data, top), out)
    return data
