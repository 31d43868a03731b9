"""Shared fixtures. Optional parts (the real CIFAR-10 subset, PostgreSQL, Chromium, docker-compose,
moto's S3 server) skip with a reason on a user's machine; in CI, TUNER_REQUIRE_<PART>=1 turns the skip
into a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real CIFAR-10 subset is not part of the project: ../shared beside the clone, or TUNER_SUBSET.
SUBSET = Path(os.environ.get("TUNER_SUBSET")
              or ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar10-subset.npz")
PG_ADMIN_URL = os.environ.get("TUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def need(part: str, reason: str) -> None:
    """Skip with `reason`, or fail when CI requires `part` (TUNER_REQUIRE_<PART>=1)."""
    if os.environ.get(f"TUNER_REQUIRE_{part.upper()}") == "1":
        pytest.fail(f"{reason} (TUNER_REQUIRE_{part.upper()}=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def subset_path() -> Path:
    """The shared real CIFAR-10 subset (.npz), or a skip when it is absent."""
    if not SUBSET.is_file():
        need("data", f"real CIFAR-10 subset not found at {SUBSET}")
    return SUBSET


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards. The admin engine pings before
    use and the teardown waits up to 60 s for the server, so tests may restart PostgreSQL."""
    try:
        import sqlalchemy as sa

        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # noqa: BLE001
        need("postgres", f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(exc).__name__})")
    name = f"tuner_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _wait_for_server(admin, 60)
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for CLI subprocesses of tests that use `one_thread`


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, torch's spinning threads slow tiny models ~50×."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (fast, for error paths): (exit code, stdout, stderr)."""
    from tuner.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _wait_for_server(engine, seconds: float) -> None:
    import time

    import sqlalchemy as sa

    deadline = time.monotonic() + seconds
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
            return
        except sa.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


S3_KEY_ID = "AKIATUNERTESTKEY0001"  # fake credentials: moto accepts any
S3_SECRET = "tuner-test-secret-key-d0-n0t-print"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3 server on loopback (moto's server mode, in a thread of this process) for the whole
    session: its endpoint URL. Skips (fails under TUNER_REQUIRE_S3=1) when moto is not installed."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        need("s3", f"moto's S3 server not installed ({exc}; pip install -e '.[test]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str
    bucket: str
    url: str  # s3://bucket/prefix, for --artifact-store
    prefix: str
    client: Any  # a boto3 S3 client

    def keys(self) -> list[str]:
        return [o["Key"] for o in self.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])]


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A fresh bucket on the session's S3 server, and fake credentials in this process's environment
    (so in the environment of the `tuner` processes a test starts): the standard AWS variables, and no
    credentials or config file of the user's."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "TUNER_ARTIFACT_STORE",
                 "TUNER_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": s3_server,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"tuner-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return S3Bucket(s3_server, bucket, f"s3://{bucket}/runs/a", "runs/a", client)


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        need("browser", "headless Chromium not installed (apt-get install chromium)")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m tuner ARGS` as a user would, capturing text output."""
    full_env = {**os.environ, "TUNER_DEBUG": "0", **(env or {})}
    full_env.pop("TUNER_STORAGE", None) if env is None or "TUNER_STORAGE" not in env else None
    return subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path: Path):
    """`cli(*args)` runs the CLI in a temporary working directory."""
    def _run(*args: str, **kw):
        kw.setdefault("cwd", tmp_path)
        return run_cli(*args, **kw)
    return _run
