"""`tuner compare A B [C ...]`: studies side by side, in the terminal and as one HTML file.

For each study: trials by state, the best value, the median of the top 5, the total training
time (the sum of the trials' "seconds"), and how many trials and how much training time it took
to reach 95% of the best value (its own best, and the best of all compared studies). The HTML
overlays the best-so-far curves against the trial count and against cumulative training time,
and shows the distribution of final accuracies.

Studies with different search spaces still compare: the knob table shows what each study
searched, and a knob a study did not search as "fixed: VALUE" (its fixed value, or the default).
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go

from tuner.insight.report.data import StudyData, load_study_data
from tuner.insight.report.page import Section, render_page, write_html
from tuner.insight.report.style import PALETTE
from tuner.study.space import KNOBS

TARGET_FRACTION = 0.95
TOP_N = 5


@dataclass
class StudySummary:
    name: str
    counts: dict[str, int]  # by kind: complete, pruned, diverged, failed, running, waiting
    n_trials: int
    best: float | None
    best_number: int | None
    median_top: float | None  # median of the top TOP_N COMPLETE values
    total_seconds: float  # sum of the trials' training time
    trials_to_target: int | None  # trials (in trial order, any state) until 95% of its own best
    seconds_to_target: float | None
    trials_to_common: int | None = None  # ... until 95% of the best of all compared studies
    seconds_to_common: float | None = None
    trial_counts: list[int] = field(default_factory=list)  # 1, 2, ... n
    cum_seconds: list[float] = field(default_factory=list)  # training time used after each trial
    best_so_far: list[float | None] = field(default_factory=list)  # after each trial
    final_values: list[float] = field(default_factory=list)  # values of COMPLETE trials
    knobs: dict[str, str] = field(default_factory=dict)  # knob -> what the study did with it
    dataset: str | None = None
    epochs: int | None = None


@dataclass
class CompareInfo:
    studies: list[StudySummary]
    overall_best: float | None
    knob_rows: list[str]  # knobs in display order

    @property
    def missing(self) -> str | None:
        if all(s.best is None for s in self.studies):
            return "none of the studies has a COMPLETE trial"
        return None


def _reach(s: StudySummary, target: float | None) -> tuple[int | None, float | None]:
    if target is None:
        return None, None
    for i, best in enumerate(s.best_so_far):
        if best is not None and best >= target:
            return s.trial_counts[i], s.cum_seconds[i]
    return None, None


def knob_descriptions(config: dict[str, Any]) -> dict[str, str]:
    """What a study did with each knob: a searched range or choices, or "fixed: VALUE"."""
    if not config:
        return {}
    space = config.get("space") or {}
    out: dict[str, str] = {}
    for name in KNOBS:
        if name.startswith("one_minus_"):
            continue
        om = f"one_minus_{name}" if name in ("beta1", "beta2") else None
        if om and om in space:
            spec, prefix = space[om], f"1 − {name}: "
            if not isinstance(spec, dict):
                out[name] = f"fixed: {1.0 - float(spec):g}"
                continue
        else:
            spec, prefix = space.get(name, KNOBS[name].default), ""
        if name == "clip_threshold" and space.get("clipping", "none") == "none":
            out[name] = "unused (clipping none)"
        elif isinstance(spec, dict) and "choices" in spec:
            out[name] = prefix + "{" + ", ".join(str(c) for c in spec["choices"]) + "}"
        elif isinstance(spec, dict):
            if spec.get("low") == spec.get("high"):
                out[name] = f"fixed: {spec['low']:g}"
            else:
                out[name] = prefix + f"{spec['low']:g} … {spec['high']:g}" + (" log" if spec.get("log") else "")
        else:
            shown = f"{spec:g}" if isinstance(spec, float) else str(spec).lower() if isinstance(spec, bool) else spec
            out[name] = f"fixed: {shown}"
    return out


def summarize_study(data: StudyData) -> StudySummary:
    values = [t.value for t in data.complete]  # best first
    best = data.best
    s = StudySummary(
        name=data.name, counts=data.counts, n_trials=len(data.trials),
        best=best.value if best else None, best_number=best.number if best else None,
        median_top=statistics.median(values[:TOP_N]) if values else None,  # type: ignore[type-var]
        total_seconds=sum(t.seconds or 0.0 for t in data.trials),
        trials_to_target=None, seconds_to_target=None,
        final_values=[t.value for t in sorted(data.complete, key=lambda t: t.number)],  # type: ignore[misc]
        knobs=knob_descriptions(data.config), dataset=data.config.get("dataset"), epochs=data.config.get("epochs"),
    )
    running: float | None = None
    spent = 0.0
    for i, t in enumerate(data.trials, start=1):
        spent += t.seconds or 0.0
        if t.kind == "complete" and t.value is not None:
            running = t.value if running is None else max(running, t.value)
        s.trial_counts.append(i)
        s.cum_seconds.append(spent)
        s.best_so_far.append(running)
    if s.best is not None:
        s.trials_to_target, s.seconds_to_target = _reach(s, TARGET_FRACTION * s.best)
    return s


def compare_info(datas: list[StudyData]) -> CompareInfo:
    studies = [summarize_study(d) for d in datas]
    bests = [s.best for s in studies if s.best is not None]
    overall = max(bests) if bests else None
    for s in studies:
        s.trials_to_common, s.seconds_to_common = _reach(s, None if overall is None else TARGET_FRACTION * overall)
    rows: list[str] = []
    for s in studies:
        rows += [k for k in s.knobs if k not in rows]
    # keep only knobs some study searched or fixed to something other than the others
    rows = [k for k in rows if len({s.knobs.get(k) for s in studies}) > 1
            or any(not str(s.knobs.get(k, "fixed")).startswith(("fixed", "unused")) for s in studies)]
    return CompareInfo(studies, overall, rows)


def load_compare(storage: optuna.storages.BaseStorage, names: list[str]) -> CompareInfo:
    return compare_info([load_study_data(storage, n) for n in names])


# ---------------------------------------------------------------------------------------------
# Presentation
# ---------------------------------------------------------------------------------------------

def _num(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _trials(n: int) -> str:
    return f"{n} trial{'' if n == 1 else 's'}"


def _secs(v: float | None) -> str:
    if v is None:
        return "never"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def table_rows(info: CompareInfo) -> tuple[list[str], list[list[str]]]:
    """Metric rows × study columns, for the terminal and the HTML table."""
    headers = ["", *(s.name for s in info.studies)]
    pct = f"{TARGET_FRACTION:.0%}"

    def row(label: str, cells: list[str]) -> list[str]:
        return [label, *cells]

    ss = info.studies
    rows = [
        row("budget", [f"{s.dataset or '?'}, {s.epochs or '?'} epochs" for s in ss]),
        row("trials", [str(s.n_trials) for s in ss]),
        row("by state", [", ".join(f"{k} {v}" for k, v in s.counts.items() if v) or "none" for s in ss]),
        row("best value", [f"{s.best:.4f} (trial {s.best_number})" if s.best is not None else "–" for s in ss]),
        row(f"median of top {TOP_N}", [_num(s.median_top) for s in ss]),
        row("training time", [_secs(s.total_seconds) for s in ss]),
        row(f"to {pct} of own best", [f"{_trials(s.trials_to_target)}, {_secs(s.seconds_to_target)}"
                                      if s.trials_to_target else "–" for s in ss]),
        row(f"to {pct} of overall best", [f"{_trials(s.trials_to_common)}, {_secs(s.seconds_to_common)}"
                                          if s.trials_to_common else "never" if s.best is not None else "–"
                                          for s in ss]),
    ]
    for k in info.knob_rows:
        rows.append(row(f"knob {k}", [s.knobs.get(k, "?") for s in ss]))
    return headers, rows


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    """Knob rows where the studies differ are bold: that is what the comparison is about."""
    def tr(r: list[str]) -> str:
        differs = r[0].startswith("knob ") and len(set(r[1:])) > 1
        return (f"<tr{' class=differs' if differs else ''}>"
                + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")

    return ("<table class='data'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            + "</tr></thead><tbody>" + "".join(tr(r) for r in rows) + "</tbody></table>")


def best_curve_figure(info: CompareInfo, by: str = "trials") -> Any:
    """Best-so-far value against the trial count (`by="trials"`) or cumulative training time."""
    fig = go.Figure()
    for i, s in enumerate(info.studies):
        pts = [(x, b) for x, b in zip(s.trial_counts if by == "trials" else s.cum_seconds, s.best_so_far)
               if b is not None]
        if not pts:
            continue
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=s.name,
                                 line={"shape": "hv", "color": PALETTE[i % len(PALETTE)], "width": 2},
                                 marker={"size": 5}))
    if info.overall_best is not None:
        fig.add_hline(y=TARGET_FRACTION * info.overall_best, line_dash="dot", line_color="#888",
                      annotation_text=f"{TARGET_FRACTION:.0%} of the overall best", annotation_position="bottom right")
    fig.update_layout(xaxis_title="trials" if by == "trials" else "cumulative training time (s)",
                      yaxis_title="best val accuracy so far", legend_title_text="study")
    return fig


def final_figure(info: CompareInfo) -> Any:
    """The final val accuracies of COMPLETE trials: overlaid histograms and box plots."""
    from plotly.subplots import make_subplots  # plotly.subplots (~50 ms): only when this figure is drawn

    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.08,
                        subplot_titles=("histogram", "box (every trial shown)"))
    for i, s in enumerate(info.studies):
        if not s.final_values:
            continue
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Histogram(x=s.final_values, name=s.name, legendgroup=s.name, marker_color=color,
                                   opacity=0.6, xbins={"size": 0.02}), row=1, col=1)
        fig.add_trace(go.Box(y=s.final_values, name=s.name, legendgroup=s.name, showlegend=False,
                             marker_color=color, boxpoints="all", jitter=0.4, pointpos=0), row=1, col=2)
    fig.update_layout(barmode="overlay", legend_title_text="study")
    fig.update_xaxes(title_text="final val accuracy", row=1, col=1)
    fig.update_yaxes(title_text="trials", row=1, col=1)
    fig.update_yaxes(title_text="final val accuracy", row=1, col=2)
    return fig


def compare_sections(info: CompareInfo) -> list[Section]:
    headers, rows = table_rows(info)
    sections = [Section("Side by side", "Trials, best value, median of the top 5, total training time (sum of "
                        "the trials' training seconds), and what it took to reach 95% of the best. Knob rows show "
                        "what each study searched; a knob it did not search is shown as fixed.",
                        body_html=_table_html(headers, rows))]
    empty = [s.name for s in info.studies if s.best is None]
    note = f"no COMPLETE trial in {', '.join(empty)}" if empty else None
    missing = info.missing
    for title, desc, fig in (
        ("Best so far vs trials", "The best val accuracy after each trial (any state counts as a trial used).",
         lambda: best_curve_figure(info, "trials")),
        ("Best so far vs training time", "The same curves against cumulative training time: the cost of pruning "
         "and diverging trials shows here.", lambda: best_curve_figure(info, "seconds")),
        ("Final accuracies", "Val accuracy of every COMPLETE trial, per study.", lambda: final_figure(info)),
    ):
        if missing:
            sections.append(Section(title, desc, missing=missing))
        else:
            sections.append(Section(title, desc, figure=fig(), note=note))
    return sections


def build_compare(info: CompareInfo) -> str:
    names = ", ".join(html.escape(s.name) for s in info.studies)
    header = f"<h1>Compare: {names}</h1>"
    return render_page("tuner compare: " + ", ".join(s.name for s in info.studies), header, compare_sections(info))


def write_compare(info: CompareInfo, out: Path) -> None:
    write_html(build_compare(info), out)


