"""An interrupted warm start is completed by the next `tuner sweep --warm-start`: each source config
is queued once overall and the `tuner_warm_start` marker is written when all are queued. And a
bad `--warm-start` value is one line naming the flag, never showing a password."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from test_faults import Proc, env_for, study_file, trials
from test_signals import stopped, wait_line

from conftest import cli_main, run_cli
from tuner.engine.warmstart import PICK
from tuner.storage import keys

LR = FloatDistribution(1.0e-4, 0.3, log=True)
N = 300


def source(url: str, n: int = N) -> list[int]:
    """A plain Optuna study `src` with n COMPLETE trials of distinct lr; their numbers."""
    study = optuna.create_study(storage=url, study_name="src", direction="maximize")
    study.add_trials([create_trial(state=TrialState.COMPLETE, value=i / n, params={"lr": 1.0e-4 * 1.02 ** i},
                                   distributions={"lr": LR}) for i in range(n)])
    return [t.number for t in study.get_trials(deepcopy=False)]


def target_file(folder: Path, n_trials: int = N) -> Path:
    return study_file(folder, name="dst", dataset="synthetic:200", epochs=1, n_trials=n_trials,
                      space={"lr": {"low": 1.0e-4, "high": 0.3, "log": True}})


def picked(url: str) -> Counter:
    return Counter(t.user_attrs.get(keys.WARM_START_TRIAL) for t in trials(url, "dst")
                   if keys.WARM_START_TRIAL in t.user_attrs)


def marker(url: str) -> dict | None:
    return optuna.load_study(study_name="dst", storage=url).user_attrs.get(keys.WARM_STARTED)


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_warm_start_interrupted_by_ctrl_c_is_completed_by_the_next_run(tmp_path, pg_url):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    numbers = source(other)
    path = target_file(tmp_path)
    warm = ["--warm-start", f"{other}#src", "--warm-top", str(N)]
    env = env_for(pg_url)
    first = Proc(tmp_path, "first", "sweep", str(path), "--device", "cpu", *warm, env=env)
    try:
        wait_line(first, f"warm start 20/{N} ")
        stopped(first, signal.SIGINT, 130)
    finally:
        first.kill()
    before = picked(pg_url)
    assert 20 <= sum(before.values()) < N and set(before.values()) == {1}, before
    assert marker(pg_url) is None  # not complete: not recorded

    args = ["sweep", str(path), "--create-only", *warm]  # the queue only: the 300 trials are not run here
    again = run_cli(*args, cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"completing the interrupted warm start of study 'dst': {sum(before.values())} of {N} configs "
            "were queued before") in again.stdout
    assert f"warm start {N}/{N} from src trial" in again.stdout
    assert not any(f"warm start {i}/{N} " in again.stdout for i in (1, 20)), again.stdout  # queued before
    after = picked(pg_url)
    assert sorted(after) == sorted(numbers) and set(after.values()) == {1}  # each config once overall
    ts = trials(pg_url, "dst")
    assert len(ts) == N and all(t.state == TrialState.WAITING for t in ts)
    assert sorted(number for _, number in (t.system_attrs[PICK] for t in ts)) == sorted(numbers)
    done = marker(pg_url)
    assert done is not None and sorted(n for _, n in done["queued"]) == sorted(numbers)

    third = run_cli(*args, cwd=tmp_path, env=env, timeout=120)
    assert third.returncode == 0 and "warm start skipped: study 'dst' was warm-started already" in third.stdout
    assert len(trials(pg_url, "dst")) == N


def test_trials_queued_without_the_pick_attr_count_as_queued(tmp_path):
    """A warm start interrupted under an earlier tuner, whose trials name their source only in user
    attrs, is completed the same way."""
    from tuner.engine.sweep import prepare_study
    from tuner.engine.warmstart import WarmStart
    from tuner.study.config import load_study_file

    url = f"sqlite:///{tmp_path / 'study.db'}"
    numbers = source(url, 12)
    config = load_study_file(target_file(tmp_path, 20), check_model=False)
    prepare_study(config, url, None).engine.dispose()
    study = optuna.load_study(study_name="dst", storage=url)
    best_first = sorted(numbers, reverse=True)  # value i / n: the highest number is the best
    for number in best_first[:5]:
        study.add_trial(create_trial(state=TrialState.WAITING, user_attrs={
            keys.WARM_START_STUDY: "src", keys.WARM_START_TRIAL: number}))
    lines: list[str] = []
    prepare_study(config, url, None, warm_start=WarmStart(["src"], 12, say=lines.append)).engine.dispose()
    assert picked(url) == Counter(numbers)
    assert "warm start: completing the interrupted warm start of study 'dst': 5 of 12 configs were queued before" \
        in lines
    assert [ln.split(":")[0] for ln in lines[1:]] == [f"warm start {i}/12 from src trial {n}"
                                                      for i, n in enumerate(best_first[5:], 6)]
    assert marker(url) is not None


def test_a_study_with_trials_but_no_warm_start_is_not_warm_started(tmp_path):
    from tuner.engine.sweep import prepare_study
    from tuner.engine.warmstart import WarmStart
    from tuner.study.config import load_study_file

    url = f"sqlite:///{tmp_path / 'study.db'}"
    source(url, 3)
    config = load_study_file(target_file(tmp_path, 20), check_model=False)
    prepare_study(config, url, None).engine.dispose()
    optuna.load_study(study_name="dst", storage=url).add_trial(
        create_trial(state=TrialState.COMPLETE, value=0.5, params={"lr": 1e-3}, distributions={"lr": LR}))
    lines: list[str] = []
    prepare_study(config, url, None, warm_start=WarmStart(["src"], 3, say=lines.append)).engine.dispose()
    assert lines == ["warm start skipped: study 'dst' already has trials (a study is warm-started once, "
                     "before its first trial)"]
    assert len(trials(url, "dst")) == 1 and marker(url) is None


@pytest.mark.parametrize("value, shown", [
    ("foo#bar", "'foo' before '#bar' is not a storage URL"),
    ("nosuch://u:s3cret@host/db#bar", "'nosuch://u:***@host/db' before '#bar' is not a storage URL"),
    ("u:s3cret@host#bar", "'u:***@host' before '#bar' is not a storage URL"),
    ("postgresql://u:s3cret@host/db#", "got 'postgresql://u:***@host/db#'"),
    ("src,,other", "got ''"),
])
def test_a_bad_warm_start_value_is_one_line_naming_the_flag(tmp_path, capsys, value, shown):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = cli_main(capsys, "sweep", str(target_file(tmp_path)), "--storage", url, "--warm-start", value)
    assert (code, out) == (2, "")
    assert err.startswith("error: --warm-start: ") and err.count("\n") == 1, err
    assert shown in err and "s3cret" not in err
    assert not (tmp_path / "study.db").exists()
