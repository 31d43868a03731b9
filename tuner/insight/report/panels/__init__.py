"""The report's panels, one module each: `*_info(data) -> dataclass` extracts, `*_figure(info)` draws.

Tests assert on the info objects; the page and the dashboard draw the figures. An info whose
`missing` is set says why its panel cannot be drawn.
"""

from __future__ import annotations

from tuner.insight.report.panels.contour import (
    CONTOUR_PAIRS,
    MIN_CONTOUR_POINTS,
    ContourInfo,
    contour_figure,
    contour_info,
)
from tuner.insight.report.panels.curves import Curve, CurvesInfo, curves_figure, curves_info
from tuner.insight.report.panels.grad import GradInfo, GradPoint, grad_figure, grad_info
from tuner.insight.report.panels.history import HistoryInfo, history_figure, history_info
from tuner.insight.report.panels.importance import (
    MIN_IMPORTANCE_TRIALS,
    ImportanceInfo,
    importance_figure,
    importance_info,
)
from tuner.insight.report.panels.lineage import (
    KNOBS_TITLE,
    TREE_TITLE,
    LineageInfo,
    knobs_figure,
    knobs_height,
    lineage_figure,
    lineage_info,
)
from tuner.insight.report.panels.parallel import (
    PARALLEL_KNOBS,
    Dimension,
    ParallelInfo,
    parallel_figure,
    parallel_info,
)
from tuner.insight.report.panels.slices import SLICE_KNOBS, SliceInfo, SliceSeries, slice_figure, slice_info
from tuner.insight.report.panels.timeline import Bar, TimelineInfo, timeline_figure, timeline_info
from tuner.insight.report.panels.top import TopInfo, top_info, top_table_html

__all__ = [
    "CONTOUR_PAIRS", "MIN_CONTOUR_POINTS", "ContourInfo", "contour_figure", "contour_info",
    "Curve", "CurvesInfo", "curves_figure", "curves_info",
    "GradInfo", "GradPoint", "grad_figure", "grad_info",
    "HistoryInfo", "history_figure", "history_info",
    "MIN_IMPORTANCE_TRIALS", "ImportanceInfo", "importance_figure", "importance_info",
    "KNOBS_TITLE", "TREE_TITLE", "LineageInfo", "knobs_figure", "knobs_height", "lineage_figure", "lineage_info",
    "PARALLEL_KNOBS", "Dimension", "ParallelInfo", "parallel_figure", "parallel_info",
    "SLICE_KNOBS", "SliceInfo", "SliceSeries", "slice_figure", "slice_info",
    "Bar", "TimelineInfo", "timeline_figure", "timeline_info",
    "TopInfo", "top_info", "top_table_html",
]
