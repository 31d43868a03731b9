"""The human table (Rich when available, plain text otherwise) and the final JSON line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .core import Figure, Measurement, Target


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def _status(target: Target | None, value: Any) -> str:
    if target is None:
        return ""
    met = target.met(value)
    return "" if met is None else ("ok" if met else "MISS")


def rows(figures: Sequence[Figure], results: dict[str, Measurement],
         errors: dict[str, str]) -> list[tuple[str, str, str, str, str, str]]:
    """(key, value, unit, target, status, note) per reported key."""
    out = []
    for fig in figures:
        if fig.name in errors:
            out.append((fig.name, "error", "", "", "ERROR", errors[fig.name]))
            continue
        m = results[fig.name]
        for i, key in enumerate(fig.keys):
            value = m.values.get(key)
            target = fig.targets.get(key)
            note = (f"skipped: {m.skipped}" if m.skipped else m.note) if i == 0 else ""
            out.append((key, _fmt(value), fig.units.get(key, ""), target.text if target else "",
                        "skip" if m.skipped else _status(target, value), note))
    return out


def print_table(title: str, table_rows: list[tuple[str, ...]]) -> None:
    header = ("figure", "value", "unit", "target", "", "how / note")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *table_rows]) for i in range(5)]
        print(title)
        for r in [header, *table_rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        return
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i == 1 else "left", overflow="fold",
                         no_wrap=i < 5)
    colour = {"ok": "green", "MISS": "red", "ERROR": "red", "skip": "yellow"}
    for r in table_rows:
        status = f"[{colour[r[4]]}]{r[4]}[/]" if r[4] in colour else r[4]
        table.add_row(r[0], r[1], r[2], r[3], status, r[5])
    Console(file=sys.stdout, width=max(150, Console().width), soft_wrap=False).print(table)


def json_line(figures: Sequence[Figure], results: dict[str, Measurement], errors: dict[str, str],
              meta: dict[str, Any]) -> str:
    """One line: every figure key at the top level (null when skipped or failed), then
    `targets_met`, `skipped`, `errors`, `details` (per figure name) and `meta`."""
    out: dict[str, Any] = {}
    targets_met: dict[str, bool] = {}
    skipped: dict[str, str] = {}
    details: dict[str, Any] = {}
    for fig in figures:
        m = results.get(fig.name)
        for key in fig.keys:
            value = None if m is None else m.values.get(key)
            out[key] = value
            target = fig.targets.get(key)
            if target is not None and target.met(value) is not None:
                targets_met[key] = bool(target.met(value))
        if m is not None:
            if m.skipped:
                skipped[fig.name] = m.skipped
            if m.details:
                details[fig.name] = m.details
    out.update(targets_met=targets_met, skipped=skipped, errors=errors, details=details, meta=meta)
    return json.dumps(_finite(out), separators=(",", ":"), allow_nan=False, default=str)


def _finite(obj: Any) -> Any:
    """NaN and infinities become null, so the line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
