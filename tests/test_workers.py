"""Several workers on one study, on every storage backend: exactly n_trials, unique numbers,
none left RUNNING. Also `tuner worker` joining a study from the storage alone."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from sweeps import assert_clean_finish, study_file


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path):
    """Every storage case runs on each backend (PostgreSQL: a fresh database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


def test_two_workers_share_one_study(tmp_path, cli, storage_url):
    path = study_file(tmp_path, n_trials=7, epochs=2)
    run = cli("sweep", str(path), "--storage", storage_url, "--workers", "2", timeout=600)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(storage_url, "small", 7)
    assert "best value" in run.stdout


def test_standalone_workers_join_from_storage(tmp_path, storage_url):
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    prepare_study(load_study_file(study_file(tmp_path, n_trials=6, epochs=2)), storage_url, None)
    env = {**os.environ, "TUNER_STORAGE": storage_url}
    procs = [subprocess.Popen([sys.executable, "-m", "tuner", "worker", "--study-name", "small"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert_clean_finish(storage_url, "small", 6)
    ran = [int(o[0].strip().splitlines()[-1].split()[2]) for o in outs]  # "worker done: N trials"
    assert sum(ran) == 6


def test_worker_on_unknown_study_exits_2(tmp_path, cli, storage_url):
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    prepare_study(load_study_file(study_file(tmp_path, n_trials=1)), storage_url, None)
    run = cli("worker", "--study-name", "nope", "--storage", storage_url)
    assert run.returncode == 2 and "study 'nope' not found" in run.stderr




def test_gpu_pinning_round_robin():
    """`--workers N` pins one GPU per worker when several are visible; `--workers-per-gpu K` gives
    K workers each GPU; with one GPU or none, workers are not pinned."""
    from tuner.engine.sweep import assign_gpus

    assert assign_gpus(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert assign_gpus(3, ["2", "5", "7"]) == ["2", "5", "7"]
    assert assign_gpus(2, ["0"]) == [None, None]
    assert assign_gpus(2, []) == [None, None]


def test_workers_per_gpu_without_gpu_is_a_note(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run = cli("sweep", str(study_file(tmp_path, n_trials=1, epochs=1)), "--storage", url, "--workers-per-gpu", "2",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "--workers-per-gpu ignored: no GPU visible" in run.stderr and "1 worker" in run.stdout
    bad = cli("sweep", str(study_file(tmp_path, n_trials=1, epochs=1)), "--workers-per-gpu", "0")
    assert bad.returncode == 2 and "--workers-per-gpu" in bad.stderr


# ---------------------------------------------------------------------------------------------
# GPUs of local worker processes: nvidia-smi -L, CUDA_VISIBLE_DEVICES, --device, child argv/env
# ---------------------------------------------------------------------------------------------

SMI_TWO_GPUS = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0c5a9e3f-2b1d-4e8a-9f7c-3d2e1b0a9c8d)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-7e1f2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b)
"""
SMI_MIG = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f7c6b1e-9a0d-4c3b-8e2f-1a2b3c4d5e6f)
  MIG 1g.10gb     Device  0: (UUID: MIG-5f7c2a31-0b8e-5d4c-9a1f-2e3d4c5b6a79)
  MIG 1g.10gb     Device  1: (UUID: MIG-8a9b0c1d-2e3f-5a4b-8c7d-6e5f4a3b2c1d)
  MIG 3g.40gb     Device  2: (UUID: MIG-1a2b3c4d-5e6f-5071-8293-a4b5c6d7e8f9)
"""
SMI_MIXED = """\
GPU 0: NVIDIA H200 (UUID: GPU-a1b2c3d4-e5f6-4789-9abc-def012345678)
  MIG 1g.18gb     Device  0: (UUID: MIG-5f7c9e1d-3b2a-5c4d-8e7f-0a1b2c3d4e5f)
  MIG 1g.18gb     Device  1: (UUID: MIG-6a8d0f2e-4c3b-5d5e-9f80-1b2c3d4e5f60)
GPU 1: NVIDIA H200 (UUID: GPU-b2c3d4e5-f6a7-4890-abcd-ef0123456789)
"""
SMI_OLD_DRIVER_MIG = """\
GPU 0: A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a)
  MIG 3g.20gb Device 0: (UUID: MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/1/0)
  MIG 3g.20gb Device 1: (UUID: MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/2/0)
"""


def test_nvidia_smi_gpus_without_mig():
    from tuner.engine.sweep import parse_nvidia_smi

    assert parse_nvidia_smi(SMI_TWO_GPUS) == ["GPU-0c5a9e3f-2b1d-4e8a-9f7c-3d2e1b0a9c8d",
                                              "GPU-7e1f2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"]
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("No devices were found\n") == []
    assert parse_nvidia_smi("GPU 0: Tesla T4\nGPU 1: Tesla T4\n") == ["0", "1"]  # no UUID: the index


def test_nvidia_smi_mig_slices_replace_their_gpu():
    """A GPU with MIG on is its slices, by UUID, one worker each; never also the whole GPU."""
    from tuner.engine.sweep import parse_nvidia_smi

    assert parse_nvidia_smi(SMI_MIG) == ["MIG-5f7c2a31-0b8e-5d4c-9a1f-2e3d4c5b6a79",
                                         "MIG-8a9b0c1d-2e3f-5a4b-8c7d-6e5f4a3b2c1d",
                                         "MIG-1a2b3c4d-5e6f-5071-8293-a4b5c6d7e8f9"]
    assert parse_nvidia_smi(SMI_MIXED) == ["MIG-5f7c9e1d-3b2a-5c4d-8e7f-0a1b2c3d4e5f",
                                           "MIG-6a8d0f2e-4c3b-5d5e-9f80-1b2c3d4e5f60",
                                           "GPU-b2c3d4e5-f6a7-4890-abcd-ef0123456789"]
    assert parse_nvidia_smi(SMI_OLD_DRIVER_MIG) == ["MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/1/0",
                                                    "MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/2/0"]


def test_cuda_visible_devices_entries():
    from tuner.engine.sweep import parse_visible

    assert parse_visible("0,1") == ["0", "1"]
    assert parse_visible(" 2 , 3 ") == ["2", "3"]
    assert parse_visible("") == [] and parse_visible("-1") == [] and parse_visible("0,-1,1") == ["0"]
    uuids = "GPU-0c5a9e3f-2b1d-4e8a-9f7c-3d2e1b0a9c8d,MIG-5f7c2a31-0b8e-5d4c-9a1f-2e3d4c5b6a79"
    assert parse_visible(uuids) == uuids.split(",")
    assert parse_visible("MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/1/0") == [
        "MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c98cbc4a/1/0"]


def _children(workers, device, gpus, cpus=8, environ=None, **opts):
    from tuner.engine.sweep import worker_processes
    from tuner.study.settings import Flags, resolve

    url = "postgresql+psycopg://tuner:s3cret@db:5432/tuner"
    settings = resolve(Flags(storage=url, device=device, worker_index=10, **opts), {})
    return worker_processes(settings, "small", workers, gpus, cpus=cpus,
                            environ={"PATH": "/usr/bin"} if environ is None else environ)


def _device(argv):
    return argv[argv.index("--device") + 1]


def test_children_pinned_to_one_gpu_get_plain_cuda():
    """`--device cuda:1` with two GPUs: every worker on visible GPU 1, pinned to it, told `cuda` (the
    only device it sees is its index 0; `cuda:1` there is an invalid device ordinal)."""
    children = _children(3, "cuda:1", ["0", "1"])
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in children] == ["1", "1", "1"]
    assert [_device(argv) for _, argv in children] == ["cuda", "cuda", "cuda"]
    assert all("OMP_NUM_THREADS" not in env for env, _ in children)
    # N counts the visible devices, whatever they are: CUDA_VISIBLE_DEVICES=3,5 makes cuda:0 GPU 3
    assert {env["CUDA_VISIBLE_DEVICES"] for env, _ in _children(2, "cuda:0", ["3", "5"])} == {"3"}
    mig = _children(2, "cuda:1", ["MIG-aaaa", "MIG-bbbb"])
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in mig] == ["MIG-bbbb", "MIG-bbbb"]
    # one GPU visible: still pinned to it, and `cuda`
    single = _children(2, "cuda:0", ["GPU-1234"])
    assert [(env["CUDA_VISIBLE_DEVICES"], _device(argv)) for env, argv in single] == [("GPU-1234", "cuda")] * 2


def test_children_round_robin_over_gpus_and_mig_slices():
    children = _children(4, "cuda", ["MIG-a", "MIG-b", "GPU-c"])
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in children] == ["MIG-a", "MIG-b", "GPU-c", "MIG-a"]
    assert [_device(argv) for _, argv in children] == ["cuda"] * 4
    auto = _children(2, "auto", ["0", "1"])
    assert [(env["CUDA_VISIBLE_DEVICES"], _device(argv)) for env, argv in auto] == [("0", "auto"), ("1", "auto")]
    assert all("OMP_NUM_THREADS" not in env for env, _ in auto)
    # each child's sampler seed differs; the URL (with its password) is in the environment, not argv
    assert [argv[argv.index("--worker-index") + 1] for _, argv in auto] == ["10", "11"]
    for env, argv in auto:
        assert env["TUNER_STORAGE"] == "postgresql+psycopg://tuner:s3cret@db:5432/tuner"
        assert not any("s3cret" in a for a in argv)
        assert argv[3:6] == ["worker", "--study-name", "small"] and "--quiet" in argv


def test_cpu_children_share_the_cores_and_are_not_pinned():
    """`--device cpu`: no pinning even with GPUs visible; no GPU visible (CUDA_VISIBLE_DEVICES=-1 or
    empty): the same CPU treatment, OMP_NUM_THREADS = cores // workers."""
    from tuner.engine.sweep import parse_visible

    for device, gpus in (("cpu", ["0", "1"]), ("auto", parse_visible("-1")), ("auto", parse_visible("")),
                         ("cuda", [])):
        children = _children(2, device, gpus, cpus=8)
        assert [env.get("CUDA_VISIBLE_DEVICES") for env, _ in children] == [None, None], device
        assert [env["OMP_NUM_THREADS"] for env, _ in children] == ["4", "4"], device
        assert [_device(argv) for _, argv in children] == [device, device]
    assert [env["OMP_NUM_THREADS"] for env, _ in _children(3, "cpu", [], cpus=2)] == ["1"] * 3
    # a user's own OMP_NUM_THREADS wins; the parent's CUDA_VISIBLE_DEVICES passes through when not pinned
    mine = _children(2, "cpu", [], environ={"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "-1"})
    assert [(env["OMP_NUM_THREADS"], env["CUDA_VISIBLE_DEVICES"]) for env, _ in mine] == [("3", "-1")] * 2


def test_children_never_get_the_password_file():
    env, _ = _children(1, "cpu", [], environ={"TUNER_STORAGE_PASSWORD_FILE": "/run/secrets/pg"})[0]
    assert "TUNER_STORAGE_PASSWORD_FILE" not in env


@pytest.mark.parametrize("device, gpus, says", [
    ("cuda:2", ["0", "1"], "cuda:2 asked for, but only 2 GPUs are visible (cuda:0 to cuda:1)"),
    ("cuda:1", ["GPU-x"], "cuda:1 asked for, but only 1 GPU is visible (cuda:0)"),
    ("cuda:0", [], "cuda:0 asked for, but no GPU is visible"),
    ("cuda:one", ["0"], "expected cuda or cuda:N"),
])
def test_device_not_visible_is_a_config_error(device, gpus, says):
    from tuner.engine.sweep import worker_gpus
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _children(2, device, gpus)
    assert str(err.value).startswith("--device: ") and says in str(err.value) and err.value.exit_code == 2
    with pytest.raises(ConfigError):
        worker_gpus(device, gpus)


def test_worker_gpus_by_device():
    from tuner.engine.sweep import worker_gpus

    assert worker_gpus("cpu", ["0", "1"]) == []
    assert worker_gpus("auto", ["0", "1"]) == ["0", "1"] == worker_gpus("cuda", ["0", "1"])
    assert worker_gpus("cuda:1", ["MIG-a", "MIG-b", "GPU-c"]) == ["MIG-b"]


# ---------------------------------------------------------------------------------------------
# `tuner worker --workers-per-gpu K`: real processes on this machine
# ---------------------------------------------------------------------------------------------

def _worker_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_") and k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "TUNER_STORAGE": url, "TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.timeout(600)
def test_worker_processes_per_gpu_run_the_study(tmp_path):
    """Two "GPUs" named by CUDA_VISIBLE_DEVICES (absent on a CPU machine, so each pinned child's
    `--device auto` falls back to the CPU): `--workers-per-gpu 2` starts four `tuner worker` processes
    that run the study to exactly n_trials."""
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(load_study_file(study_file(tmp_path, n_trials=6, epochs=1)), url, None).engine.dispose()
    run = subprocess.run([sys.executable, "-m", "tuner", "worker", "--study-name", "small", "--workers-per-gpu", "2"],
                         cwd=tmp_path, env=_worker_env(url, CUDA_VISIBLE_DEVICES="0,1"), capture_output=True,
                         text=True, timeout=540)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "worker: 4 processes on 2 GPUs (2 per GPU), study small" in run.stdout
    assert "study small: " in run.stdout and "storage sqlite:///" in run.stdout  # the study's summary
    assert_clean_finish(url, "small", 6)
    assert sum(ln.startswith("trial ") for ln in run.stdout.splitlines()) == 6  # the supervisor's trial lines


@pytest.mark.timeout(300)
def test_worker_per_gpu_without_gpu_runs_one_worker_here(tmp_path, cli):
    """No GPU visible (CUDA_VISIBLE_DEVICES=-1): one note, and one worker in this process; a bad K is
    one line and exit 2."""
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(load_study_file(study_file(tmp_path, n_trials=2, epochs=1)), url, None).engine.dispose()
    run = subprocess.run([sys.executable, "-m", "tuner", "worker", "--study-name", "small", "--workers-per-gpu", "2"],
                         cwd=tmp_path, env=_worker_env(url, CUDA_VISIBLE_DEVICES="-1"), capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert [ln for ln in run.stderr.splitlines() if ln.strip()] == ["note: --workers-per-gpu ignored: no GPU visible"]
    assert run.stdout.strip().splitlines()[-1] == "worker done: 2 trials"
    assert_clean_finish(url, "small", 2)
    for bad in ("0", "-3"):
        refused = cli("worker", "--study-name", "small", "--workers-per-gpu", bad, "--storage", url)
        lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
        assert refused.returncode == 2 and lines == [f"error: --workers-per-gpu: must be >= 1, got {bad}"], refused.stderr


def test_worker_device_not_visible_exits_2_before_starting(tmp_path, cli):
    from tuner.engine.sweep import prepare_study
    from tuner.study.config import load_study_file

    url = f"sqlite:///{tmp_path / 'study.db'}"
    prepare_study(load_study_file(study_file(tmp_path, n_trials=1, epochs=1)), url, None).engine.dispose()
    run = cli("worker", "--study-name", "small", "--workers-per-gpu", "1", "--device", "cuda:2", "--storage", url,
              env={"CUDA_VISIBLE_DEVICES": "0,1"})
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "--device: cuda:2 asked for, but only 2 GPUs are visible" in lines[0]
    assert optuna.load_study(study_name="small", storage=url).trials == []


def test_visible_gpus_reads_nvidia_smi_when_cuda_visible_devices_is_unset(tmp_path, monkeypatch):
    """The wiring of `visible_gpus`: CUDA_VISIBLE_DEVICES wins when set; else `nvidia-smi -L` (a
    stand-in script on PATH here, printing a real-looking listing); else torch's device count."""
    import torch

    from tuner.engine.sweep import visible_gpus

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    listing = tmp_path / "listing.txt"
    listing.write_text(SMI_MIXED)
    smi.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 2\ncat "{listing}"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["MIG-5f7c9e1d-3b2a-5c4d-8e7f-0a1b2c3d4e5f", "MIG-6a8d0f2e-4c3b-5d5e-9f80-1b2c3d4e5f60",
                              "GPU-b2c3d4e5-f6a7-4890-abcd-ef0123456789"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus() == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert visible_gpus() == [str(i) for i in range(torch.cuda.device_count())]
