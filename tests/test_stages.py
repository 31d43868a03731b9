"""Staged studies: `stages:` searches a few knobs at a time, in order, the others fixed at Adam's
defaults (first stage) or at the best values of the earlier stages. The file's checks (bad input:
exit 2, one line naming the file and the key, nothing created), the fixed-value rule, and real
sweeps with two worker processes on SQLite and PostgreSQL, where a stage starts only once every
trial of the one before has finished."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial
from sweeps import assert_clean_finish, study_file, trials

from conftest import ONE_THREAD, ROOT, cli_main
from tuner.engine.stages import Stage, default_value, fixed_values, next_stage, parse_stages
from tuner.storage import keys
from tuner.study.config import load_study_file, parse_study
from tuner.study.space import parse_space

SPACE = {
    "lr": {"low": 1.0e-3, "high": 0.05, "log": True},
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},
    "weight_decay": {"low": 1.0e-5, "high": 1.0e-2, "log": True},  # default 0: clipped to 1e-5
    "schedule": {"choices": ["constant", "cosine"]},
    "eps": 1.0e-8,  # fixed by the space
}
STAGES = [
    {"name": "lr", "knobs": ["lr"], "trials": 2},
    {"knobs": ["lr", "one_minus_beta1"], "trials": 2},  # name: stage2
    {"name": "wd+schedule", "knobs": ["weight_decay", "schedule"], "trials": 2},
]
DEFAULTS = {"lr": 1.0e-3, "one_minus_beta1": 0.1, "weight_decay": 1.0e-5, "schedule": "cosine"}


def staged_file(folder: Path, name: str = "staged", **changes) -> Path:
    data = {"dataset": "synthetic:200", "epochs": 1, "space": SPACE, "stages": STAGES, "pruner": "none",
            "sampler": {"name": "tpe", "options": {"n_startup_trials": 2}}, "n_trials": None}
    return study_file(folder, name=name, **{**data, **changes})


def _drop_none(path: Path) -> Path:
    data = {k: v for k, v in yaml.safe_load(path.read_text()).items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the file ------------------------------------------------------------------------------------

def test_stages_are_parsed_and_stored(tmp_path):
    config = load_study_file(_drop_none(staged_file(tmp_path)), check_model=False)
    assert [s.name for s in config.stages] == ["lr", "stage2", "wd+schedule"]
    assert config.stages[1] == Stage("stage2", ("lr", "one_minus_beta1"), 2)
    assert config.n_trials == 6  # the stages' sum
    stored = config.to_dict()
    assert stored["stages"][2] == {"name": "wd+schedule", "knobs": ["weight_decay", "schedule"], "trials": 2}
    again = parse_study(stored, file="study 'staged'")  # what workers read back
    assert again.stages == config.stages and again.n_trials == 6
    assert config.fingerprint()["stages"] == stored["stages"]
    plain = parse_study({k: v for k, v in stored.items() if k != "stages"})
    assert "stages" not in plain.to_dict() and plain.fingerprint()["stages"] is None
    # n_trials equal to the sum is fine
    assert load_study_file(staged_file(tmp_path, n_trials=6), check_model=False).n_trials == 6


def test_the_playbook_file():
    config = load_study_file(ROOT / "studies" / "cifar10-playbook.yaml", check_model=False)
    assert config.training.dataset == "cifar10"
    assert [s.knobs for s in config.stages] == [
        ("lr",), ("lr", "one_minus_beta1"), ("lr", "one_minus_beta1", "eps", "weight_decay"),
        ("lr", "one_minus_beta2", "schedule", "warmup_fraction")]
    assert [s.trials for s in config.stages] == [8, 12, 16, 16] and config.n_trials == 52


BAD = {  # case: (changes to the study file, extra CLI args, the key the line names, words in it)
    "unknown-knob": ({"stages": [{"knobs": ["lr", "momentum"], "trials": 2}] + STAGES[1:]}, [],
                     "stages[0].knobs[1]", ["unknown knob 'momentum'"]),
    "knob-fixed-by-space": ({"stages": STAGES + [{"knobs": ["eps"], "trials": 1}]}, [],
                            "stages[3].knobs[0]", ["'eps' is fixed in space"]),
    "knob-not-in-space": ({"stages": STAGES + [{"knobs": ["amsgrad"], "trials": 1}]}, [],
                          "stages[3].knobs[0]", ["'amsgrad' is not in space"]),
    "other-beta-spelling": ({"stages": STAGES + [{"knobs": ["beta1"], "trials": 1}]}, [],
                            "stages[3].knobs[0]", ["searches it as 'one_minus_beta1'"]),
    "zero-trials": ({"stages": [{**STAGES[0], "trials": 0}] + STAGES[1:]}, [], "stages[0].trials", [">= 1, got 0"]),
    "no-trials": ({"stages": [{"knobs": ["lr"]}] + STAGES[1:]}, [], "stages[0].trials", ["is required"]),
    "same-name": ({"stages": STAGES[:2] + [{**STAGES[2], "name": "lr"}]}, [], "stages[2].name",
                  ["overlapping", "'lr' is also the name of stages[0]"]),
    "knob-twice": ({"stages": [{"knobs": ["lr", "lr"], "trials": 2}] + STAGES[1:]}, [], "stages[0].knobs",
                   ["overlapping", "'lr' twice"]),
    "same-knobs-in-a-row": ({"stages": STAGES[:2] + [{"knobs": ["one_minus_beta1", "lr"], "trials": 3}] + STAGES[2:]},
                            [], "stages[2].knobs", ["overlapping", "merge them", "trials: 5"]),
    "unstaged-knob": ({"stages": STAGES[:2]}, [], "stages", ["weight_decay, schedule", "no stage names them"]),
    "not-a-list": ({"stages": {"lr": 2}}, [], "stages", ["non-empty list"]),
    "n-trials-off": ({"n_trials": 8}, [], "n_trials", ["is 8", "add up to 6"]),
    "n-trials-flag-off": ({}, ["--n-trials", "7"], "--n-trials", ["is 7", "add up to 6"]),
    "warm-start": ({}, ["--warm-start", "other"], "--warm-start", ["cannot be combined"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stages_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, case):
    changes, args, key, words = BAD[case]
    path = _drop_none(staged_file(tmp_path, **changes))
    db = tmp_path / "study.db"
    code, out, err = cli_main(capsys, "sweep", str(path), "--storage", f"sqlite:///{db}", *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, (code, out, err)
    assert f"{key}: " in lines[0] and "Traceback" not in err, lines[0]
    if not key.startswith("--"):
        assert str(path) in lines[0]
    else:
        assert path.name in lines[0]  # the flag's line says which file has the stages
    for word in words:
        assert word in lines[0], lines[0]
    assert not db.exists() and not (tmp_path / "study.db.artifacts").exists()


def test_bad_stages_through_a_real_process(tmp_path, cli):
    path = _drop_none(staged_file(tmp_path, stages=[{"knobs": ["lr"], "trials": 0}] + STAGES[1:]))
    run = cli("sweep", str(path), "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--workers", "2",
              env=ONE_THREAD)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert f"{path}: stages[0].trials: must be >= 1, got 0" in lines[0]
    assert not (tmp_path / "study.db").exists()


# -- the fixed-value rule ------------------------------------------------------------------------

def _trial(number: int, stage: int, params: dict, value: float | None, state=TrialState.COMPLETE,
           fixed: dict | None = None, **user) -> optuna.trial.FrozenTrial:
    space = parse_space(SPACE)
    dists = {}
    for name in params:
        knob = space.knobs[name]
        dists[name] = (optuna.distributions.CategoricalDistribution(list(knob.choices)) if hasattr(knob, "choices")
                       else optuna.distributions.FloatDistribution(knob.low, knob.high, log=knob.log))
    t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params=params,
                     distributions=dists, user_attrs={keys.STAGE_INDEX: stage, keys.STAGE_FIXED: fixed or {}, **user},
                     system_attrs={keys.QUEUED: f"t{number}"})
    t.number = number
    return t


def test_fixed_value_rule():
    space = parse_space(SPACE)
    stages = parse_stages(STAGES, space, file="t.yaml")
    # the first stage: Adam's defaults inside each knob's range (weight decay 0 -> the log range's low end)
    assert fixed_values(0, stages, space, []) == {k: v for k, v in DEFAULTS.items() if k != "lr"}
    # later stages: the best COMPLETE trial of the earlier stages, whatever stage it was in
    base = {"one_minus_beta1": 0.1, "weight_decay": 1e-5, "schedule": "cosine"}
    best = {"one_minus_beta1": 0.1, "weight_decay": 3e-3, "schedule": "constant"}  # not realistic: to tell apart
    ts = [_trial(0, 0, {"lr": 0.01, **base}, 0.5), _trial(1, 0, {"lr": 0.02, **best}, 0.7),
          _trial(2, 0, {"lr": 0.045, **base}, None, TrialState.PRUNED)]
    assert fixed_values(1, stages, space, ts) == {"weight_decay": 3e-3, "schedule": "constant"}
    ts += [_trial(3, 1, {"lr": 0.03, "one_minus_beta1": 0.05, "weight_decay": 3e-3, "schedule": "constant"}, 0.6),
           _trial(4, 1, {"lr": 0.04, "one_minus_beta1": 0.2, "weight_decay": 3e-3, "schedule": "constant"}, 0.9)]
    assert fixed_values(2, stages, space, ts) == {"lr": 0.04, "one_minus_beta1": 0.2}
    # a trial of a later stage (or of none) is never a source
    later = ts + [_trial(5, 2, {"lr": 0.049, "one_minus_beta1": 0.3, "weight_decay": 1e-3, "schedule": "cosine"}, 0.99)]
    assert fixed_values(2, stages, space, later) == {"lr": 0.04, "one_minus_beta1": 0.2}
    # a knob the best trial did not sample: the value it had fixed
    sparse = [_trial(0, 0, {"lr": 0.01}, 0.5, fixed={"one_minus_beta1": 0.3, "weight_decay": 2e-3,
                                                        "schedule": "constant"})]
    assert fixed_values(1, stages, space, sparse) == {"weight_decay": 2e-3, "schedule": "constant"}
    # no COMPLETE trial in the earlier stages: the defaults again
    assert fixed_values(1, stages, space, ts[2:3]) == {"weight_decay": 1e-5, "schedule": "cosine"}


def test_defaults_inside_each_knob():
    space = parse_space({"lr": {"low": 0.01, "high": 0.1}, "weight_decay": {"low": 0.0, "high": 0.1, "step": 0.03},
                         "one_minus_beta2": {"low": 1e-4, "high": 0.1, "log": True}, "eps": {"low": 1e-6, "high": 1e-3},
                         "schedule": {"choices": ["constant", "linear"]}, "amsgrad": {"choices": [True, False]},
                         "clip_threshold": {"low": 0.5, "high": 2.0, "step": 0.5}})
    got = {name: default_value(name, knob) for name, knob in space.knobs.items()}
    assert got["lr"] == 0.01  # 1e-3 clipped up
    assert got["weight_decay"] == 0.0
    assert math.isclose(got["one_minus_beta2"], 0.001)  # 1 - 0.999
    assert got["eps"] == 1e-6
    assert got["schedule"] == "constant"  # cosine is not a choice: the first one
    assert got["amsgrad"] is False
    assert got["clip_threshold"] == 1.0
    assert default_value("one_minus_beta1", parse_space({"one_minus_beta1": {"low": 0.01, "high": 0.5}})
                         .knobs["one_minus_beta1"]) == 0.1


def test_next_stage_counts_like_the_budget_and_waits_for_the_stage_before():
    space = parse_space(SPACE)
    stages = parse_stages(STAGES, space, file="t.yaml")
    p = {"lr": 0.01}
    assert next_stage(stages, space, []).index == 0
    one = [_trial(0, 0, p, 0.5)]
    assert next_stage(stages, space, one).index == 0
    # a FAIL trial replaced by its retry copy counts once; a void one not at all
    crashed = _trial(1, 0, p, None, TrialState.FAIL)
    copy = _trial(2, 0, p, None, TrialState.WAITING)
    copy.system_attrs[keys.RETRY_HISTORY] = [1]
    void = _trial(3, 0, p, None, TrialState.FAIL, **{keys.VOID: True})
    nxt = next_stage(stages, space, one + [crashed, copy, void])
    assert (nxt.index, nxt.waiting_for) == (1, (2,))  # stage 0 is full, but its retry copy has not run
    running = _trial(2, 0, p, None, TrialState.RUNNING)
    assert next_stage(stages, space, one + [running]).waiting_for == (2,)
    done = one + [_trial(2, 0, {"lr": 0.02}, 0.8)]
    nxt = next_stage(stages, space, done)
    assert (nxt.index, nxt.waiting_for) == (1, ())
    assert nxt.user_attrs() == {keys.STAGE: "stage2", keys.STAGE_INDEX: 1, keys.STAGE_FIXED: nxt.fixed}
    full = done + [_trial(i, s, p, 0.1) for i, s in ((3, 1), (4, 1), (5, 2), (6, 2))]
    assert next_stage(stages, space, full) is None


# -- real sweeps ---------------------------------------------------------------------------------

def check_staged_study(url: str, name: str, capsys) -> None:
    """Exactly the stages' trials, each with its stage; stage k+1 started after every trial of stage
    k finished; in each stage the knobs it does not search are at the best earlier values."""
    ts = sorted(trials(url, name), key=lambda t: t.number)
    assert_clean_finish(url, name, 6)
    stages = ["lr", "stage2", "wd+schedule"]
    by_stage: list[list[optuna.trial.FrozenTrial]] = [[], [], []]
    for t in ts:
        assert t.user_attrs[keys.STAGE] == stages[t.user_attrs[keys.STAGE_INDEX]]
        by_stage[t.user_attrs[keys.STAGE_INDEX]].append(t)
    assert [len(s) for s in by_stage] == [2, 2, 2]
    for k in range(2):
        ended = max(t.datetime_complete for t in by_stage[k])
        started = min(t.datetime_start for t in by_stage[k + 1])
        assert ended <= started, f"stage {k + 1} started at {started}, before stage {k} ended at {ended}"
    searched = [["lr"], ["lr", "one_minus_beta1"], ["weight_decay", "schedule"]]
    for k, group in enumerate(by_stage):
        earlier = [t for s in by_stage[:k] for t in s]
        best = keys.best_complete(earlier)
        want = {n: (best.params[n] if best is not None else DEFAULTS[n]) for n in DEFAULTS if n not in searched[k]}
        for t in group:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED), t  # pruned: diverged
            assert t.user_attrs[keys.STAGE_FIXED] == pytest.approx(want)
            assert {n: t.params[n] for n in want} == pytest.approx(want), (k, t.number)
            assert t.system_attrs[keys.FIXED_PARAMS] == pytest.approx(want)
            assert t.user_attrs["params"]["optimizer"]["eps"] == 1e-8  # fixed by the space
    assert len({t.params["lr"] for t in by_stage[0] + by_stage[1]}) == 4  # the searched knob varies
    code, out, err = cli_main(capsys, "best", name, "--storage", url, "--top", "6")
    assert code == 0, err
    header, *rows = out.splitlines()[:7]
    assert header.split()[:4] == ["rank", "trial", "val_acc", "stage"], out
    for row in rows:
        number = int(row.split()[1])
        assert row.split()[3] == ts[number].user_attrs[keys.STAGE], out


def test_staged_sweep_two_workers_sqlite(tmp_path, cli, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = _drop_none(staged_file(tmp_path))
    run = cli("sweep", str(path), "--storage", url, "--workers", "2", env=ONE_THREAD, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "6 trials" in run.stdout
    check_staged_study(url, "staged", capsys)
    # the report shows each trial's stage, and the stages in its header
    from tuner.insight.report import header_html, load_study_data, top_info, top_table_html
    from tuner.storage.database import open_storage

    data = load_study_data(open_storage(url, must_exist=True), "staged")
    assert {t.stage for t in data.trials} == {"lr", "stage2", "wd+schedule"}
    head = header_html(data)
    assert "<b>stages</b>" in head and "1. lr (lr): 2 of 2 trials" in head
    assert "3. wd+schedule (weight_decay, schedule): 2 of 2 trials" in head
    table = top_table_html(top_info(data, 6))
    assert "<th>stage</th>" in table and "<td>wd+schedule</td>" in table
    # continued with the same file: nothing more to do, and the same stages are accepted
    again = cli("sweep", str(path), "--storage", url, env=ONE_THREAD)
    assert again.returncode == 0, again.stderr
    assert_clean_finish(url, "staged", 6)
    # changed stages: refused (exit 2, the study untouched)
    changed = _drop_none(staged_file(tmp_path, stages=STAGES[:2] + [{**STAGES[2], "trials": 3}]))
    code, _, err = cli_main(capsys, "sweep", str(changed), "--storage", url)
    assert code == 2 and "different stages" in err, err
    assert_clean_finish(url, "staged", 6)


def test_staged_sweep_two_workers_postgres(tmp_path, cli, capsys, pg_url):
    path = _drop_none(staged_file(tmp_path))
    run = cli("sweep", str(path), "--storage", pg_url, "--workers", "2", env=ONE_THREAD, timeout=600)
    assert run.returncode == 0, run.stderr
    check_staged_study(pg_url, "staged", capsys)


def test_a_crashed_trial_of_the_stage_runs_again_before_the_next_stage(tmp_path, one_thread):
    """A worker finds stage 0 full but one of its trials still RUNNING (its worker died): it waits,
    the trial goes stale, its retry copy runs (with the stage's fixed values), then stage 1 starts."""
    from tuner.engine.sweep import Flags, prepare_study
    from tuner.engine.worker import run_worker
    from tuner.study.settings import resolve

    url = f"sqlite:///{tmp_path / 'study.db'}"
    stages = [{"name": "lr", "knobs": ["lr"], "trials": 1},
              {"name": "rest", "knobs": ["lr", "one_minus_beta1", "weight_decay", "schedule"], "trials": 1}]
    config = load_study_file(_drop_none(staged_file(tmp_path, stages=stages)), check_model=False)
    storage = prepare_study(config, url, None)
    sid = storage.get_study_id_from_name("staged")
    fixed = {k: v for k, v in DEFAULTS.items() if k != "lr"}
    orphan = storage.create_new_trial(sid, create_trial(
        state=TrialState.RUNNING, user_attrs={keys.STAGE: "lr", keys.STAGE_INDEX: 0, keys.STAGE_FIXED: fixed,
                                              keys.ENV: {"worker": "gone"}},
        system_attrs={keys.QUEUED: "dead", keys.FIXED_PARAMS: fixed}))
    storage.record_heartbeat(orphan)
    started = dt.datetime.now()
    ran = run_worker(resolve(Flags(storage=url, device="cpu", heartbeat_interval=1)), "staged", handle_signals=False)
    assert ran == 2
    ts = sorted(trials(url, "staged"), key=lambda t: t.number)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert ts[1].system_attrs[keys.RETRY_HISTORY] == [0]  # the copy of the crashed trial, run first
    assert [t.user_attrs[keys.STAGE] for t in ts] == ["lr", "lr", "rest"]
    assert {n: ts[1].params[n] for n in fixed} == pytest.approx(fixed)
    assert ts[2].datetime_start >= ts[1].datetime_complete
    assert ts[2].user_attrs[keys.STAGE_FIXED] == {}  # the last stage searches every knob
    assert (ts[1].datetime_start - started).total_seconds() >= 1.5  # it waited for the grace period (2 s)
