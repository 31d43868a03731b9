"""The docker compose deployment: the file is valid, the database is not published to other
hosts, the worker reserves every GPU and pins a process to each, the image has the C compiler
Triton needs, and the same topology (PostgreSQL, a one-shot `sweep --create-only`, one
`tuner worker --workers-per-gpu` starting three worker processes) runs a study to exactly n_trials
without Docker."""

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
    assert "container_name" not in worker and not worker.get("ports"), "no fixed container name or published port"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    # One GPU per worker process: compose gives every replica of a service the same reservation
    # (count: 1 under --scale puts all replicas on one GPU), so the one worker container reserves
    # every GPU and `tuner worker --workers-per-gpu K` pins K processes to each.
    assert [d.get("count") for d in devices] == ["all"] and not any(d.get("device_ids") for d in devices)
    assert list(map(str, worker["command"][-2:]))[0] == "--workers-per-gpu"
    assert worker["depends_on"]["sweep"]["condition"] == "service_completed_successfully"
    for name in ("sweep", "worker", "dashboard"):
        env = services[name]["environment"]
        assert "TUNER_STORAGE" in env and "@" in env["TUNER_STORAGE"] and ":" not in env["TUNER_STORAGE"].split("//")[1].split("@")[0], \
            "the storage URL in the compose file carries no password"
        assert env.get("TUNER_STORAGE_PASSWORD_FILE", "").startswith("/run/secrets/")
        assert env.get("TUNER_ARTIFACT_DIR"), "checkpoints go to a shared volume"


def test_compose_file_as_written():
    doc = yaml.safe_load(COMPOSE.read_text())
    check_topology(doc)
    assert doc["services"]["worker"]["command"][-2:] == ["--workers-per-gpu", "${TUNER_WORKERS_PER_GPU:-1}"]
    env_example = (ROOT / ".env.example").read_text()
    assert "TUNER_STUDY" in env_example and "PASSWORD=" not in env_example.replace("PASSWORD_FILE=", "")
    assert "TUNER_WORKERS_PER_GPU" in env_example


def test_docker_compose_config_validates():
    exe = shutil.which("docker-compose")
    if exe is None:
        need("compose", "docker-compose is not installed (apt-get install docker-compose)")
    run = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TUNER_STUDY": "quickstart", "TUNER_STUDY_FILE": "quickstart.yaml",
                              "TUNER_WORKERS_PER_GPU": "3"})
    assert run.returncode == 0, run.stderr
    doc = yaml.safe_load(run.stdout)
    check_topology(doc)
    assert "studies/quickstart.yaml" in " ".join(doc["services"]["sweep"]["command"])
    worker = doc["services"]["worker"]
    assert worker["command"] == ["tuner", "worker", "--study-name", "quickstart", "--workers-per-gpu", "3"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # unset, the default is one process per GPU
    env = {k: v for k, v in os.environ.items() if k != "TUNER_WORKERS_PER_GPU"}
    plain = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=env)
    assert plain.returncode == 0, plain.stderr
    assert yaml.safe_load(plain.stdout)["services"]["worker"]["command"][-2:] == ["--workers-per-gpu", "1"]


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3" in text
    assert '".[postgres,s3]"' in text and "\nUSER " in text and "COPY studies" in text


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


COMPILERS = {"gcc", "build-essential", "clang", "cc", "gcc-12", "gcc-13"}


def compiler_problems(text: str) -> list[str]:
    """What is wrong with the C compiler of the final image stage (Triton needs one for
    torch.compile on CUDA): installed at all, as root, before `USER tuner`, before the pip install
    (its own cached layer), with apt's lists removed."""
    steps = dockerfile_instructions(text)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    final = steps[last_from + 1:]
    installs = [i for i, (k, args) in enumerate(final) if k == "RUN" and "apt-get install" in args
                and COMPILERS & set(args.replace("&&", " ").split())]
    if not installs:
        return ["no C compiler (gcc, build-essential, clang) is installed in the final stage"]
    i = installs[0]
    problems = []
    users = [(j, args.split(":")[0]) for j, (k, args) in enumerate(final) if k == "USER"]
    if any(j < i and user not in ("root", "0") for j, user in users):
        problems.append("the compiler is installed after USER switches away from root")
    if not any(j > i and user not in ("root", "0") for j, user in users):
        problems.append("no USER tuner after the compiler install")
    pip = [j for j, (k, args) in enumerate(final) if k == "RUN" and "pip install" in args]
    if not pip or pip[0] < i or "pip install" in final[i][1]:
        problems.append("the compiler is not installed in its own step before the pip install")
    if "rm -rf /var/lib/apt/lists" not in final[i][1]:
        problems.append("apt lists are not removed in the same step")
    return problems


def test_dockerfile_installs_a_c_compiler_as_root_in_the_final_stage():
    assert compiler_problems((ROOT / "Dockerfile").read_text()) == []


def test_the_compiler_check_finds_what_is_wrong():
    head = "FROM python:3.11-slim\n"
    apt = "RUN apt-get update \\\n    && apt-get install -y --no-install-recommends gcc libc6-dev \\\n" \
          "    && rm -rf /var/lib/apt/lists/*\n"
    pip = 'RUN pip install ".[postgres]"\n'
    user = "USER tuner\n"
    assert compiler_problems(head + apt + pip + user) == []
    assert compiler_problems(head + pip + user) != []  # no compiler at all
    assert compiler_problems(head + pip + user + apt) != []  # after USER tuner: apt-get fails as non-root
    assert compiler_problems(head + apt + "FROM python:3.11-slim\n" + pip + user) != []  # only in a build stage
    assert compiler_problems(head + apt.replace(" \\\n    && rm -rf /var/lib/apt/lists/*", "") + pip + user) != []
    assert compiler_problems(head + "# RUN apt-get install -y gcc\n" + pip + user) != []  # a comment installs nothing


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_the_same_topology_without_docker(tmp_path, pg_url):
    """One-shot creation, then the worker service's command with three GPUs: exactly n_trials, unique numbers."""
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

    # the worker service's command; CUDA_VISIBLE_DEVICES stands in for the three GPUs compose would
    # reserve (count: all): three pinned `tuner worker` processes (on a CPU machine they train on the CPU)
    try:
        run = subprocess.run([sys.executable, "-m", "tuner", "worker", "--study-name", "compose",
                              "--workers-per-gpu", "1"], cwd=tmp_path, env={**env, "CUDA_VISIBLE_DEVICES": "0,1,2"},
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the workers did not finish in time")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "worker: 3 processes on 3 GPUs (1 per GPU), study compose" in run.stdout

    trials = optuna.load_study(study_name="compose", storage=pg_url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(7))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert not any(t.system_attrs.get("retry_history") for t in trials)  # every trial ran once, none again
    lines = [ln.split()[1] for ln in run.stdout.splitlines() if ln.startswith("trial ")]
    assert sorted(map(int, lines)) == list(range(7))  # the worker service's log has a line for each trial
