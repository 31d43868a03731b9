"""Hyperparameter importances: Optuna's PED-ANOVA over COMPLETE trials, keyed by knob name."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, reasons
from tuner.insight.report.style import STYLE

MIN_IMPORTANCE_TRIALS = 2


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
                        f"this study has {len(complete)} ({reasons(data)})")
        return info
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            study = optuna.create_study(direction=optuna.study.StudyDirection[data.direction.upper()])
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
    names = list(info.importances)[::-1]
    fig = go.Figure(go.Bar(x=[info.importances[n] for n in names], y=names, orientation="h",
                           marker_color=STYLE["complete"][0],
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title=f"importance (PED-ANOVA, {info.n_trials} COMPLETE trials)", yaxis_title="knob")
    return fig
