"""The best trial of a study as a params file: the format `tuner train` reads, plus a `study:` block.

When `tuner verify` has stored seed records, the config with the best mean wins, not the best
single run, and the `study:` block says so. The file never holds a storage URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.errors import TunerError
from tuner.files import atomic_write
from tuner.insight.verify import summary
from tuner.storage import keys
from tuner.storage.database import require_study
from tuner.study.params import dump_params, parse_params

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

def choose_best(storage: optuna.storages.BaseStorage, name: str) -> tuple[FrozenTrial, dict[str, Any]]:
    """The winning trial and the `study:` block describing why it won."""
    study_id = require_study(storage, name)
    return choose_best_of(storage.get_all_trials(study_id, deepcopy=False), storage.get_study_user_attrs(study_id),
                          name)


def choose_best_of(all_trials: list[FrozenTrial], attrs: dict[str, Any],
                   name: str) -> tuple[FrozenTrial, dict[str, Any]]:
    """`choose_best` over a study's trials and user attrs (as `optuna.Study` gives them)."""
    trials = keys.completed(all_trials)
    if not trials:
        raise TunerError(f"study {name!r} has no COMPLETE trial to export yet")
    config = attrs.get(keys.CONFIG) or {}
    block: dict[str, Any] = {"name": name, "direction": config.get("direction", "maximize"),
                             "dataset": config.get("dataset")}
    by_number = {t.number: t for t in trials}
    verified = {n: summary(by_seed) for n, by_seed in keys.verify_records(attrs).items()
                if by_seed and n in by_number}
    if verified:
        number = max(verified, key=lambda n: (verified[n]["mean"], -n))
        best = by_number[number]
        stats = verified[number]
        block.update(trial=number, value=float(best.value), selected_by="verified mean over seeds",  # type: ignore[arg-type]
                     mean=float(stats["mean"]), std=float(stats["std"]), seeds=list(stats["seeds"]))
    else:
        best = trials[0]
        block.update(trial=best.number, value=float(best.value), selected_by="best single run")  # type: ignore[arg-type]
    return best, block


def export_text(storage: optuna.storages.BaseStorage, name: str) -> str:
    return text_for(*choose_best(storage, name))


def text_for(best: FrozenTrial, block: dict[str, Any]) -> str:
    """The params file of the winning trial, with its `study:` block."""
    params = parse_params(best.user_attrs[keys.PARAMS])  # validated: exactly what `tuner train` accepts
    return dump_params(params, extra={"study": block})


def write_export(storage: optuna.storages.BaseStorage, name: str, out: Path | None) -> str:
    """The export text; with `out`, also written there atomically (never half a file)."""
    text = export_text(storage, name)
    if out is not None:
        atomic_write(out, text)
    return text
