"""What optuna-dashboard shows of a tuner study: the metric's name, a study note, tuner's own panels.

`publish(storage, name)` writes three things into the study, through optuna-dashboard's and
Optuna's public API, so that any optuna-dashboard on the same storage shows them:

- the metric name `val_accuracy` (`Study.set_metric_names`), instead of "Objective 0";
- a study note (`optuna_dashboard.save_note`): the study in one line, its search space as a table
  and its stored config as YAML. The note is tuner's text above a marker line; whatever a user
  writes below that line in the dashboard is kept when tuner rewrites its part;
- tuner's panels (`optuna_dashboard.save_plotly_graph_object`), drawn by the report's figure
  functions: gradient norms and clip fraction per trial, and learning curves coloured by schedule.

A population-based (PBT) study also gets its lineage: in the note, the winner's chain of segments
as a table and the exploit events as a list (`tuner.insight.lineage`); as panels, the lineage tree
and the mutable knobs over epochs (the report's PBT panels).

It is idempotent and cheap: every graph has a fixed id, so a second call overwrites rather than
adds, and nothing is written that is already stored as is (the note's version, which
`save_note` bumps on every write, stays put when the text is the same). A study without a stored
tuner config is left alone: its objective need not be an accuracy. Imports no torch; plotly's
figure classes load when a graph is drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna
import plotly.graph_objects as go
import yaml
from optuna_dashboard import get_note, save_note, save_plotly_graph_object

from tuner.insight.lineage import lineage_markdown, pbt_lineage
from tuner.insight.report.build import space_rows
from tuner.insight.report.data import StudyData, study_data_from_trials
from tuner.insight.report.panels.curves import curves_figure, curves_info
from tuner.insight.report.panels.grad import grad_figure, grad_info
from tuner.insight.report.panels.lineage import KNOBS_TITLE, TREE_TITLE, knobs_figure, lineage_figure, lineage_info
from tuner.storage import keys
from tuner.storage.database import require_study

METRIC = "val_accuracy"
NOTE_MARK = "_Written by `tuner`, which rewrites the text above this line. Text below it is yours and is kept._"
PLOT_PREFIX = "dashboard:plot_data:"  # optuna-dashboard's study system attr keys: PREFIX + id + ":" + chunk


def _grad_graph(data: StudyData) -> tuple[str, Any]:
    return _drawn("Gradient norms and clipping per trial (tuner)", grad_info(data), grad_figure)


def _curves_graph(data: StudyData) -> tuple[str, Any]:
    return _drawn("Learning curves by schedule (tuner; dashed: pruned, dotted: diverged)", curves_info(data),
                  lambda info: curves_figure(info, color_by="schedule"))


def _lineage_graph(data: StudyData) -> tuple[str, Any]:
    return _drawn(f"{TREE_TITLE} (tuner; orange dashed: exploit, dark band: the winner's lineage)",
                  lineage_info(data), lineage_figure)


def _pbt_knobs_graph(data: StudyData) -> tuple[str, Any]:
    return _drawn(f"{KNOBS_TITLE} (tuner)", lineage_info(data), knobs_figure)


# graph id (fixed: a second publish overwrites) -> builder
GRAPHS: dict[str, Callable[[StudyData], tuple[str, Any]]] = {
    "tuner-grad-norms": _grad_graph,
    "tuner-curves-by-schedule": _curves_graph,
}
# a population-based study's graphs, written besides GRAPHS
PBT_GRAPHS: dict[str, Callable[[StudyData], tuple[str, Any]]] = {
    "tuner-pbt-lineage": _lineage_graph,
    "tuner-pbt-knobs": _pbt_knobs_graph,
}


def _drawn(title: str, info: Any, draw: Callable[[Any], Any]) -> tuple[str, Any]:
    """(title, figure): the panel's figure, or an empty one that says why it cannot be drawn."""
    if info.missing:
        fig = go.Figure()
        fig.add_annotation(text=f"Not drawn: {info.missing}", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"color": "#6a4a00"})
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    else:
        fig = draw(info)
    fig.update_layout(title={"text": title}, template="plotly_white")
    return title, fig


def note_text(data: StudyData) -> str:
    """tuner's part of the study note (Markdown): the study, its search space, its stored config."""
    c = data.config
    sampler, pruner = (c.get("sampler") or {}).get("name", "?"), (c.get("pruner") or {}).get("name", "?")
    lines = [f"## {data.name}: `{METRIC}` of {c.get('model', '?')} on {c.get('dataset', '?')}", "",
             f"The objective, **{METRIC}**, is the validation accuracy after {c.get('epochs', '?')} epochs "
             f"({data.direction}d). Batch {c.get('batch_size', '?')}, seed {c.get('seed', '?')}, "
             f"{c.get('n_trials', '?')} trials, sampler {sampler}, pruner {pruner}.", "",
             "The graphs at the end of this page are tuner's: gradient norms and clip fraction per trial, and "
             "learning curves coloured by learning-rate schedule.", ""]
    lineage = pbt_lineage(data.frozen)
    if lineage is not None:  # a population-based study: the winner's lineage and the exploit events
        lines[-2] = lines[-2][:-1] + ("; for this population-based study also its lineage tree and its mutable "
                                      "knobs over epochs, per member and along the winner's lineage.")
        lines.append(lineage_markdown(lineage))
    lines += ["### Search space", ""]
    rows = space_rows(c)
    if rows:
        lines += ["| knob | searched over |", "| --- | --- |"]
        lines += [f"| `{k}` | {text.replace('|', '/')} |" for k, text in rows]
    else:
        lines.append("No knob is searched.")
    lines += ["", "### Stored config", "", "```yaml",
              yaml.safe_dump(c, sort_keys=False, default_flow_style=None, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(lines)


def merged_note(ours: str, stored: str) -> str:
    """tuner's text, the marker line, then what a user wrote below the marker (or a note tuner did not write)."""
    user = stored.split(NOTE_MARK, 1)[1].lstrip("\n") if NOTE_MARK in stored else stored
    return f"{ours}\n{NOTE_MARK}\n" + (f"\n{user}" if user.strip() else "")


def stored_graph(system_attrs: dict[str, Any], graph_id: str) -> str:
    """The JSON optuna-dashboard holds for graph `graph_id` ("" if none): its chunks, in order."""
    prefix = f"{PLOT_PREFIX}{graph_id}:"
    chunks = {int(k[len(prefix):]): v for k, v in system_attrs.items()
              if k.startswith(prefix) and k[len(prefix):].isdigit()}
    return "".join(str(chunks[i]) for i in sorted(chunks))


def publish(storage: Any, study_name: str, trials: list[Any] | None = None) -> None:
    """Name the metric, write the study note and register tuner's graphs for optuna-dashboard.

    `storage`: an `optuna.storages.BaseStorage`. Safe to call as often as wanted (each sweep's end,
    each dashboard start): nothing is duplicated, and what is already stored as is is not rewritten.
    `trials`: the study's trials when the caller has just read them (a sweep's summary), else read here."""
    study_id = require_study(storage, study_name)  # a missing study: one line naming the studies there are
    study = optuna.load_study(study_name=study_name, storage=storage)
    config = study.user_attrs.get(keys.CONFIG)
    if not isinstance(config, dict) or not config:
        return  # not made by tuner: its objective need not be an accuracy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if len(study.directions) == 1 and study.metric_names != [METRIC]:
            study.set_metric_names([METRIC])

    direction = "minimize" if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else "maximize"
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    data = study_data_from_trials(study_name, trials, config=config, direction=direction)

    stored = get_note(study)
    note = merged_note(note_text(data), stored)
    if note != stored:
        save_note(study, note)

    system_attrs = storage.get_study_system_attrs(study_id)
    graphs = {**GRAPHS, **(PBT_GRAPHS if pbt_lineage(trials) is not None else {})}
    for graph_id, build in graphs.items():
        _, figure = build(data)
        if stored_graph(system_attrs, graph_id) != figure.to_json():
            save_plotly_graph_object(study, figure, graph_object_id=graph_id)
