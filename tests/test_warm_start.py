"""Warm starts: `tuner sweep FILE --warm-start STUDY[,...] [--warm-top K]` queues the best configs of
earlier studies, mapped into the new space, as the new study's first trials. Real sweeps on SQLite
(and PostgreSQL with two workers where the fixture has it)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState
from sweeps import assert_clean_finish, study_file, trials

from tuner.engine.sweep import Flags, WarmStart, run_sweep
from tuner.engine.warmstart import map_config
from tuner.storage import keys
from tuner.study.config import load_study_file

SOURCE_SPACE = {
    "lr": {"low": 1.0e-4, "high": 0.3, "log": True},
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},
    "optimizer": {"choices": ["adam", "adamw"]},
    "schedule": {"choices": ["constant", "cosine"]},
}
NEW_SPACE = {
    "lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},  # narrowed: values outside are clipped
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},  # the same: values kept
    "optimizer": {"choices": ["adam", "adamw"]},
    "schedule": "cosine",  # fixed now
    "weight_decay": {"low": 1.0e-5, "high": 1.0e-2, "log": True},  # new: left to the sampler
}


def _source(tmp_path, url: str, n: int = 6) -> list[optuna.trial.FrozenTrial]:
    path = study_file(tmp_path, name="src", epochs=2, n_trials=n, space=SOURCE_SPACE,
                      sampler={"name": "random"}, pruner="none")
    run_sweep(load_study_file(path), Flags(storage=url, device="cpu"))
    return trials(url, "src")


def _top(ts, k: int) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def _expected(t) -> dict:
    lr = min(max(t.params["lr"], 1.0e-3), 1.0e-2)
    return {"lr": lr, "one_minus_beta1": t.params["one_minus_beta1"], "optimizer": t.params["optimizer"]}


def test_warm_start_queues_the_mapped_top_configs(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    src = _source(tmp_path, url)
    top = _top(src, 3)
    assert len(top) == 3
    assert any(not 1.0e-3 <= t.params["lr"] <= 1.0e-2 for t in top), "no top config needs clipping"
    path = study_file(tmp_path, name="dst", epochs=2, n_trials=5, space=NEW_SPACE, sampler={"name": "random"},
                      pruner="none")
    run = cli("sweep", str(path), "--storage", url, "--warm-start", "src", "--warm-top", "3")
    assert run.returncode == 0, run.stderr
    assert_clean_finish(url, "dst", 5)
    dst = sorted(trials(url, "dst"), key=lambda t: t.number)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("warm start")]
    assert len(lines) == 3, run.stdout
    for i, (source, new, line) in enumerate(zip(top, dst, lines), 1):
        want = _expected(source)
        assert set(new.params) == {"lr", "one_minus_beta1", "optimizer", "weight_decay"}
        assert new.params["lr"] == pytest.approx(want["lr"])
        assert new.params["one_minus_beta1"] == pytest.approx(want["one_minus_beta1"])
        assert new.params["optimizer"] == want["optimizer"]
        assert new.user_attrs["params"]["schedule"]["name"] == "cosine"
        assert new.user_attrs[keys.WARM_START_STUDY] == "src"
        assert new.user_attrs[keys.WARM_START_TRIAL] == source.number
        assert line.startswith(f"warm start {i}/3 from src trial {source.number}: ")
        if want["lr"] != source.params["lr"]:
            assert f"lr {source.params['lr']:.4g} -> {want['lr']:.4g} (clipped)" in line
        else:
            assert f"lr {source.params['lr']:.4g} (kept)" in line
        if source.params["schedule"] == "constant":
            assert "schedule constant -> cosine (fixed)" in line
        else:
            assert "schedule" not in line  # fixed to the value it had: nothing changed
        assert f"optimizer {source.params['optimizer']} (kept)" in line
        assert "weight_decay (sampled: not in the source)" in line
    assert all(keys.WARM_START_STUDY not in t.user_attrs for t in dst[3:])
    study = optuna.load_study(study_name="dst", storage=url)
    assert study.user_attrs[keys.WARM_STARTED]["sources"] == ["src"]
    assert study.user_attrs[keys.WARM_STARTED]["queued"] == [["src", t.number] for t in top]

    # a continued study is not warm-started again
    more = cli("sweep", str(path), "--storage", url, "--warm-start", "src", "--n-trials", "6")
    assert more.returncode == 0, more.stderr
    assert "warm start skipped" in more.stdout and "warm start 1/" not in more.stdout
    assert_clean_finish(url, "dst", 6)
    assert sum(keys.WARM_START_STUDY in t.user_attrs for t in trials(url, "dst")) == 3


def test_map_config_rules():
    space = load_study_file_space(NEW_SPACE | {"optimizer": {"choices": ["adam"]}, "clipping": "norm"})
    mapped = map_config({"lr": 0.5, "one_minus_beta1": 0.1, "optimizer": "adamw", "schedule": "cosine",
                         "clipping": "none"}, space)
    assert mapped.params == {"lr": 1.0e-2, "one_minus_beta1": 0.1}
    assert "lr 0.5 -> 0.01 (clipped)" in mapped.notes
    assert "optimizer adamw (dropped: not a choice; sampled)" in mapped.notes
    assert "clipping none -> norm (fixed)" in mapped.notes
    # β and 1−β spellings map onto each other
    beta = load_study_file_space({"beta1": {"low": 0.8, "high": 0.95}})
    assert map_config({"one_minus_beta1": 0.1}, beta).params["beta1"] == pytest.approx(0.9)


def load_study_file_space(space: dict):
    from tuner.study.space import parse_space

    return parse_space(space, file="t.yaml")


def test_source_in_another_storage(tmp_path):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    src = _source(tmp_path, other, n=4)
    top = _top(src, 2)
    url = f"sqlite:///{tmp_path / 'main.db'}"
    lines: list[str] = []
    path = study_file(tmp_path, name="dst", epochs=2, n_trials=3, space=NEW_SPACE, sampler={"name": "random"},
                      pruner="none")
    result = run_sweep(load_study_file(path), Flags(storage=url, device="cpu"),
                       warm_start=WarmStart([f"{other}#src"], 2, say=lines.append))
    assert sum(result.counts.values()) == 3
    assert_clean_finish(url, "dst", 3)
    dst = sorted(trials(url, "dst"), key=lambda t: t.number)
    assert [t.user_attrs.get(keys.WARM_START_TRIAL) for t in dst] == [t.number for t in top] + [None]
    for source, new in zip(top, dst):
        assert new.params["lr"] == pytest.approx(_expected(source)["lr"])
    assert [ln.split(":")[0] for ln in lines] == [f"warm start {i}/2 from src trial {t.number}"
                                                  for i, t in enumerate(top, 1)]
    labels = optuna.load_study(study_name="dst", storage=url).user_attrs[keys.WARM_STARTED]["sources"]
    assert labels == [f"{other}#src"]
    assert "src" not in optuna.get_all_study_names(url)  # the source was only read


def test_top_is_capped_by_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _source(tmp_path, url, n=4)
    path = study_file(tmp_path, name="dst", epochs=1, n_trials=2, space=NEW_SPACE, sampler={"name": "random"},
                      pruner="none")
    lines: list[str] = []
    run_sweep(load_study_file(path), Flags(storage=url, device="cpu"),
              warm_start=WarmStart(["src"], 4, say=lines.append))
    assert_clean_finish(url, "dst", 2)
    assert all(keys.WARM_START_STUDY in t.user_attrs for t in trials(url, "dst"))
    assert sum(ln.startswith("warm start ") and "/2 from src" in ln for ln in lines) == 2, lines


def test_missing_source_exits_2_and_creates_nothing(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _source(tmp_path, url, n=1)
    path = study_file(tmp_path, name="dst", epochs=1, n_trials=2, space=NEW_SPACE)
    run = cli("sweep", str(path), "--storage", url, "--warm-start", "src,nope")
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "--warm-start" in lines[0] and "'nope' not found" in lines[0] and "Traceback" not in run.stderr
    assert optuna.get_all_study_names(url) == ["src"]
    missing_db = f"sqlite:///{tmp_path / 'none.db'}"
    run = cli("sweep", str(path), "--storage", url, "--warm-start", f"{missing_db}#src")
    assert run.returncode == 2 and "'src' not found" in run.stderr, run.stderr
    assert optuna.get_all_study_names(url) == ["src"] and not (tmp_path / "none.db").exists()
    run = cli("sweep", str(path), "--storage", url, "--warm-start", "src", "--warm-top", "-1")
    assert run.returncode == 2 and "--warm-top" in run.stderr and ">= 1" in run.stderr
    assert optuna.get_all_study_names(url) == ["src"]


def test_warm_start_on_postgres_with_two_workers(tmp_path, cli, pg_url):
    src = _source(tmp_path, pg_url, n=4)
    top = _top(src, 2)
    path = study_file(tmp_path, name="dst", epochs=2, n_trials=5, space=NEW_SPACE, sampler={"name": "random"},
                      pruner="none")
    run = cli("sweep", str(path), "--storage", pg_url, "--workers", "2", "--warm-start", "src", "--warm-top", "2",
              timeout=600)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(pg_url, "dst", 5)
    dst = sorted(trials(pg_url, "dst"), key=lambda t: t.number)
    assert [t.user_attrs.get(keys.WARM_START_TRIAL) for t in dst[:2]] == [t.number for t in top]
    assert sum(keys.WARM_START_STUDY in t.user_attrs for t in dst) == 2  # each ran once
    for source, new in zip(top, dst):
        assert math.isclose(new.params["lr"], _expected(source)["lr"], rel_tol=1e-9)
        assert new.state in (TrialState.COMPLETE, TrialState.PRUNED)
