"""The docker compose deployment: the file is valid, the database is not published to other
hosts, and the same topology (PostgreSQL, a one-shot `sweep --create-only`, three `tuner worker`
processes) runs a study to exactly n_trials without Docker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import need

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _loopback_only(port_spec: object) -> bool:
    """A published port bound to 127.0.0.1 (short "127.0.0.1:8080:8080" or long syntax)."""
    if isinstance(port_spec, dict):
        return port_spec.get("host_ip") == "127.0.0.1"
    parts = str(port_spec).split(":")
    return len(parts) == 3 and parts[0] == "127.0.0.1"


def check_topology(doc: dict) -> None:
    services = doc["services"]
    assert {"postgres", "dashboard", "sweep", "worker"} <= set(services)

    pg = services["postgres"]
    assert str(pg["image"]).startswith("postgres")
    assert all(_loopback_only(p) for p in pg.get("ports", [])), "the database must not be published to other hosts"
    assert not pg.get("network_mode") == "host"
    assert "healthcheck" in pg and "pg_isready" in str(pg["healthcheck"]["test"])
    volume = str(pg["volumes"][0]).split(":")[0] if isinstance(pg["volumes"][0], str) else pg["volumes"][0]["source"]
    assert volume in doc.get("volumes", {}), "PostgreSQL data lives in a named volume"
    env = pg.get("environment", {})
    assert "POSTGRES_PASSWORD" not in env or str(env["POSTGRES_PASSWORD"]).startswith("${"), \
        "no literal password in the compose file"
    assert "POSTGRES_PASSWORD_FILE" in env and pg.get("secrets")

    dash = services["dashboard"]
    assert dash.get("ports") and all(_loopback_only(p) for p in dash["ports"])
    assert any("8080" in str(p) for p in dash["ports"])
    assert "dashboard" in " ".join(map(str, dash["command"]))

    sweep = " ".join(map(str, services["sweep"]["command"]))
    assert "sweep" in sweep and "studies/" in sweep and "--create-only" in sweep
    assert services["sweep"].get("restart", "no") == "no"

    worker = services["worker"]
    command = " ".join(map(str, worker["command"]))
    assert "worker" in command and "--study-name" in command
    assert "container_name" not in worker and not worker.get("ports"), "workers must scale (--scale worker=N)"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert worker["depends_on"]["sweep"]["condition"] == "service_completed_successfully"
    for name in ("sweep", "worker", "dashboard"):
        env = services[name]["environment"]
        assert "TUNER_STORAGE" in env and "@" in env["TUNER_STORAGE"] and ":" not in env["TUNER_STORAGE"].split("//")[1].split("@")[0], \
            "the storage URL in the compose file carries no password"
        assert env.get("TUNER_STORAGE_PASSWORD_FILE", "").startswith("/run/secrets/")
        assert env.get("TUNER_ARTIFACT_DIR"), "checkpoints go to a shared volume"


def test_compose_file_as_written():
    check_topology(yaml.safe_load(COMPOSE.read_text()))
    env_example = (ROOT / ".env.example").read_text()
    assert "TUNER_STUDY" in env_example and "PASSWORD=" not in env_example.replace("PASSWORD_FILE=", "")


def test_docker_compose_config_validates():
    exe = shutil.which("docker-compose")
    if exe is None:
        need("compose", "docker-compose is not installed (apt-get install docker-compose)")
    run = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TUNER_STUDY": "quickstart", "TUNER_STUDY_FILE": "quickstart.yaml"})
    assert run.returncode == 0, run.stderr
    doc = yaml.safe_load(run.stdout)
    check_topology(doc)
    assert "studies/quickstart.yaml" in " ".join(doc["services"]["sweep"]["command"])


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3" in text
    assert '".[postgres]"' in text and "\nUSER " in text and "COPY studies" in text


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_the_same_topology_without_docker(tmp_path, pg_url):
    """One-shot creation, then three workers on one PostgreSQL: exactly n_trials, unique numbers."""
    study = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    study.update(name="compose", dataset="synthetic:400", epochs=2, n_trials=7, pruner="none",
                 heartbeat={"interval": 2})
    (tmp_path / "studies").mkdir()
    path = tmp_path / "studies" / "compose.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {**os.environ, "TUNER_STORAGE": pg_url, "TUNER_ARTIFACT_DIR": str(tmp_path / "artifacts"),
           "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0"}

    create = subprocess.run([sys.executable, "-m", "tuner", "sweep", "studies/compose.yaml", "--create-only"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert create.returncode == 0, create.stderr
    assert "study compose ready" in create.stdout
    assert optuna.load_study(study_name="compose", storage=pg_url).trials == []

    workers = [subprocess.Popen([sys.executable, "-m", "tuner", "worker", "--study-name", "compose"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    results = []
    for w in workers:
        try:
            out, err = w.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for x in workers:
                x.kill()
            pytest.fail("a worker did not finish in time")
        results.append((w.returncode, out, err))
    assert all(code == 0 for code, _, _ in results), results
    assert all("Traceback" not in err for _, _, err in results)

    trials = optuna.load_study(study_name="compose", storage=pg_url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(7))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    ran = sum(int(out.strip().splitlines()[-1].split()[2]) for _, out, _ in results)
    assert ran == 7  # "worker done: N trials": every trial ran exactly once
