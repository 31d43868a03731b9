"""Schedule-aware pruning: a trial is not judged at an epoch that ends inside its own lr warm-up
(one-cycle: its rise). The pure rule (`optim.first_judged_epoch`), the study-file setting, and real
sweeps on SQLite with an aggressive pruner, with the setting on and off."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from sweeps import study_file, trials

from tuner.engine.sweep import Flags, run_sweep
from tuner.errors import ConfigError
from tuner.storage import keys
from tuner.study.config import load_study_file, parse_study
from tuner.study.params import ScheduleParams
from tuner.training.optim import LRSchedule, first_judged_epoch


@pytest.mark.parametrize("sched, epochs, per_epoch, first", [
    (ScheduleParams("constant"), 10, 10, 1),  # no warm-up: epoch 1 is judged
    (ScheduleParams("cosine"), 1, 1, 1),
    (ScheduleParams("cosine", warmup_fraction=0.3), 10, 10, 4),  # 30 warm-up steps: epoch 3 ends at step 29
    (ScheduleParams("linear", warmup_fraction=0.2), 10, 10, 3),  # epoch 2 ends at step 19, the last warm-up step
    (ScheduleParams("step", warmup_fraction=0.05), 10, 10, 1),  # 5 warm-up steps, all inside epoch 1
    (ScheduleParams("exponential", warmup_fraction=0.3), 10, 7, 4),  # round(21) steps: 4 × 7 − 1 = 27 >= 21
    (ScheduleParams("constant", warmup_fraction=0.6), 4, 15, 3),  # the sweep test's schedule: 36 steps
    (ScheduleParams("onecycle"), 10, 10, 3),  # rise = pct_start 0.25: 25 steps
    (ScheduleParams("onecycle", pct_start=0.4), 10, 10, 5),
    (ScheduleParams("onecycle", warmup_fraction=0.5), 10, 10, 6),  # warmup_fraction wins over pct_start
    (ScheduleParams("cosine", warmup_fraction=0.99), 10, 1, 11),  # no epoch ends past it: never judged
])
def test_first_judged_epoch(sched, epochs, per_epoch, first):
    assert first_judged_epoch(sched, epochs, per_epoch) == first


@pytest.mark.parametrize("name", ["constant", "step", "exponential", "cosine", "linear", "onecycle"])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.25, 0.5, 0.77])
@pytest.mark.parametrize("epochs, per_epoch", [(1, 1), (3, 15), (10, 7), (6, 1), (20, 3)])
def test_first_judged_epoch_agrees_with_the_lr_schedule(name, warmup, epochs, per_epoch):
    """The judged epoch's last step is past the warm-up; the epoch before it ends inside it."""
    sched = ScheduleParams(name, warmup_fraction=warmup)
    w = LRSchedule(sched, epochs * per_epoch, per_epoch).warmup
    first = first_judged_epoch(sched, epochs, per_epoch)
    assert first >= 1
    assert first * per_epoch - 1 >= w
    if first > 1:
        assert (first - 1) * per_epoch - 1 < w


def _study(**pruner: object) -> dict:
    return {"name": "s", "dataset": "synthetic", "model": "tiny", "n_trials": 1, "space": {"lr": 0.01},
            "pruner": {"name": "median", **pruner}}


def test_setting_defaults_off_and_turns_on():
    # off by default since the 2026-12-03 measurements (benchmarks/RESULTS.md, docs/study-files.md "Samplers and pruners"): it kept no winner
    assert parse_study(_study(), file="s.yaml").pruner.schedule_aware is False
    assert parse_study({**_study(), "pruner": "median"}, file="s.yaml").pruner.schedule_aware is False
    on = parse_study(_study(schedule_aware=True), file="s.yaml")
    assert on.pruner.schedule_aware is True
    # stored with the study, and read back by workers
    assert parse_study(on.to_dict(), file="study 's'").pruner.schedule_aware is True


def test_setting_must_be_a_bool():
    with pytest.raises(ConfigError) as err:
        parse_study(_study(schedule_aware="yes"), file="s.yaml")
    line = str(err.value)
    assert "s.yaml" in line and "pruner.schedule_aware" in line and "true or false" in line and "\n" not in line


WARMUP_SPACE = {
    "lr": {"low": 1.0e-3, "high": 0.5, "log": True},
    "optimizer": "adam",
    "schedule": "constant",
    "warmup_fraction": 0.6,  # 4 epochs of 15 steps: 36 warm-up steps, epochs 1 and 2 end inside it
}
HELD_UNTIL = 3


def _sweep(tmp_path, aware: bool):
    path = study_file(tmp_path, name=f"warm-{aware}".lower(), epochs=4, n_trials=8, space=WARMUP_SPACE,
                      sampler={"name": "random"},
                      pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0},
                              "schedule_aware": aware})
    url = f"sqlite:///{tmp_path / f'{aware}.db'}"
    config = load_study_file(path)
    result = run_sweep(config, Flags(storage=url, device="cpu"))
    assert sum(result.counts.values()) == 8
    return trials(url, config.name)


def _pruned_at(t) -> int:
    return max(t.intermediate_values)


def test_sweep_holds_pruning_until_the_warmup_has_passed(tmp_path):
    ts = _sweep(tmp_path, aware=True)
    for t in ts:
        assert t.user_attrs[keys.PRUNE_HELD_UNTIL] == HELD_UNTIL
        # every epoch is still reported: the learning curve is complete up to where the trial stopped
        assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs"] + 1))
        if t.state == TrialState.PRUNED and not t.user_attrs.get("diverged"):
            assert _pruned_at(t) >= HELD_UNTIL, (t.number, t.intermediate_values)


def test_without_it_trials_are_pruned_inside_the_warmup(tmp_path):
    ts = _sweep(tmp_path, aware=False)
    assert all(keys.PRUNE_HELD_UNTIL not in t.user_attrs for t in ts)
    early = [t.number for t in ts if t.state == TrialState.PRUNED and not t.user_attrs.get("diverged")
             and _pruned_at(t) < HELD_UNTIL]
    assert early, [(t.number, t.state.name, dict(t.intermediate_values)) for t in ts]


def test_no_attr_without_a_warmup_past_the_first_epoch(tmp_path):
    space = {**WARMUP_SPACE, "warmup_fraction": 0.0, "lr": 0.01}
    path = study_file(tmp_path, name="nowarm", epochs=2, n_trials=2, space=space, sampler={"name": "random"})
    url = f"sqlite:///{tmp_path / 'nowarm.db'}"
    run_sweep(load_study_file(path), Flags(storage=url, device="cpu"))
    ts = trials(url, "nowarm")
    assert len(ts) == 2 and all(keys.PRUNE_HELD_UNTIL not in t.user_attrs for t in ts)
