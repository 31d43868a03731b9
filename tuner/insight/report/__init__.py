"""`tuner report`: one self-contained HTML file about a study, readable with no network.

    data.py          the read model: `load_study_data(storage, name) -> StudyData` of plain `TrialRow`s
    panels/<name>.py one panel each: `*_info(data) -> dataclass` extracts, `*_figure(info)` draws
    page.py          the HTML page (plotly.js inlined once, a JavaScript error hook), written atomically
    build.py         the report of one study: header, panels in order, `write_report`
    style.py         colours per kind of trial, knob labels

If a panel cannot be drawn (a study with one trial, only failed or only pruned trials), its info
has `missing` set to the reason, and the page shows that reason in place of the plot. Importing
this package imports no torch, and of plotly only `plotly.graph_objects` and `plotly.offline`
(about 2 ms: plotly loads its figure classes on first use); `plotly.subplots` (about 50 ms) is
imported by the figures that need it, when they are drawn.
"""

from __future__ import annotations

from tuner.insight.report.build import (
    build_report,
    header_html,
    population_text,
    report_sections,
    space_rows,
    space_text,
    stages_text,
    write_report,
)
from tuner.insight.report.data import (
    StudyData,
    TrialRow,
    knobs_of,
    load_study_data,
    no_complete,
    reasons,
    row_of,
    study_data_from_trials,
    verify_stats,
)
from tuner.insight.report.page import Section, figure_html, render_page, write_html
from tuner.insight.report.panels import *  # noqa: F403 - every panel's info, figure and constants
from tuner.insight.report.panels import __all__ as _panels
from tuner.insight.report.style import KINDS, LABELS, LOG_KNOBS, PALETTE, STYLE

__all__ = [
    "build_report", "header_html", "population_text", "report_sections", "space_rows", "space_text", "stages_text",
    "write_report",
    "StudyData", "TrialRow", "knobs_of", "load_study_data", "no_complete", "reasons", "row_of",
    "study_data_from_trials", "verify_stats",
    "Section", "figure_html", "render_page", "write_html",
    "KINDS", "LABELS", "LOG_KNOBS", "PALETTE", "STYLE",
    *_panels,
]
