"""`tuner dashboard` serves the study through the real optuna-dashboard: start it, request its API.

`tuner.insight.dashboard.publish` is checked through optuna-dashboard's own WSGI app, driven in this
process: the metric name, the study note and tuner's graphs, each exactly once.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from sweeps import SMALL_SPACE, study_file

from tuner.insight.dashboard import GRAPHS, METRIC, NOTE_MARK, publish
from tuner.storage import keys
from tuner.storage.database import open_storage
from tuner.study.config import parse_study


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


# ---------------------------------------------------------------------------------------------
# publish(): what optuna-dashboard's API returns for a study tuner published
# ---------------------------------------------------------------------------------------------

CONFIG = {"name": "pub", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 3,
          "batch_size": 64, "seed": 0, "n_trials": 6, "sampler": {"name": "random"}, "pruner": {"name": "median"},
          "space": {"lr": SMALL_SPACE["lr"], "schedule": SMALL_SPACE["schedule"],
                    "clipping": SMALL_SPACE["clipping"], "clip_threshold": SMALL_SPACE["clip_threshold"]}}
DISTS = {"lr": FloatDistribution(1e-4, 1.0, log=True), "schedule": CategoricalDistribution(["constant", "cosine"]),
         "clipping": CategoricalDistribution(["none", "norm"])}


def tuner_trial(state: TrialState, curve: list[float], *, lr: float, schedule: str, clip: float | None = None,
                p90: float = 1.0, diverged: bool = False) -> optuna.trial.FrozenTrial:
    """A trial with the user attrs a tuner worker writes (params, history, seconds, env)."""
    params = {"optimizer": {"name": "adam", "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                            "amsgrad": False},
              "schedule": {"name": schedule, "warmup_fraction": 0.0},
              "clipping": {"mode": "none" if clip is None else "norm", "threshold": clip}}
    history = [{"epoch": i + 1, "val_accuracy": v, "grad_norm_p90": p90, "clip_fraction": 0.5 if clip else 0.0}
               for i, v in enumerate(curve)]
    user = {keys.PARAMS: params, keys.HISTORY: history, keys.SECONDS: 1.0, keys.ENV: {"device": "cpu"}}
    if diverged:
        user.update({keys.DIVERGED: True, keys.DIVERGED_AT: {"epoch": len(curve) + 1}})
    return create_trial(state=state, value=curve[-1] if state == TrialState.COMPLETE else None,
                        params={"lr": lr, "schedule": schedule, "clipping": "none" if clip is None else "norm"},
                        distributions=DISTS, user_attrs=user,
                        intermediate_values={i + 1: v for i, v in enumerate(curve)})


@pytest.fixture
def published(tmp_path: Path) -> tuple[Any, int]:
    """A tuner-like study on real SQLite RDB storage, published twice: (storage, study id)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'pub.db'}")
    study = optuna.create_study(storage=storage, study_name="pub", direction="maximize")
    study.set_user_attr(keys.CONFIG, parse_study(CONFIG).to_dict())
    for t in (tuner_trial(TrialState.COMPLETE, [0.3, 0.5, 0.6], lr=1e-3, schedule="cosine"),
              tuner_trial(TrialState.COMPLETE, [0.4, 0.7, 0.8], lr=3e-3, schedule="constant", clip=2.0, p90=3.0),
              tuner_trial(TrialState.PRUNED, [0.1], lr=1e-4, schedule="cosine"),
              tuner_trial(TrialState.PRUNED, [0.2], lr=0.9, schedule="constant", p90=50.0, diverged=True)):
        study.add_trial(t)
    publish(storage, "pub")
    publish(storage, "pub")
    return storage, storage.get_study_id_from_name("pub")


def api(storage: Any, path: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    """One request to a fresh optuna-dashboard WSGI app on `storage`: (status, JSON body)."""
    app = optuna_dashboard.wsgi(storage)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path)
    if body is not None:
        raw = json.dumps(body).encode()
        environ.update(CONTENT_TYPE="application/json", CONTENT_LENGTH=str(len(raw)))
        environ["wsgi.input"] = io.BytesIO(raw)
    status: list[str] = []
    out = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return int(status[0].split()[0]), json.loads(out) if out else {}


def detail(storage: Any, study_id: int) -> dict:
    code, body = api(storage, f"/api/studies/{study_id}")
    assert code == 200, body
    return body


def graphs(body: dict) -> dict[str, dict]:
    ids = [g["id"] for g in body["plotly_graph_objects"]]
    assert len(ids) == len(set(ids))
    return {g["id"]: json.loads(g["graph_object"]) for g in body["plotly_graph_objects"]}


def test_publish_names_the_metric_writes_the_note_and_the_graphs(published: tuple[Any, int]) -> None:
    storage, sid = published
    body = detail(storage, sid)
    assert body["objective_names"] == [METRIC] == ["val_accuracy"]

    note = body["note"]
    assert note["version"] == 1  # the second publish found the same text and wrote nothing
    text = note["body"]
    assert text.count(NOTE_MARK) == 1 and text.count("## pub: `val_accuracy`") == 1
    assert "| `lr` | 0.0001 … 1 (log) |" in text and "| `schedule` | {constant, cosine} |" in text
    assert "```yaml\nname: pub\n" in text and "dataset: synthetic:300" in text
    assert "lr: {low: 0.0001, high: 1.0, log: true}" in text

    g = graphs(body)
    assert sorted(g) == sorted(GRAPHS) == ["tuner-curves-by-schedule", "tuner-grad-norms"]
    curves = g["tuner-curves-by-schedule"]
    assert "schedule" in curves["layout"]["title"]["text"]
    assert {tr["name"] for tr in curves["data"] if tr.get("showlegend")} == {"constant", "cosine"}
    assert len(curves["data"]) == 4  # one curve per trial that reported
    colours = {tr["legendgroup"]: tr["line"]["color"] for tr in curves["data"]}
    assert colours["constant"] != colours["cosine"]
    grad = g["tuner-grad-norms"]
    assert "Gradient norms" in grad["layout"]["title"]["text"]
    p90 = {n: x for tr in grad["data"] if tr["xaxis"] == "x" for n, x in zip(tr["customdata"], tr["x"])}
    assert p90 == {0: 1.0, 1: 3.0, 2: 1.0, 3: 50.0}
    clip = {n: x for tr in grad["data"] if tr["xaxis"] == "x2" for n, x in zip(tr["customdata"], tr["x"])}
    assert clip[1] == 0.5 and clip[0] == 0.0


def test_publish_is_idempotent_and_keeps_what_a_user_wrote(published: tuple[Any, int]) -> None:
    storage, sid = published
    before = storage.get_study_system_attrs(sid)
    publish(storage, "pub")
    assert storage.get_study_system_attrs(sid) == before  # nothing rewritten

    # a user edits the note in the dashboard, as its UI does (version + 1)
    note = detail(storage, sid)["note"]
    code, _ = api(storage, f"/api/studies/{sid}/note", "PUT",
                  {"version": note["version"] + 1, "body": note["body"] + "\nlr above 0.01 diverges, see trial 3\n"})
    assert code == 204 or code == 200
    # a new trial, then tuner publishes again (the end of another sweep)
    optuna.load_study(study_name="pub", storage=storage).add_trial(
        tuner_trial(TrialState.COMPLETE, [0.5, 0.6, 0.9], lr=2e-3, schedule="cosine"))
    publish(storage, "pub")
    body = detail(storage, sid)
    text = body["note"]["body"]
    assert text.count(NOTE_MARK) == 1 and text.count("lr above 0.01 diverges, see trial 3") == 1
    assert text.index(NOTE_MARK) < text.index("lr above 0.01 diverges")
    g = graphs(body)
    assert sorted(g) == sorted(GRAPHS)
    assert len(g["tuner-curves-by-schedule"]["data"]) == 5  # the new trial is drawn, nothing is duplicated
    assert body["objective_names"] == [METRIC]


def test_publish_leaves_a_plain_optuna_study_alone(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'plain.db'}")
    study = optuna.create_study(storage=storage, study_name="plain", direction="minimize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.5, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)}))
    publish(storage, "plain")
    body = detail(storage, storage.get_study_id_from_name("plain"))
    assert "objective_names" not in body and body["note"]["body"] == "" and body["plotly_graph_objects"] == []


def test_publish_draws_what_is_missing_and_names_unknown_studies(tmp_path: Path) -> None:
    from tuner.errors import StudyNotFoundError

    storage = open_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    study = optuna.create_study(storage=storage, study_name="fresh", direction="maximize")
    study.set_user_attr(keys.CONFIG, parse_study({**CONFIG, "name": "fresh"}).to_dict())
    publish(storage, "fresh")  # no trials yet: the graphs say why they are empty
    g = graphs(detail(storage, storage.get_study_id_from_name("fresh")))
    for fig in g.values():
        assert fig["data"] == [] and "Not drawn: " in fig["layout"]["annotations"][0]["text"]
    with pytest.raises(StudyNotFoundError, match="fresh"):
        publish(storage, "nope")


def test_publish_does_not_import_torch(published: tuple[Any, int]) -> None:
    storage, _ = published
    code = ("import sys; from tuner.insight.dashboard import publish; from tuner.storage.database import open_storage; "
            f"publish(open_storage({storage.url!r}), 'pub'); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
