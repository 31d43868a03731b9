"""The best trial of a study as a params file: the format `tuner train` reads, plus a `study:` block.

When `tuner verify` has stored seed statistics, the config with the best mean wins, not the best
single run, and the `study:` block says so. The file never holds a storage URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import TunerError
from .objective import ATTR_PARAMS
from .params import dump_params, parse_params
from .storage import require_study
from .sweep import ATTR_CONFIG

ATTR_VERIFY = "tuner_verify"  # study attr written by `tuner verify`: {trial number: {mean, std, values, seeds}}


def completed(storage: optuna.storages.BaseStorage, name: str) -> list[FrozenTrial]:
    """COMPLETE trials, best first (diverged trials are pruned, so never here)."""
    study_id = require_study(storage, name)
    trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted((t for t in trials if t.value is not None), key=lambda t: (-t.value, t.number))


def choose_best(storage: optuna.storages.BaseStorage, name: str) -> tuple[FrozenTrial, dict[str, Any]]:
    """The winning trial and the `study:` block describing why it won."""
    trials = completed(storage, name)
    if not trials:
        raise TunerError(f"study {name!r} has no COMPLETE trial to export yet")
    study_id = storage.get_study_id_from_name(name)
    attrs = storage.get_study_user_attrs(study_id)
    config = attrs.get(ATTR_CONFIG) or {}
    verify = {int(k): v for k, v in (attrs.get(ATTR_VERIFY) or {}).items() if v.get("n", 0) > 0}
    block: dict[str, Any] = {"name": name, "direction": config.get("direction", "maximize"),
                             "dataset": config.get("dataset")}
    by_number = {t.number: t for t in trials}
    verified = [n for n in verify if n in by_number]
    if verified:
        number = max(verified, key=lambda n: (verify[n]["mean"], -n))
        best = by_number[number]
        stats = verify[number]
        block.update(trial=number, value=float(best.value), selected_by="verified mean over seeds",
                     mean=float(stats["mean"]), std=float(stats["std"]), seeds=list(stats["seeds"]))
    else:
        best = trials[0]
        block.update(trial=best.number, value=float(best.value), selected_by="best single run")
    return best, block


def export_text(storage: optuna.storages.BaseStorage, name: str) -> str:
    best, block = choose_best(storage, name)
    params = parse_params(best.user_attrs[ATTR_PARAMS])  # validated: exactly what `tuner train` accepts
    return dump_params(params, extra={"study": block})


def write_export(storage: optuna.storages.BaseStorage, name: str, out: Path | None) -> str:
    text = export_text(storage, name)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return text
