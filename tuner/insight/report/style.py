"""How the report draws things: the colour and dash of each kind of trial, and knob labels.

Shared by the data model (the kinds) and every panel. Imports nothing.
"""

from __future__ import annotations

# How each kind of trial is drawn: (colour, line dash, legend label)
STYLE: dict[str, tuple[str, str, str]] = {
    "complete": ("#1f77b4", "solid", "complete"),
    "pruned": ("#ff7f0e", "dash", "pruned"),
    "diverged": ("#d62728", "dot", "diverged (x: where it blew up)"),
    "failed": ("#7f7f7f", "dashdot", "failed"),
    "running": ("#2ca02c", "solid", "running"),
    "waiting": ("#bcbd22", "solid", "waiting"),
}
KINDS = tuple(STYLE)  # every kind of trial, in drawing order ("diverged": a PRUNED trial whose loss blew up)

# Colours for categories that are not trial kinds (schedules, studies)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

# Knobs as they are shown: key in TrialRow.knobs -> axis label
LABELS = {
    "lr": "lr", "one_minus_beta1": "1 − beta1", "one_minus_beta2": "1 − beta2", "beta1": "beta1",
    "beta2": "beta2", "eps": "eps", "weight_decay": "weight decay", "warmup_fraction": "warmup fraction",
    "clip_threshold": "clip threshold", "optimizer": "optimizer", "schedule": "schedule",
    "clipping": "clipping", "amsgrad": "amsgrad",
}
LOG_KNOBS = ("lr", "one_minus_beta1", "one_minus_beta2", "eps", "clip_threshold")
