"""The best trial of a study as a params file: the format `tuner train` reads, plus a `study:` block.

When `tuner verify` has stored seed records, the config with the best mean wins, not the best
single run, and the `study:` block says so. The file never holds a storage URL.

A population-based (PBT) study's trials are segments of members' runs (`keys.is_segment`). Its
winner is the best COMPLETE last segment (one that trained up to `training.epochs`), and the export
is the winner's lineage as a schedule: `optimizer:` and `clipping:` hold the first segment's values,
`intervals:` one entry per segment with the values it trained with, from the epoch it started at;
`tuner train` replays it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.errors import TunerError
from tuner.files import atomic_write
from tuner.insight.verify import summary
from tuner.storage import keys
from tuner.storage.database import require_study
from tuner.study.params import Interval, TrialParams, dump_params, parse_params

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
    if any(keys.is_segment(t) for t in trials):
        return _best_segment(trials, block, name)
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


def _best_segment(trials: list[FrozenTrial], block: dict[str, Any],
                  name: str) -> tuple[FrozenTrial, dict[str, Any]]:
    """A population-based study's winner: the best COMPLETE segment that ends its member's run."""
    best = keys.pbt_winner(trials)
    if best is None:
        raise TunerError(f"study {name!r} is population-based and no member has completed its run yet "
                         "(no COMPLETE last segment to export)")
    block.update(trial=best.number, member=int(best.user_attrs[keys.PBT_MEMBER]), value=float(best.value),  # type: ignore[arg-type]
                 selected_by="best last segment of a population-based run (its lineage, as intervals)")
    return best, block


def export_text(storage: optuna.storages.BaseStorage, name: str) -> str:
    study_id = require_study(storage, name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    return text_for(*choose_best_of(trials, storage.get_study_user_attrs(study_id), name), trials=trials)


def text_for(best: FrozenTrial, block: dict[str, Any], *, trials: Iterable[FrozenTrial] = ()) -> str:
    """The params file of the winning trial, with its `study:` block. A PBT segment's is its lineage's
    schedule (`lineage_params`), from `trials` (the study's)."""
    if keys.is_segment(best):
        chain = keys.lineage(best, {t.number: t for t in trials})
        params = lineage_params(chain)
        block = {**block, "lineage": [t.number for t in chain]}
    else:
        params = parse_params(best.user_attrs[keys.PARAMS])  # validated: exactly what `tuner train` accepts
    return dump_params(params, extra={"study": block})


def lineage_params(chain: list[FrozenTrial]) -> TrialParams:
    """The params that replay a PBT lineage (generation 0 first): the last segment's fixed params,
    `optimizer:` and `clipping:` from the first segment, and one `intervals:` entry per segment, from the
    epoch before its first one, with the mutable values of its `params` attr. Validated like a file."""
    if not chain:
        raise TunerError("an empty lineage has nothing to export")
    segments: list[tuple[int, TrialParams]] = []
    expected = 1
    for t in chain:
        span = t.user_attrs.get(keys.PBT_EPOCHS)
        if not (isinstance(span, list) and len(span) == 2 and int(span[0]) == expected):
            raise TunerError(f"trial {t.number}: its lineage does not cover every epoch from 1 (pbt_epochs {span!r}, "
                             f"expected to start at epoch {expected}); the study is incomplete")
        params = parse_params(t.user_attrs[keys.PARAMS])
        segments.append((int(span[0]) - 1, params.at_epoch(int(span[0]) - 1)))
        expected = int(span[1]) + 1
    winner = parse_params(chain[-1].user_attrs[keys.PARAMS])
    first = segments[0][1].optimizer
    optimizer = replace(winner.optimizer, lr=first.lr, betas=first.betas, eps=first.eps,
                        weight_decay=first.weight_decay)
    clipping = winner.clipping
    if clipping.mode != "none":
        clipping = replace(clipping, threshold=segments[0][1].clipping.threshold)
    intervals = tuple(
        Interval(from_epoch=start, lr=p.optimizer.lr, betas=p.optimizer.betas, eps=p.optimizer.eps,
                 weight_decay=p.optimizer.weight_decay,
                 clip_threshold=p.clipping.threshold if winner.clipping.mode != "none" else None)
        for start, p in segments)
    out = replace(winner, optimizer=optimizer, clipping=clipping, intervals=intervals)
    return parse_params(out.to_dict())  # the same checks as a file `tuner train` reads


def write_export(storage: optuna.storages.BaseStorage, name: str, out: Path | None) -> str:
    """The export text; with `out`, also written there atomically (never half a file)."""
    text = export_text(storage, name)
    if out is not None:
        atomic_write(out, text)
    return text
