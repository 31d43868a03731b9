"""A population-based study's export: the winner's lineage as `intervals:`, and `tuner train` replaying it.

The study is built with plain Optuna (COMPLETE trials carrying the segment attrs a PBT worker writes),
so the test needs no PBT engine: 2 members, 3 epochs, one epoch per segment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from tuner.errors import TunerError
from tuner.insight.export import choose_best_of, lineage_params, text_for
from tuner.storage import keys
from tuner.study.params import parse_params

SPEC = "synthetic:200"
NAME = "pbt"
EPOCHS = 3


def segment_params(lr: float, beta1: float, eps: float, wd: float, clip: float) -> dict[str, Any]:
    return parse_params({
        "optimizer": {"name": "adam", "lr": lr, "betas": [beta1, 0.999], "eps": eps, "weight_decay": wd},
        "schedule": {"name": "constant"},
        "clipping": {"mode": "norm", "threshold": clip},
        "training": {"model": "tiny", "epochs": EPOCHS, "batch_size": 32, "dataset": SPEC, "seed": 0},
    }).to_dict()


# (number, member, generation, parent, exploit, value, (lr, beta1, eps, weight_decay, clip threshold))
SEGMENTS = [
    (0, 0, 0, None, False, 0.30, (3e-3, 0.9, 1e-8, 1e-4, 1.0)),
    (1, 1, 0, None, False, 0.95, (1e-3, 0.85, 1e-8, 0.0, 2.0)),  # the best value, but not a last segment
    (2, 0, 1, 0, False, 0.40, (3e-3, 0.9, 1e-8, 1e-4, 1.0)),
    (3, 1, 1, 0, True, 0.45, (2.4e-3, 0.8, 1e-7, 2e-4, 0.5)),  # member 1 copied member 0 and explored
    (4, 0, 2, 2, False, 0.50, (3e-3, 0.9, 1e-8, 1e-4, 1.0)),
    (5, 1, 2, 3, False, 0.60, (4e-3, 0.8, 1e-6, 2e-4, 0.8)),  # the winner: lineage 0 -> 3 -> 5
]
WINNER_LINEAGE = [0, 3, 5]


def segment_trial(number: int, member: int, generation: int, parent: int | None, exploit: bool, value: float,
                  knobs: tuple[float, ...]) -> optuna.trial.FrozenTrial:
    lr, beta1, eps, wd, clip = knobs
    return create_trial(state=TrialState.COMPLETE, value=value, user_attrs={
        keys.PARAMS: segment_params(lr, beta1, eps, wd, clip),
        keys.PBT_MEMBER: member, keys.PBT_GENERATION: generation, keys.PBT_PARENT: parent,
        keys.PBT_EXPLOIT: exploit,
        keys.PBT_KNOBS: {"lr": lr, "beta1": beta1, "eps": eps, "weight_decay": wd, "clip_threshold": clip},
        keys.PBT_EPOCHS: [generation + 1, generation + 1],
    })


@pytest.fixture
def pbt_study(tmp_path: Path) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    study = optuna.create_study(study_name=NAME, storage=url, direction="maximize")
    study.set_user_attr(keys.CONFIG, {"direction": "maximize", "dataset": SPEC})
    for row in SEGMENTS:
        study.add_trial(segment_trial(*row))
    return url, study


def expected_intervals() -> list[dict[str, Any]]:
    by_number = {row[0]: row for row in SEGMENTS}
    out = []
    for epoch, number in enumerate(WINNER_LINEAGE):
        lr, beta1, eps, wd, clip = by_number[number][6]
        out.append({"from_epoch": epoch, "lr": lr, "betas": [beta1, 0.999], "eps": eps, "weight_decay": wd,
                    "clip_threshold": clip})
    return out


def test_export_writes_the_winners_lineage_as_intervals(pbt_study: tuple[str, optuna.Study]) -> None:
    _, study = pbt_study
    trials = study.get_trials(deepcopy=False)
    best, block = choose_best_of(trials, study.user_attrs, NAME)
    assert best.number == 5 and block["trial"] == 5 and block["member"] == 1 and block["value"] == 0.6
    data = yaml.safe_load(text_for(best, block, trials=trials))
    assert data["intervals"] == expected_intervals()
    # optimizer: and clipping: hold the first segment's values; the rest is the winner's
    assert data["optimizer"] == {"name": "adam", "lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                 "weight_decay": 1e-4, "amsgrad": False}
    assert data["clipping"] == {"mode": "norm", "threshold": 1.0}
    assert data["training"]["epochs"] == EPOCHS and data["schedule"]["name"] == "constant"
    assert data["study"]["lineage"] == WINNER_LINEAGE and data["study"]["name"] == NAME
    params = parse_params(data)  # what `tuner train` reads
    assert params.at_epoch(2).optimizer.lr == 4e-3 and params.at_epoch(2).clipping.threshold == 0.8


def test_export_best_api_writes_the_lineage(pbt_study: tuple[str, optuna.Study], tmp_path: Path) -> None:
    import tuner

    _, study = pbt_study
    text = tuner.export_best(study, tmp_path / "best.yaml")
    assert yaml.safe_load(text)["intervals"] == expected_intervals()
    assert (tmp_path / "best.yaml").read_text() == text


def test_no_finished_member_is_an_error(tmp_path: Path) -> None:
    study = optuna.create_study(study_name=NAME, storage=f"sqlite:///{tmp_path / 'db.db'}", direction="maximize")
    for row in SEGMENTS[:4]:  # generations 0 and 1 only
        study.add_trial(segment_trial(*row))
    with pytest.raises(TunerError, match="no member has completed its run"):
        choose_best_of(study.get_trials(), study.user_attrs, NAME)


def test_a_lineage_with_a_gap_is_refused() -> None:
    trials = [segment_trial(*row) for row in SEGMENTS]
    with pytest.raises(TunerError, match="does not cover every epoch"):
        lineage_params([trials[3], trials[5]])  # generation 0 missing


def test_tuner_train_replays_the_exported_lineage(cli, pbt_study: tuple[str, optuna.Study], tmp_path: Path) -> None:
    url, _ = pbt_study
    export = cli("export", NAME, "-o", "best.yaml", "--storage", url)
    assert export.returncode == 0, export.stderr
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert exported["intervals"] == expected_intervals()
    assert exported["study"]["trial"] == 5 and exported["study"]["member"] == 1

    run = cli("train", "best.yaml", "--json", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["outcome"] == "completed" and out["epochs"] == EPOCHS
    # constant schedule: each epoch's lr is the lr of its segment
    assert [rec["lr"] for rec in out["history"]] == [i["lr"] for i in expected_intervals()]
    assert out["params"]["intervals"] == expected_intervals()
