"""The password of a storage URL never shows: not in output, errors, files, exports, the dashboard's
API, the study's stored config, trial attrs, or worker command lines. Only safe loaders are used.

PostgreSQL here trusts local connections, so it accepts any password: a URL with a distinctive test
password works end to end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

PASSWORD = "S3cretPW-xyz"
ROOT = Path(__file__).resolve().parents[1]

STUDY = {
    "name": "secret", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 2,
    "batch_size": 64, "seed": 0, "n_trials": 1, "sampler": "random", "pruner": "none",
    "heartbeat": {"interval": 1},
    "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    return {**env, "TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1", **extra}


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


class Dashboard:
    def __init__(self, cwd: Path, *args: str, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", "--port", str(self.port), *args],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self, path: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                    return r.read().decode("utf-8", "replace")
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.3)

    def stop(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return out, err


def _db_text(url: str) -> str:
    """Every row of every table of the study database, as text."""
    engine = sa.create_engine(url)
    try:
        chunks = []
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                chunks += [repr(tuple(row)) for row in conn.execute(sa.text(f'select * from "{table}"'))]
        return "\n".join(chunks)
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_the_storage_password_appears_nowhere(tmp_path, pg_url):
    url = sa.engine.make_url(pg_url).set(password=PASSWORD).render_as_string(hide_password=False)
    assert PASSWORD in url
    study = tmp_path / "secret.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    outputs: list[str] = []

    def run(*args: str, env: dict[str, str] | None = None, code: int = 0):
        r = _cli(tmp_path, *args, env=env)
        outputs.extend([r.stdout, r.stderr])
        assert r.returncode == code, (args, r.stderr)
        return r

    run("sweep", str(study), "--storage", url, "--keep-checkpoints", "best")  # an artifact stays
    run("sweep", str(study), "--storage", url, "--create-only", "--n-trials", "2")
    run("worker", "--study-name", "secret", env=_env(TUNER_STORAGE=url))

    # a multi-worker sweep passes the URL to its workers by environment: never on a command line
    cmdlines: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                    except OSError:
                        continue
                    if "tuner" in cmd and "worker" in cmd:
                        cmdlines.append(cmd)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run("sweep", str(study), "--workers", "2", "--n-trials", "4", env=_env(TUNER_STORAGE=url))
    finally:
        stop.set()
        watcher.join()
    assert any("--study-name secret" in c for c in cmdlines), "the worker processes were seen"
    outputs.extend(cmdlines)

    secret_file = tmp_path / "pg-password"  # the Docker-secret way: the password in a file
    secret_file.write_text(PASSWORD + "\n")
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = [
            pool.submit(run, "studies", "--storage", url),
            pool.submit(run, "best", "secret", "--top", "3", "--storage", url),
            pool.submit(run, "export", "secret", "-o", str(tmp_path / "best.yaml"), "--storage", url),
            pool.submit(run, "export", "secret", env=_env(TUNER_STORAGE=url)),
            pool.submit(run, "studies", env=_env(TUNER_STORAGE=pg_url, TUNER_STORAGE_PASSWORD_FILE=str(secret_file))),
            # errors that carry the URL: unreachable host, with and without --debug
            pool.submit(run, "studies", "--storage", url.replace(":5432/", ":9/"), code=1),
            pool.submit(run, "studies", "--storage", url.replace(":5432/", ":9/"), "--debug", code=1),
            pool.submit(run, "best", "nope", "--storage", url, code=2),
        ]
        for job in jobs:
            job.result()

    dash = Dashboard(tmp_path, env=_env(TUNER_STORAGE=url))
    try:
        api = [dash.get("/api/studies"), dash.get("/api/meta"), dash.get("/api/studies/1")]
        assert '"secret"' in api[0] and "plotly_graph_objects" in api[2]
        assert "val_accuracy" in api[2]  # the metric name tuner publishes for the dashboard
        assert _listening(dash.port) == {"0100007F"}  # 127.0.0.1 only
    finally:
        out, err = dash.stop()
    outputs += [out, err, *api]

    leaks = [o for o in outputs if PASSWORD in o]
    assert not leaks, leaks[0][:500]
    assert "***" in "\n".join(outputs)  # the URL is shown, redacted

    for path in tmp_path.rglob("*"):
        if path.is_file() and path != secret_file:
            assert PASSWORD.encode() not in path.read_bytes(), path
    artifacts = [p for p in (tmp_path / "tuner-artifacts").iterdir() if not p.name.startswith(".")]
    assert len(artifacts) == 1  # PostgreSQL with no dir configured: ./tuner-artifacts, best kept

    db = _db_text(pg_url)
    assert "tuner_config" in db and PASSWORD not in db
    assert "postgresql" not in db and "127.0.0.1:5432" not in db  # the stored config holds no URL at all


def test_the_dashboard_warns_when_bound_beyond_localhost(tmp_path):
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import parse_study

    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    prepare_study(parse_study(STUDY, file="s.yaml"), url, None).engine.dispose()
    dash = Dashboard(tmp_path, "--host", "0.0.0.0", env=_env(TUNER_STORAGE=url))
    try:
        assert '"secret"' in dash.get("/api/studies")
    finally:
        out, err = dash.stop()
    assert "warning: binding the dashboard to 0.0.0.0" in err and "no authentication" in err
    local = Dashboard(tmp_path, env=_env(TUNER_STORAGE=url))
    try:
        assert '"secret"' in local.get("/api/studies")
        assert _listening(local.port) == {"0100007F"}
    finally:
        out, err = local.stop()
    assert "warning" not in err and f"http://127.0.0.1:{local.port}/" in out


UNSAFE = [
    (re.compile(r"\byaml\.load\("), "yaml.load( (use yaml.safe_load)"),
    (re.compile(r"\byaml\.(unsafe_load|full_load|Loader|UnsafeLoader|FullLoader)\b"), "an unsafe YAML loader"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False)"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cPickle|dill|shelve|marshal)\b"), "another unpickler"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
]


def test_only_safe_loaders_in_the_package():
    sources = sorted((ROOT / "tuner").rglob("*.py"))
    assert sources
    problems = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                problems.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
        for m in re.finditer(r"torch\.load\(", text):  # every torch.load says weights_only=True
            call = text[m.start():text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                problems.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not problems, problems
