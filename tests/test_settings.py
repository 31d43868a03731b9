"""Settings resolved once (tuner/study/settings.py): every setting from every source it has, by
precedence, through `resolve` itself, `tuner sweep`, `tuner worker` and `tuner.tune`; `tuner.tune`
honouring TUNER_STORAGE, TUNER_STORAGE_PASSWORD_FILE and TUNER_ARTIFACT_DIR in a real process; and a
child worker of `tuner sweep --workers 2` running with its parent's retry bound and WAL setting."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sweeps import SMALL_SPACE

from conftest import ROOT, cli_main

# ---------------------------------------------------------------------------------------------
# The table: each setting's sources in precedence order, highest first
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Src:
    """One source of one setting: how it is given on each path, and the value it gives."""

    kind: str  # flag | env | file | stored | default
    expected: Any
    flags: dict[str, Any] = field(default_factory=dict)  # settings.Flags keywords
    cli: list[str] | None = None  # the flag on `tuner sweep` (None: the command has none)
    api: dict[str, Any] | None = None  # tuner.tune keywords (None: no argument)
    env: dict[str, str] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)  # study-file keys
    attrs: dict[str, Any] = field(default_factory=dict)  # stored study user attrs


def url_of(s: Any) -> str:
    return s.storage.url


GETTERS: dict[str, Callable[[Any], Any]] = {"storage": url_of}

TABLE: dict[str, list[Src]] = {
    "storage": [
        Src("flag", "sqlite:///flag.db", {"storage": "sqlite:///flag.db"}, ["--storage", "sqlite:///flag.db"],
            {"storage": "sqlite:///flag.db"}),
        Src("env", "sqlite:///env.db", env={"TUNER_STORAGE": "sqlite:///env.db"}),
        Src("file", "sqlite:///file.db", study={"storage": "sqlite:///file.db"}),
        Src("default", "sqlite:///tuner.db"),
    ],
    "retry_seconds": [
        Src("env", 7.0, env={"TUNER_DB_RETRY_SECONDS": "7"}),
        Src("default", 60.0),
    ],
    "sqlite_wal": [
        Src("env", False, env={"TUNER_SQLITE_WAL": "0"}),
        Src("default", True),
    ],
    "data_dir": [
        Src("flag", Path("/flag/data"), {"data_dir": "/flag/data"}, ["--data-dir", "/flag/data"],
            {"data_dir": "/flag/data"}),
        Src("env", Path("/env/data"), env={"TUNER_DATA_DIR": "/env/data"}),
        Src("default", Path("/xdg/tuner/data"), env={"XDG_CACHE_HOME": "/xdg"}),
    ],
    "artifact_dir": [
        Src("flag", Path("/flag/store"), {"artifact_dir": "/flag/store"}, ["--artifact-dir", "/flag/store"]),
        Src("env", Path("/env/store"), env={"TUNER_ARTIFACT_DIR": "/env/store"}),
        Src("default", Path("tuner.db.artifacts")),  # beside the default SQLite file
    ],
    "artifact_store": [
        Src("flag", "s3://flag-bucket/runs", {"artifact_store": "s3://flag-bucket/runs/"},
            ["--artifact-store", "s3://flag-bucket/runs/"]),
        Src("env", "s3://env-bucket", env={"TUNER_ARTIFACT_STORE": "s3://env-bucket"}),
        Src("default", None),  # the folder
    ],
    "checkpoint_every": [
        Src("flag", 5.0, {"checkpoint_every": 5.0}, ["--checkpoint-every", "5"]),
        Src("env", 9.0, env={"TUNER_CHECKPOINT_EVERY": "9"}),
        Src("default", 60.0),
    ],
    "device": [
        Src("flag", "cpu", {"device": "cpu"}, ["--device", "cpu"], {"device": "cpu"}),
        Src("default", "auto"),
    ],
    "worker_index": [
        Src("flag", 4, {"worker_index": 4}),  # `tuner worker --worker-index` (hidden) only
        Src("default", None),
    ],
    "timeout": [
        Src("flag", 30.0, {"timeout": 30.0}, ["--timeout", "30"], {"timeout": 30.0}),
        Src("file", 40.0, study={"timeout": 40}),
        Src("default", None),
    ],
    "heartbeat_interval": [
        Src("flag", 5, {"heartbeat_interval": 5}, ["--heartbeat-interval", "5"]),
        Src("file", 7, study={"heartbeat": {"interval": 7}}),
        Src("default", 60),
    ],
    "grace_period": [
        Src("file", 150, study={"heartbeat": {"grace_period": 150}}),
        Src("default", 120),  # 2 × the interval
    ],
    "max_retry": [
        Src("file", 1, study={"heartbeat": {"max_retry": 1}}),
        Src("default", 3),
    ],
    "keep_checkpoints": [
        Src("flag", "none", {"keep_checkpoints": "none"}, ["--keep-checkpoints", "none"]),
        Src("stored", "best", attrs={"tuner_checkpoints": {"keep": "best"}}),  # the study's policy
        Src("default", "none"),
    ],
    "pack": [
        Src("flag", 2, {"pack": "2"}, ["--pack", "2"]),
        Src("file", 3, study={"training": {"pack": 3}}),
        Src("default", "auto"),
    ],
}


@dataclass(frozen=True)
class Row:
    setting: str
    kind: str
    given: tuple[Src, ...]  # this source and every lower one: the first must win

    @property
    def expected(self) -> Any:
        return self.given[0].expected

    def merged(self, part: str) -> Any:
        out: dict[str, Any] = {}
        for src in reversed(self.given):  # higher sources last: they win in the merge
            value = getattr(src, part)
            if isinstance(value, dict):
                out = _deep_merge(out, value)
        return out

    def cli(self) -> list[str]:
        return [a for src in self.given for a in (src.cli or [])]

    def api(self) -> dict[str, Any]:
        return {k: v for src in reversed(self.given) for k, v in (src.api or {}).items()}


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


ROWS = [Row(name, srcs[i].kind, tuple(srcs[i:])) for name, srcs in TABLE.items() for i in range(len(srcs))]


def _id(row: Row) -> str:
    return f"{row.setting}-{row.kind}"


def get(settings: Any, name: str) -> Any:
    return GETTERS.get(name, lambda s: getattr(s, name))(settings)


STUDY: dict[str, Any] = {
    "name": "table", "direction": "maximize", "dataset": "synthetic:1000", "model": "tiny", "epochs": 2,
    "batch_size": 64, "seed": 0, "n_trials": 2, "sampler": {"name": "random"}, "pruner": {"name": "none"},
    "space": SMALL_SPACE,
}


def study_dict(row: Row) -> dict[str, Any]:
    return _deep_merge(STUDY, row.merged("study"))


def isolated_env(monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]) -> None:
    for k in list(os.environ):
        if k.startswith("TUNER_") or k == "XDG_CACHE_HOME":
            monkeypatch.delenv(k)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


# ---------------------------------------------------------------------------------------------
# The one function, the worker's completion, the CLI and the API: the same table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_resolve_by_precedence(row: Row) -> None:
    from tuner.study.config import parse_study
    from tuner.study.settings import Flags, resolve

    cfg = parse_study(study_dict(row), file="table.yaml")
    settings = resolve(Flags(**row.merged("flags")), row.merged("env"), cfg, row.merged("attrs"))
    assert get(settings, row.setting) == row.expected
    assert settings.study_read


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind != "file" or r.setting != "storage"], ids=_id)
def test_worker_completes_by_the_same_rule(row: Row) -> None:
    """`tuner worker` resolves with no study, then completes from the stored config and attrs: the
    same result as resolving with them at once (a worker reads its storage from flag, env, default)."""
    from tuner.study.config import parse_study
    from tuner.study.settings import Flags, resolve

    stored = parse_study(study_dict(row), file="table.yaml")
    flags, env, attrs = Flags(**row.merged("flags")), row.merged("env"), row.merged("attrs")
    edge = resolve(flags, env)
    assert not edge.study_read
    completed = edge.with_study(stored, attrs)
    assert completed == resolve(flags, env, stored, attrs)
    assert get(completed, row.setting) == row.expected


def _capture_run_sweep(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import tuner.api as api
    import tuner.engine.sweep as engine_sweep
    from tuner.engine.sweep import SweepResult

    seen: list[Any] = []

    def fake(config: Any, settings: Any = None, **_kw: Any) -> SweepResult:
        seen.append(settings)
        return SweepResult(config.name, settings.storage.shown, 0.0, {}, None, 0)

    for caller in (engine_sweep, api):  # where `tuner sweep` finds it when it runs, and `tuner.tune`
        monkeypatch.setattr(caller, "run_sweep", fake)
    return seen


CLI_ROWS = [r for r in ROWS if r.kind != "stored" and not (r.kind == "flag" and r.given[0].cli is None)]


@pytest.mark.parametrize("row", CLI_ROWS, ids=_id)
def test_cli_sweep_by_precedence(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`tuner sweep`: the settings it hands the sweep, from its flags, the environment and the file."""
    isolated_env(monkeypatch, row.merged("env"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(study_dict(row), sort_keys=False))
    seen = _capture_run_sweep(monkeypatch)
    code, _out, err = cli_main(capsys, "sweep", str(path), *row.cli())
    assert code == 0, err
    assert len(seen) == 1 and get(seen[0], row.setting) == row.expected


API_ROWS = [r for r in ROWS if r.kind != "stored" and r.setting != "worker_index"
            and not (r.kind == "flag" and r.given[0].api is None)]


@pytest.mark.parametrize("row", API_ROWS, ids=_id)
def test_api_tune_by_precedence(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tuner.tune`: its arguments are the flags; the environment and the config count as for the CLI."""
    import optuna

    import tuner
    import tuner.api as api

    isolated_env(monkeypatch, row.merged("env"))
    monkeypatch.chdir(tmp_path)
    seen = _capture_run_sweep(monkeypatch)
    monkeypatch.setattr(optuna, "load_study", lambda **_kw: None)
    monkeypatch.setattr(api, "open_storage", lambda *_a, **_kw: None)
    tuner.tune(study_dict(row), **row.api())
    assert len(seen) == 1 and get(seen[0], row.setting) == row.expected


def test_cli_worker_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`tuner worker` hands its worker the settings of its flags and environment, not yet completed."""
    import tuner.engine.worker as worker

    isolated_env(monkeypatch, {"TUNER_STORAGE": "sqlite:///env.db", "TUNER_DB_RETRY_SECONDS": "7",
                               "TUNER_SQLITE_WAL": "0", "TUNER_CHECKPOINT_EVERY": "9"})
    seen: list[Any] = []
    monkeypatch.setattr(worker, "run_worker", lambda settings, *_a, **_kw: seen.append(settings) or 0)
    code, _out, err = cli_main(capsys, "worker", "--study-name", "x", "--worker-index", "4", "--pack", "2",
                               "--keep-checkpoints", "best", "--quiet")
    assert code == 0, err
    (s,) = seen
    assert (s.storage.url, s.retry_seconds, s.sqlite_wal, s.checkpoint_every, s.worker_index) == (
        "sqlite:///env.db", 7.0, False, 9.0, 4)
    assert (s.given.pack, s.given.keep_checkpoints, s.study_read) == (2, "best", False)


def test_settings_travel_as_json_without_showing_the_password() -> None:
    from tuner.study.settings import Flags, Settings, child_env, resolve

    s = resolve(Flags(storage="postgresql+psycopg://u:s3cret@db/x", keep_checkpoints="best", pack="3",
                      timeout=10.0), {"TUNER_DB_RETRY_SECONDS": "7", "TUNER_SQLITE_WAL": "0"})
    assert Settings.from_json(s.to_json()) == s
    assert "s3cret" not in repr(s) and "s3cret" not in s.describe()
    env = child_env(s, env={"PATH": "/bin", "TUNER_DB_RETRY_SECONDS": "1", "TUNER_ARTIFACT_DIR": "/elsewhere"})
    assert "TUNER_DB_RETRY_SECONDS" not in env and "TUNER_ARTIFACT_DIR" not in env  # resolved already
    assert Settings.from_json(env["TUNER_WORKER_SETTINGS"]).retry_seconds == 7.0


# ---------------------------------------------------------------------------------------------
# Bad values: exit 2 (or ConfigError from the API), naming the flag or variable, nothing written
# ---------------------------------------------------------------------------------------------

BAD = [
    (["--checkpoint-every", "-1"], {}, "--checkpoint-every"),
    (["--timeout", "0"], {}, "--timeout"),
    (["--heartbeat-interval", "0"], {}, "--heartbeat-interval"),
    (["--pack", "0"], {}, "--pack"),
    (["--keep-checkpoints", "all"], {}, "--keep-checkpoints"),
    ([], {"TUNER_DB_RETRY_SECONDS": "-5"}, "TUNER_DB_RETRY_SECONDS"),
    ([], {"TUNER_CHECKPOINT_EVERY": "soon"}, "TUNER_CHECKPOINT_EVERY"),
    ([], {"TUNER_STORAGE_PASSWORD_FILE": "no-such-secret"}, "TUNER_STORAGE_PASSWORD_FILE"),
    (["--artifact-store", "s3://bucket", "--artifact-dir", "ck"], {}, "--artifact-store"),
    (["--artifact-store", "s3://key:secret@bucket"], {}, "--artifact-store"),
    ([], {"TUNER_ARTIFACT_STORE": "gs://bucket"}, "TUNER_ARTIFACT_STORE"),
    ([], {"TUNER_ARTIFACT_STORE": "s3://bucket", "TUNER_ARTIFACT_DIR": "ck"}, "TUNER_ARTIFACT_STORE"),
]


@pytest.mark.parametrize("args, env, names", BAD, ids=[b[2] for b in BAD])
def test_bad_values_exit_2_naming_them(args: list[str], env: dict[str, str], names: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    isolated_env(monkeypatch, env)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    code, out, err = cli_main(capsys, "sweep", str(path), *args)
    assert code == 2 and names in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.yaml"]  # nothing written


@pytest.mark.parametrize("env, names", [e[1:] for e in BAD if e[1]], ids=[b[2] for b in BAD if b[1]])
def test_api_bad_environment_raises_naming_it(env: dict[str, str], names: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner
    from tuner.errors import ConfigError

    isolated_env(monkeypatch, env)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=names):
        tuner.tune(STUDY)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------

TUNE = textwrap.dedent("""
    import json, sys
    import tuner
    study = tuner.tune(json.loads(sys.argv[1]), n_trials=1, device="cpu")
    print("trials", len(study.trials))
""")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    return {**env, "PYTHONPATH": str(ROOT), "TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1", **extra}


def _tune(cwd: Path, env: dict[str, str], **changes: Any) -> subprocess.CompletedProcess[str]:
    import json

    cfg = {**STUDY, "n_trials": 1, **changes}
    return subprocess.run([sys.executable, "-c", TUNE, json.dumps(cfg)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _pg_trials(url: str, name: str) -> int:
    import optuna

    return len(optuna.load_study(study_name=name, storage=url).trials)


@pytest.mark.timeout(400)
def test_tune_writes_to_TUNER_STORAGE(pg_url: str, tmp_path: Path) -> None:
    run = _tune(tmp_path, _clean_env(TUNER_STORAGE=pg_url))
    assert run.returncode == 0, run.stderr
    assert "trials 1" in run.stdout
    assert not (tmp_path / "tuner.db").exists()  # not the default SQLite file
    assert _pg_trials(pg_url, "table") == 1


@pytest.mark.timeout(400)
def test_tune_reads_TUNER_STORAGE_PASSWORD_FILE(pg_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text("s3cret-from-file\n")
    run = _tune(tmp_path, _clean_env(TUNER_STORAGE=pg_url, TUNER_STORAGE_PASSWORD_FILE=str(secret)))
    assert run.returncode == 0, run.stderr
    assert "s3cret-from-file" not in run.stdout + run.stderr
    assert _pg_trials(pg_url, "table") == 1 and not (tmp_path / "tuner.db").exists()
    # an unreadable file: refused, naming the variable, nothing written
    gone = _tune(tmp_path, _clean_env(TUNER_STORAGE=pg_url, TUNER_STORAGE_PASSWORD_FILE=str(tmp_path / "nope")),
                 name="other")
    assert gone.returncode != 0 and "TUNER_STORAGE_PASSWORD_FILE" in gone.stderr
    assert not (tmp_path / "tuner.db").exists()


@pytest.mark.timeout(400)
def test_tune_keeps_checkpoints_in_TUNER_ARTIFACT_DIR(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run = _tune(tmp_path, _clean_env(TUNER_STORAGE=url, TUNER_ARTIFACT_DIR=str(store), TUNER_CHECKPOINT_EVERY="0"),
                epochs=3)
    assert run.returncode == 0, run.stderr
    assert store.is_dir()  # the trial's checkpoints were written there (and removed when it finished)
    assert not (tmp_path / "study.db.artifacts").exists()


@pytest.mark.timeout(600)
def test_child_workers_run_with_the_parents_retry_bound_and_wal_setting(tmp_path: Path) -> None:
    """`tuner sweep --workers 2` with TUNER_DB_RETRY_SECONDS and TUNER_SQLITE_WAL: each child reports
    (TUNER_DEBUG=1) the settings it runs with, received from its parent, not from its own environment
    (the variables are not passed on); with WAL off, the SQLite file never enters WAL mode."""
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "n_trials": 2, "epochs": 1}, sort_keys=False))
    db = tmp_path / "study.db"
    run = subprocess.run([sys.executable, "-m", "tuner", "sweep", str(path), "--workers", "2", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=540,
                         env=_clean_env(TUNER_STORAGE=f"sqlite:///{db}", TUNER_DB_RETRY_SECONDS="7",
                                        TUNER_SQLITE_WAL="0", TUNER_DEBUG="1"))
    assert run.returncode == 0, run.stderr
    reports = [ln for ln in run.stderr.splitlines() if ln.startswith("worker settings: ")]
    assert len(reports) == 2, run.stderr
    for line in reports:
        assert " retry_seconds=7.0 " in line and " sqlite_wal=False " in line, line
    assert {ln.split(" worker_index=")[1].split()[0] for ln in reports} == {"0", "1"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] != "wal"
