"""Checkpoints in object storage (`--artifact-store s3://bucket/prefix`, tuner/storage/artifacts.py
`S3Store`), against moto's S3 server on loopback (conftest's `s3_server` / `s3`) through the real boto3
client: the store's round trip and its Backoff, a real `tuner sweep` whose checkpoints land in the
bucket and are cleaned up, a trial killed on one worker resumed on another that shares only the
database and the bucket, and failures at a worker's start as one line without the secret key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from test_faults import Proc, assert_study_done, create_study, running_with_checkpoint, study_file, trials, wait_for

from conftest import S3_SECRET, S3Bucket, cli_main

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def tuner_env(**extra: str) -> dict[str, str]:
    """The environment of a `tuner` process: this one's (the fake AWS credentials of the `s3` fixture),
    one thread, a checkpoint after every epoch (these trials last seconds)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0", "TUNER_CHECKPOINT_EVERY": "0", **extra}


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

def test_write_copy_exists_remove_round_trip_through_boto3(s3: S3Bucket, tmp_path: Path) -> None:
    from tuner.storage.artifacts import S3Store, open_store

    store = open_store(tmp_path / "unused", s3.url)
    assert isinstance(store, S3Store) and store.location == s3.url
    source = tmp_path / "ck.pt"
    source.write_bytes(os.urandom(9 * 1024 * 1024))  # above boto3's multipart threshold (8 MiB)
    artifact_id = store.new_id(7)
    assert artifact_id.startswith("checkpoint-trial-7-") and not store.exists(artifact_id)
    store.write(artifact_id, source)
    assert s3.keys() == [f"{s3.prefix}/{artifact_id}"]  # the prefix applied to the id
    assert store.exists(artifact_id)
    store.write(artifact_id, source.open("rb"))  # an open stream too; the same id is overwritten whole
    target = tmp_path / "back.pt"
    store.copy_to(artifact_id, target)
    assert target.read_bytes() == source.read_bytes()
    assert store.remove(artifact_id) is True and store.remove(artifact_id) is False
    assert not store.exists(artifact_id) and s3.keys() == []
    with pytest.raises(FileNotFoundError, match=s3.url):
        store.copy_to(artifact_id, tmp_path / "gone.pt")
    assert not store.exists("../escape") and not store.exists("")
    with pytest.raises(ValueError):
        store.write("a/b", source)
    assert not (tmp_path / "unused").exists()  # no local folder


class FlakyClient:
    """A boto3 client whose first `upload_fileobj` fails after sending part of the body."""

    def __init__(self, client: Any) -> None:
        self.client, self.failures = client, 0

    def upload_fileobj(self, fh: Any, bucket: str, key: str, *args: Any, **kw: Any) -> None:
        if not self.failures:
            self.failures += 1
            fh.read(1000)
            raise ConnectionResetError("the network went away")
        self.client.upload_fileobj(fh, bucket, key, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_optuna_backoff_retries_a_failed_upload_from_the_start(s3: S3Bucket, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from tuner.storage._optuna import BACKOFF_LOGGER
    from tuner.storage.artifacts import S3Store

    flaky = FlakyClient(s3.client)
    store = S3Store(s3.url, client=flaky)
    assert isinstance(store.backend, optuna.artifacts.Backoff)
    source = tmp_path / "ck.pt"
    source.write_bytes(os.urandom(50_000))
    store.write("checkpoint-trial-0-x.pt", source)
    assert flaky.failures == 1
    store.copy_to("checkpoint-trial-0-x.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == source.read_bytes()  # whole: re-sent from byte 0
    (retried,) = [r for r in caplog.records if r.name == BACKOFF_LOGGER]
    line = retried.getMessage()  # one line with the reason, no traceback (Optuna attaches one)
    assert retried.exc_info is None and s3.url in line and "ConnectionResetError" in line, line


def test_s3_errors_become_one_line_without_the_secret_key(s3: S3Bucket) -> None:
    from botocore.exceptions import ParamValidationError

    from tuner.errors import StorageError
    from tuner.storage.artifacts import S3Store

    class Leaky:
        def head_bucket(self, **_kw: Any) -> None:
            raise ParamValidationError(report=f"signed with {S3_SECRET} at http://u:{S3_SECRET}@host")

    store = S3Store(s3.url)  # reads the credentials of the environment: it knows the secret to hide
    store.client = Leaky()
    with pytest.raises(StorageError) as info:
        store.check()
    message = str(info.value)
    assert S3_SECRET not in message and message.startswith(f"checkpoint store {s3.url}: ")
    assert "\n" not in message


def test_settings_carry_the_store_to_local_workers_and_boto3_loads_lazily(s3: S3Bucket) -> None:
    from tuner.study.settings import Flags, Settings, child_env, resolve

    s = resolve(Flags(artifact_store=s3.url + "/"), {})
    assert s.artifact_store == s3.url
    assert Settings.from_json(s.to_json()).artifact_store == s3.url  # resolved once, by the parent
    env = child_env(s, env={"TUNER_ARTIFACT_STORE": "s3://other-bucket", "AWS_SECRET_ACCESS_KEY": S3_SECRET})
    assert "TUNER_ARTIFACT_STORE" not in env
    assert Settings.from_json(env["TUNER_WORKER_SETTINGS"]).artifact_store == s3.url
    assert S3_SECRET not in env["TUNER_WORKER_SETTINGS"] and S3_SECRET not in s.describe()
    code = ("import sys, tuner.cli, tuner.cli.sweep, tuner.engine.lease, tuner.storage.artifacts; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_credentials_in_the_url_are_refused_and_not_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path)
    code, _out, err = cli_main(capsys, "sweep", str(path), "--artifact-store", f"s3://AKIA:{S3_SECRET}@bucket/p")
    assert code == 2 and "--artifact-store" in err and len(err.strip().splitlines()) == 1, err
    assert S3_SECRET not in err


# ---------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_sweep_keeps_checkpoints_in_the_bucket_and_cleans_them_up(s3: S3Bucket, tmp_path: Path) -> None:
    """`tuner sweep --workers 2` on SQLite: its local workers get the store with their settings; every
    trial checkpoints into the bucket; with --keep-checkpoints best only the best trial's object stays."""
    from tuner.storage.keys import best_complete

    path = study_file(tmp_path, n_trials=3)
    run = subprocess.run([sys.executable, "-m", "tuner", "sweep", str(path), "--storage", "sqlite:///s.db",
                          "--workers", "2", "--artifact-store", s3.url, "--keep-checkpoints", "best"],
                         cwd=tmp_path, env=tuner_env(), capture_output=True, text=True, timeout=220)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and S3_SECRET not in run.stdout + run.stderr
    ts = trials(f"sqlite:///{tmp_path / 's.db'}", "faulty")
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 3
    ids = {t.number: t.user_attrs["checkpoint"]["artifact_id"] for t in ts}  # each trial checkpointed
    best = best_complete(ts)
    assert best is not None
    assert s3.keys() == [f"{s3.prefix}/{ids[best.number]}"]  # the others' objects were removed
    assert not (tmp_path / "s.db.artifacts").exists()  # no folder store beside the database


@pytest.mark.postgres
@pytest.mark.timeout(200)
def test_a_trial_killed_on_one_worker_resumes_on_another_sharing_only_the_database_and_the_bucket(
        s3: S3Bucket, pg_url: str, tmp_path: Path) -> None:
    epochs = 10
    name = create_study(tmp_path, pg_url, epochs=epochs)  # heartbeat 1 s, grace 3 s
    env = tuner_env(TUNER_STORAGE=pg_url, TUNER_ARTIFACT_STORE=s3.url)
    one, two = tmp_path / "machine-1", tmp_path / "machine-2"  # separate working folders, nothing shared
    one.mkdir()
    two.mkdir()
    first = Proc(one, "w1", "worker", "--study-name", name, env=env)
    try:
        victim = wait_for("a RUNNING trial with a checkpoint", lambda: running_with_checkpoint(pg_url, name, 1, 5), 120)
    except BaseException:
        first.kill()
        raise
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL, first.output()
    dead = [t for t in trials(pg_url, name) if t.state == TrialState.RUNNING]
    assert [t.number for t in dead] == [victim.number]
    artifact_id = dead[0].user_attrs["checkpoint"]["artifact_id"]
    assert f"{s3.prefix}/{artifact_id}" in s3.keys()  # its checkpoint is in the bucket, nowhere else

    second = Proc(two, "w2", "worker", "--study-name", name, env=env)
    assert second.wait(150) == 0, second.output()
    assert "Traceback" not in second.stderr() and "starting from epoch 0" not in second.stderr()

    ts = assert_study_done(pg_url, name, 3)
    killed = next(t for t in ts if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    retry = next(t for t in ts if t.system_attrs.get("retry_history", [None])[-1] == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["resumed_from_trial"] == killed.number
    assert retry.user_attrs["resumed_from_epoch"] > 0
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    assert s3.keys() == []  # all finished: cleanup removed every checkpoint object
    for machine in (one, two):  # and neither worker made a local store
        assert sorted(p.name for p in machine.iterdir()) == sorted(p.name for p in machine.glob("w?.*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("problem", ["missing-bucket", "unreachable-endpoint"])
def test_a_worker_whose_store_fails_exits_1_in_one_line_without_the_secret(
        s3: S3Bucket, tmp_path: Path, problem: str) -> None:
    path = study_file(tmp_path, n_trials=1)
    created = subprocess.run([sys.executable, "-m", "tuner", "sweep", str(path), "--storage", "sqlite:///s.db",
                              "--create-only"], cwd=tmp_path, env=tuner_env(), capture_output=True, text=True,
                             timeout=100)
    assert created.returncode == 0, created.stderr
    env, url = tuner_env(), f"s3://{s3.bucket}/runs"
    if problem == "missing-bucket":
        url = "s3://no-such-tuner-bucket/runs"
    else:  # a closed port, and a password in the endpoint URL that the message must hide
        env["AWS_ENDPOINT_URL"] = f"http://user:{S3_SECRET}@127.0.0.1:9"
    run = subprocess.run([sys.executable, "-m", "tuner", "worker", "--study-name", "faulty", "--storage",
                          "sqlite:///s.db", "--artifact-store", url], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=100)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: checkpoint store {url}: "), lines
    assert ("no such bucket" if problem == "missing-bucket" else "cannot reach") in lines[0]
    assert S3_SECRET not in run.stdout + run.stderr
    ts = trials(f"sqlite:///{tmp_path / 's.db'}", "faulty")
    assert ts == []  # it failed before taking a trial
