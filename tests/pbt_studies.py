"""A population-based (PBT) study built with plain Optuna, as the PBT engine records one: 4 members,
3 segments of 2 epochs each (6 epochs in all), and 2 exploit events.

    generation 0 (epochs 1-2)   trials 0..3: members 0..3, values 0.40 0.30 0.35 0.20
    generation 1 (epochs 3-4)   trials 4..7: member 3 copies member 0 (trial 0)   -> trial 7
    generation 2 (epochs 5-6)   trials 8..11: member 1 copies member 3 (trial 7)  -> trial 9 (the winner, 0.72)

The winner's lineage: trial 0 (member 0) -> trial 7 (member 3, ← member 0) -> trial 9 (member 1, ← member 3).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from tuner.storage import keys
from tuner.study.config import parse_study

EPOCHS, INTERVAL = 6, 2
CONFIG = {"name": "pbt", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": EPOCHS,
          "batch_size": 64, "seed": 0, "n_trials": 12, "sampler": {"name": "random"}, "pruner": {"name": "none"},
          "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                    "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True}}}
DISTS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "one_minus_beta1": FloatDistribution(0.01, 0.5, log=True)}

# (member, parent trial or None, exploit, lr, one_minus_beta1, value), in trial-number order
SEGMENTS: list[tuple[int, int | None, bool, float, float, float]] = [
    (0, None, False, 1e-3, 0.1, 0.40), (1, None, False, 3e-3, 0.05, 0.30),
    (2, None, False, 1e-2, 0.2, 0.35), (3, None, False, 3e-2, 0.02, 0.20),
    (0, 0, False, 1e-3, 0.1, 0.55), (1, 1, False, 3e-3, 0.05, 0.45),
    (2, 2, False, 1e-2, 0.2, 0.50), (3, 0, True, 1.2e-3, 0.08, 0.60),
    (0, 4, False, 1e-3, 0.1, 0.65), (1, 7, True, 9.6e-4, 0.096, 0.72),
    (2, 6, False, 1e-2, 0.2, 0.58), (3, 7, False, 1.2e-3, 0.08, 0.70),
]
WINNER, CHAIN = 9, [0, 7, 9]


def params(lr: float, omb1: float) -> dict[str, Any]:
    return {"optimizer": {"name": "adam", "lr": lr, "betas": [1.0 - omb1, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                          "amsgrad": False},
            "schedule": {"name": "constant", "warmup_fraction": 0.0},
            "clipping": {"mode": "none", "threshold": None},
            "training": {"model": "tiny", "epochs": EPOCHS, "batch_size": 64, "dataset": "synthetic:300", "seed": 0,
                         "val_fraction": 0.1, "augment": True, "precision": "auto", "compile": False}}


def segment_trials(segments: list[tuple[int, int | None, bool, float, float, float]] | None = None,
                   states: dict[int, TrialState] | None = None) -> list[FrozenTrial]:
    """The study's trials (numbered as `SEGMENTS` lists them); `states` overrides some trials' state."""
    segments = SEGMENTS if segments is None else segments
    out: list[FrozenTrial] = []
    curves: dict[int, dict[int, float]] = {}
    for number, (member, parent, exploit, lr, omb1, value) in enumerate(segments):
        generation = 0 if parent is None else out[parent].user_attrs[keys.PBT_GENERATION] + 1
        first = generation * INTERVAL + 1
        last = first + INTERVAL - 1
        start = 0.1 if parent is None else curves[parent][first - 1]
        own = {e: round(start + (value - start) * (e - first + 1) / INTERVAL, 4) for e in range(first, last + 1)}
        curves[number] = {**(curves[parent] if parent is not None else {}), **own}  # the lineage's epochs re-reported
        state = (states or {}).get(number, TrialState.COMPLETE)
        history = [{"epoch": e, "val_accuracy": v, "train_loss": 1.0, "val_loss": 1.0, "lr": lr}
                   for e, v in sorted(own.items())]
        user = {keys.PARAMS: params(lr, omb1), keys.HISTORY: history, keys.SECONDS: 1.0, keys.ENV: {"device": "cpu"},
                keys.PBT_MEMBER: member, keys.PBT_GENERATION: generation, keys.PBT_PARENT: parent,
                keys.PBT_EXPLOIT: exploit, keys.PBT_KNOBS: {"lr": lr, "one_minus_beta1": omb1},
                keys.PBT_EPOCHS: [first, last]}
        out.append(create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                params={"lr": lr, "one_minus_beta1": omb1}, distributions=DISTS, user_attrs=user,
                                intermediate_values=curves[number]))
    return out


def make_pbt_study(storage: Any, name: str = "pbt", **kw: Any) -> optuna.Study:
    """The PBT study on `storage`, with the stored tuner config `tuner best`/`report`/`dashboard` read."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    study.set_user_attr(keys.CONFIG, parse_study({**CONFIG, "name": name}).to_dict())
    study.add_trials(segment_trials(**kw))
    return study
