"""Top K configs: every Adam setting of the best COMPLETE trials, with `tuner verify` statistics.

A table, not a figure: `top_table_html(info)` draws it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from tuner.insight.report.data import StudyData, no_complete


@dataclass
class TopInfo:
    rows: list[dict[str, Any]] = field(default_factory=list)
    verified: bool = False
    staged: bool = False  # a staged study: a stage column
    missing: str | None = None


def top_info(data: StudyData, k: int = 10) -> TopInfo:
    info = TopInfo()
    for rank, t in enumerate(data.complete[:k], start=1):
        v = data.verify.get(t.number)
        info.rows.append({"rank": rank, "trial": t.number, "value": t.value,
                          "verified": v if v and v.get("n") else None, "knobs": t.knobs,
                          "epochs": len(t.history) or None, "seconds": t.seconds, "stage": t.stage})
        info.verified = info.verified or bool(v and v.get("n"))
        info.staged = info.staged or t.stage is not None
    if not info.rows:
        info.missing = no_complete(data)
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
    heads = ["rank", "trial", "val acc"] + (["verified mean ± std (n)"] if info.verified else []) + (
        ["stage"] if info.staged else []) + [
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
        if info.staged:
            cells.append(r["stage"] or "–")
        cells += [_fmt(k.get("optimizer")), _fmt(k.get("lr")), _fmt(k.get("beta1"), ".4g"), _fmt(k.get("beta2"), ".5g"),
                  _fmt(k.get("eps"), ".2g"), _fmt(k.get("weight_decay"), ".2g"), _fmt(k.get("amsgrad")),
                  _fmt(k.get("schedule")), _fmt(k.get("warmup_fraction"), ".2f"), clip, _fmt(r["epochs"]),
                  _fmt(r["seconds"], ".1f")]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table class='data'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads)
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")
