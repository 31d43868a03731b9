"""Shared fixtures. Optional parts (the real CIFAR-10 subset, PostgreSQL, Chromium, docker-compose)
skip with a reason on a user's machine; in CI, TUNER_REQUIRE_<PART>=1 turns the skip into a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

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
