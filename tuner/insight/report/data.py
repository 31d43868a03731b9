"""The read model of a study: read once from a storage into plain `TrialRow`s.

Every panel extracts what it shows from a `StudyData`; nothing here draws. The attr keys come from
`tuner.storage.keys`, and so does which trials are the best COMPLETE ones. This module imports neither
plotly nor torch.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.insight.report.style import KINDS
from tuner.insight.verify import summary
from tuner.storage import keys
from tuner.storage.database import display, require_study
from tuner.study.config import config_from_stored
from tuner.study.space import suggest


@dataclass(frozen=True)
class TrialRow:
    number: int
    kind: str  # one of KINDS; "diverged" is a PRUNED trial whose loss blew up
    value: float | None  # the objective (val accuracy) of a COMPLETE trial
    params: dict[str, Any] | None  # the export-format params (user attr keys.PARAMS)
    knobs: dict[str, Any]  # flat knob values derived from params (see `knobs_of`)
    history: list[dict[str, Any]]  # per-epoch records
    curve: dict[int, float]  # epoch -> reported val accuracy (intermediate values)
    seconds: float | None  # training time (user attr keys.SECONDS)
    start: dt.datetime | None
    complete: dt.datetime | None
    diverged_epoch: int | None = None
    error: str | None = None
    stage: str | None = None  # a staged study: the trial's stage (user attr keys.STAGE)

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
    verify: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial -> `verify_stats` of `tuner verify`
    storage: str | None = None  # for display: password hidden
    direction: str = "maximize"
    frozen: list[FrozenTrial] = field(default_factory=list, repr=False)

    @property
    def complete(self) -> list[TrialRow]:
        """COMPLETE trials with a value, best first (ties: the earlier trial), as `keys.completed` ranks them."""
        ranked = keys.completed(self.frozen)
        if self.direction == "minimize":  # a plain Optuna study; tuner's objective is always maximised
            ranked = sorted(ranked, key=lambda t: (float(t.value or 0.0), t.number))  # values: never None here
        rows = {t.number: t for t in self.trials}
        return [rows[t.number] for t in ranked if t.number in rows]

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
        return "diverged" if t.user_attrs.get(keys.DIVERGED) else "pruned"
    if t.state == TrialState.FAIL:
        return "failed"
    return "running" if t.state == TrialState.RUNNING else "waiting"


def _params_from_trial(t: FrozenTrial, config: dict[str, Any]) -> dict[str, Any] | None:
    """The params of a trial without the params attr, rebuilt from its sampled values."""
    if not config.get("space"):
        return None
    try:
        cfg = config_from_stored(config, config.get("name", "study"))
        return suggest(optuna.trial.FixedTrial(t.params, t.number), cfg.space, cfg.training).to_dict()
    except Exception:  # noqa: BLE001 - a trial we cannot interpret just has no knobs
        return None


def row_of(t: FrozenTrial, config: dict[str, Any] | None = None) -> TrialRow:
    params = t.user_attrs.get(keys.PARAMS)
    if not isinstance(params, dict):
        params = _params_from_trial(t, config or {})
    history = t.user_attrs.get(keys.HISTORY) or []
    curve = {int(k): float(v) for k, v in t.intermediate_values.items() if v is not None and math.isfinite(v)}
    if not curve and history:
        curve = {int(h["epoch"]): float(h["val_accuracy"]) for h in history if "val_accuracy" in h}
    kind = _kind(t)
    diverged_epoch = None
    if kind == "diverged":
        at = t.user_attrs.get(keys.DIVERGED_AT) or {}
        diverged_epoch = int(at.get("epoch") or (max(curve) + 1 if curve else 1))
    seconds = t.user_attrs.get(keys.SECONDS)
    return TrialRow(
        number=t.number, kind=kind, value=t.value if kind == "complete" else None, params=params,
        knobs=knobs_of(params), history=list(history), curve=curve,
        seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
        start=t.datetime_start, complete=t.datetime_complete, diverged_epoch=diverged_epoch,
        error=t.user_attrs.get(keys.ERROR) or (t.system_attrs or {}).get("fail_reason"),
        stage=str(t.user_attrs[keys.STAGE]) if keys.STAGE in t.user_attrs else None,
    )


def verify_stats(records: dict[int, dict[int, float]]) -> dict[int, dict[str, Any]]:
    """{trial: {"mean", "std", "n", "seeds", "values"}} from `keys.verify_records` ({trial: {seed: value}}),
    computed by `tuner.insight.verify.summary` (sample std, 0 for one run; a diverged run was stored as 0)."""
    return {int(number): summary(by_seed) for number, by_seed in records.items() if by_seed}


def study_data_from_trials(name: str, trials: Iterable[FrozenTrial], *, config: dict[str, Any] | None = None,
                           verify: dict[int, dict[int, float]] | None = None, storage: str | None = None,
                           direction: str | None = None) -> StudyData:
    """`verify`: the `tuner verify` records, {trial number: {seed: value}} as `keys.verify_records` gives."""
    config = config or {}
    frozen = sorted(trials, key=lambda t: t.number)
    return StudyData(
        name=name, config=config, trials=[row_of(t, config) for t in frozen], verify=verify_stats(verify or {}),
        storage=storage, direction=direction or config.get("direction", "maximize"), frozen=frozen)


def load_study_data(storage: optuna.storages.BaseStorage, name: str, url: str | None = None) -> StudyData:
    """Read a study (trials, stored config, verify records) from a storage. `url` is only displayed,
    with its password hidden."""
    study_id = require_study(storage, name)
    attrs = storage.get_study_user_attrs(study_id)
    directions = storage.get_study_directions(study_id)
    direction = "minimize" if directions and directions[0] == optuna.study.StudyDirection.MINIMIZE else "maximize"
    return study_data_from_trials(
        name, storage.get_all_trials(study_id, deepcopy=False), config=attrs.get(keys.CONFIG) or {},
        verify=keys.verify_records(attrs), storage=display(url) if url else None, direction=direction)


def reasons(data: StudyData) -> str:
    """Why there is nothing to plot, in terms of what the study has."""
    c = {k: v for k, v in data.counts.items() if v}
    if not c:
        return "the study has no trials yet"
    plural = "s" if sum(c.values()) > 1 else ""
    return "the study has " + ", ".join(f"{v} {k}" for k, v in c.items()) + " trial" + plural


def no_complete(data: StudyData) -> str:
    return f"no COMPLETE trial with a value ({reasons(data)})"
