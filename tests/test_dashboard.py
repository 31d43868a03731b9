"""`tuner dashboard` serves the study through the real optuna-dashboard: start it, request its API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from sweeps import study_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, deadline: float) -> dict:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def test_dashboard_lists_the_study(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("sweep", str(study_file(tmp_path, n_trials=2, epochs=1)), "--storage", url).returncode == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", "--storage", url, "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        summaries = get_json(f"http://127.0.0.1:{port}/api/studies", time.time() + 60)["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["small"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}", time.time() + 30)
        assert len(detail["trials"]) == 2
        assert {"params", "env", "history"} <= {a["key"] for a in detail["trials"][0]["user_attrs"]}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard/" in out


def test_dashboard_warns_when_not_on_localhost(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("sweep", str(study_file(tmp_path, n_trials=1, epochs=1)), "--storage", url).returncode == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", "--storage", url, "--port", str(port),
                             "--host", "0.0.0.0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        get_json(f"http://127.0.0.1:{port}/api/meta", time.time() + 60)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "no authentication" in err
