"""The report of one study: its header, its panels in order, and the file.

`report_sections(data)` turns each panel's info into a figure, or into the reason it cannot be
drawn; `build_report` renders the page and `write_report` reads a study and writes the file.
The page shows the storage only as `data.storage` (password hidden).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from tuner.insight.lineage import acc, pbt_lineage
from tuner.insight.report.data import StudyData, load_study_data
from tuner.insight.report.page import Section, render_page, write_html
from tuner.insight.report.panels import (
    CONTOUR_PAIRS,
    contour_figure,
    contour_info,
    curves_figure,
    curves_info,
    grad_figure,
    grad_info,
    history_figure,
    history_info,
    importance_figure,
    importance_info,
    knobs_figure,
    knobs_height,
    lineage_figure,
    lineage_info,
    parallel_figure,
    parallel_info,
    slice_figure,
    slice_info,
    timeline_figure,
    timeline_info,
    top_info,
    top_table_html,
)
from tuner.storage import keys


def space_text(spec: Any) -> str:
    """One knob of a stored search space, as read: `{a, b}`, `low … high (log)`, or `fixed: VALUE`."""
    if isinstance(spec, dict) and "choices" in spec:
        return "{" + ", ".join(str(c) for c in spec["choices"]) + "}"
    if isinstance(spec, dict) and "low" in spec:
        return f"{spec['low']:g} … {spec['high']:g}" + (" (log)" if spec.get("log") else "")
    return f"fixed: {spec}"


def space_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(knob, `space_text`) for each knob of the stored config's search space, in file order."""
    return [(k, space_text(v)) for k, v in (config.get("space") or {}).items()]


def stages_text(data: StudyData) -> str:
    """A staged study's stages in order: the knobs each searched, its trials (retried ones once) of
    those planned, and the best value found in it."""
    gone = keys.superseded(data.frozen)
    parts = []
    for i, stage in enumerate(data.config.get("stages") or [], start=1):
        if not isinstance(stage, dict):
            continue
        rows = [t for t in data.trials if t.stage == stage.get("name") and t.number not in gone]
        done = [t for t in rows if t.value is not None]
        best = max(done, key=lambda t: (t.value, -t.number)) if done else None
        parts.append(f"{i}. {stage.get('name')} ({', '.join(map(str, stage.get('knobs') or []))}): "
                     f"{len(rows)} of {stage.get('trials')} trials"
                     + (f", best {best.value:.4f} (trial {best.number})" if best and best.value is not None else ""))
    return "; ".join(parts)


def population_text(data: StudyData) -> str:
    """A population-based study in one line: members, segments, exploits and the winner ("" otherwise)."""
    lin = pbt_lineage(data.frozen)
    if lin is None:
        return ""
    w = lin.winner
    return (f"{len(lin.members)} members, {len(lin.segments)} segments, {len(lin.exploits)} exploit events; "
            + (f"winner trial {w.number} (member {w.member}, {acc(w.value)}), lineage "
               + " → ".join(str(s.number) for s in lin.chain) if w else "no member has finished its run yet"))


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
    space = space_rows(c)
    if space:
        rows.append(("space", "; ".join(f"{k} {text}" for k, text in space)))
    stages = stages_text(data)
    if stages:
        rows.append(("stages", stages))
    population = population_text(data)
    if population:
        rows.append(("population", population))
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
    pbt = lineage_info(data)
    if pbt.lineage is not None:  # a population-based study: its lineage and its knobs over epochs
        add("PBT lineage", "Population-based training: one marker per segment at the epoch it ended, one row per "
            "member. A line joins each segment to the segment whose checkpoint it started from: grey from its own "
            "member, orange dashed where it copied a better member (exploit, then explore). The winner's lineage "
            "is the dark band, its segments the black diamonds.", pbt, lineage_figure,
            height=max(320, 120 + 60 * len(pbt.lineage.members)))
        add("PBT knobs over epochs", "Each mutable knob as it was in force from each segment's start: a faint "
            "step line per member, and the winner's lineage in bold.", pbt, knobs_figure, height=knobs_height(pbt))
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


def write_report(storage: optuna.storages.BaseStorage, name: str, out: Path, *, top: int = 10,
                 url: str | None = None) -> StudyData:
    """Read study `name` and write its report to `out`; `url` is shown with its password hidden."""
    data = load_study_data(storage, name, url)
    write_html(build_report(data, top), out)
    return data
