"""`tuner report`: panel data from real and constructed studies, degenerate studies, the HTML file."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import ONE_THREAD, cli_main, run_cli
from tuner.engine.sweep import Flags, run_sweep
from tuner.insight.report import (
    CONTOUR_PAIRS,
    MIN_CONTOUR_POINTS,
    StudyData,
    build_report,
    contour_info,
    curves_info,
    grad_info,
    history_info,
    importance_info,
    knobs_of,
    load_study_data,
    parallel_info,
    report_sections,
    slice_info,
    study_data_from_trials,
    timeline_info,
    top_info,
)
from tuner.storage import keys
from tuner.storage.database import open_storage
from tuner.study.config import parse_study
from tuner.study.space import KNOBS, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)



pytestmark = pytest.mark.usefixtures("one_thread")



TINY = {
    "name": "tiny", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 3,
    "batch_size": 64, "seed": 0, "n_trials": 10,
    "sampler": {"name": "random"},
    "pruner": {"name": "median", "options": {"n_startup_trials": 3, "n_warmup_steps": 0}},
    "space": {
        "lr": {"low": 1e-4, "high": 3.0, "log": True},
        "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True},
        "one_minus_beta2": {"low": 1e-4, "high": 0.1, "log": True},
        "eps": {"low": 1e-10, "high": 1e-4, "log": True},
        "clipping": {"choices": ["none", "norm"]},
        "clip_threshold": {"low": 0.1, "high": 10.0, "log": True},
    },
}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, StudyData]:
    """A small real study: 10 trials of the tiny model, some pruned, maybe some diverged."""
    url = f"sqlite:///{tmp_path_factory.mktemp('real') / 'r.db'}"
    run_sweep(parse_study(TINY), Flags(storage=url, device="cpu"))
    return url, load_study_data(open_storage(url), "tiny", url)


# ---------------------------------------------------------------------------------------------
# Constructed studies: exact expectations
# ---------------------------------------------------------------------------------------------

def params_dict(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip: float | None = None,
                epochs: int = 3) -> dict:
    return {"optimizer": {"name": "adam", "lr": lr, "betas": [b1, b2], "eps": eps, "weight_decay": 0.0,
                          "amsgrad": False},
            "schedule": {"name": "cosine", "warmup_fraction": 0.0},
            "clipping": {"mode": "none" if clip is None else "norm", "threshold": clip},
            "training": {"model": "tiny", "epochs": epochs, "batch_size": 64, "dataset": "synthetic:600", "seed": 0,
                         "val_fraction": 0.1, "augment": True, "precision": "auto", "compile": False}}


DISTS = {"lr": FloatDistribution(1e-4, 10.0, log=True), "one_minus_beta1": FloatDistribution(0.01, 0.5, log=True),
         "eps": FloatDistribution(1e-10, 1e-4, log=True), "clipping": CategoricalDistribution(["none", "norm"])}


def history(values: list[float], p90: float = 1.0, clip: float = 0.0) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": v, "lr": 0.01, "seconds": 0.1,
             "grad_norm_p50": p90 / 2, "grad_norm_p90": p90, "grad_norm_max": p90 * 2, "clip_fraction": clip}
            for i, v in enumerate(values)]


def trial(state: TrialState, curve: list[float], *, lr: float, b1: float = 0.9, eps: float = 1e-8,
          clip: float | None = None, diverged_epoch: int | None = None, p90: float = 1.0, seconds: float = 1.0,
          start: dt.datetime | None = None, **attrs) -> optuna.trial.FrozenTrial:
    p = params_dict(lr, b1, eps=eps, clip=clip)
    user = {"params": p, "history": history(curve, p90, 0.5 if clip else 0.0), "seconds": seconds,
            "epochs": len(curve), **attrs}
    if diverged_epoch is not None:
        user.update(diverged=True, diverged_at={"epoch": diverged_epoch, "step": 3, "loss": 1e9})
    t = create_trial(
        state=state, value=curve[-1] if state == TrialState.COMPLETE else None,
        params={"lr": lr, "one_minus_beta1": 1 - b1, "eps": eps, "clipping": "none" if clip is None else "norm"},
        distributions=DISTS, user_attrs=user, intermediate_values={i + 1: v for i, v in enumerate(curve)})
    if start is not None:
        t.datetime_start, t.datetime_complete = start, start + dt.timedelta(seconds=seconds)
    return t


def mixed_trials() -> list[optuna.trial.FrozenTrial]:
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    return [
        trial(TrialState.COMPLETE, [0.3, 0.5, 0.6], lr=1e-3, b1=0.9, eps=1e-8, start=t0),
        trial(TrialState.PRUNED, [0.1], lr=1e-4, b1=0.8, start=t0 + dt.timedelta(seconds=2)),
        trial(TrialState.PRUNED, [0.2], lr=5.0, b1=0.5, diverged_epoch=2, p90=50.0,
              start=t0 + dt.timedelta(seconds=3)),
        trial(TrialState.COMPLETE, [0.4, 0.7, 0.8], lr=3e-3, b1=0.95, eps=1e-6, clip=2.0, p90=3.0,
              start=t0 + dt.timedelta(seconds=4)),
        trial(TrialState.FAIL, [], lr=1e-2, b1=0.99, error="RuntimeError: boom", start=t0 + dt.timedelta(seconds=6)),
        trial(TrialState.COMPLETE, [0.5, 0.6, 0.7], lr=1e-2, b1=0.99, eps=1e-5, clip=0.5,
              start=t0 + dt.timedelta(seconds=7)),
        trial(TrialState.COMPLETE, [0.2, 0.3, 0.4], lr=3e-2, b1=0.7, eps=1e-9, start=t0 + dt.timedelta(seconds=9)),
    ]


def numbered(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials as a study stores them: numbered 0, 1, ..."""
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    return study.trials


def data_of(trials, **kw) -> StudyData:
    return study_data_from_trials("constructed", numbered(trials), **kw)


def test_learning_curves_mark_pruned_and_diverged() -> None:
    info = curves_info(data_of(mixed_trials()))
    kinds = {c.number: c.kind for c in info.curves}
    assert kinds == {0: "complete", 1: "pruned", 2: "diverged", 3: "complete", 5: "complete", 6: "complete"}
    diverged = next(c for c in info.curves if c.kind == "diverged")
    assert diverged.diverged_epoch == 2 and diverged.values == [0.2]
    assert info.counts == {"complete": 4, "pruned": 1, "diverged": 1}
    fig = __import__("tuner.insight.report", fromlist=["curves_figure"]).curves_figure(info)
    styles = {(tr.legendgroup, tr.line.dash, tr.line.color) for tr in fig.data}
    assert len({s[1] for s in styles}) == 3 and len({s[2] for s in styles}) == 3  # visibly different
    assert {tr.name for tr in fig.data if tr.showlegend} >= {"complete", "pruned", "diverged (x: where it blew up)"}


def test_slices_derive_one_minus_beta_from_params() -> None:
    trials = numbered(mixed_trials())
    info = slice_info(data_of(trials))
    assert set(info.series) == {"lr", "eps", "one_minus_beta1", "one_minus_beta2", "clip_threshold"}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    s = info.series["one_minus_beta1"]
    assert s.numbers == [t.number for t in complete] == [0, 3, 5, 6]
    assert s.x == [1 - t.user_attrs["params"]["optimizer"]["betas"][0] for t in complete]
    assert s.y == [t.value for t in complete]
    assert info.series["one_minus_beta2"].fixed == pytest.approx(0.001)  # not searched: one value
    clip = info.series["clip_threshold"]
    assert clip.x == [2.0, 0.5] and clip.numbers == [3, 5]  # only clipped trials


def test_slices_when_the_space_samples_beta1_directly() -> None:
    """A space with `beta1` (not one_minus_beta1): 1 − beta1 still comes from the stored betas."""
    cfg = parse_study({**TINY, "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                         "beta1": {"low": 0.8, "high": 0.99}}})
    trials = []
    for i, (lr, b1) in enumerate([(1e-3, 0.8), (1e-2, 0.9), (3e-2, 0.95)]):
        p = suggest(optuna.trial.FixedTrial({"lr": lr, "beta1": b1}), cfg.space, cfg.training).to_dict()
        trials.append(create_trial(state=TrialState.COMPLETE, value=0.5 + i / 10, params={"lr": lr, "beta1": b1},
                                   distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True),
                                                  "beta1": FloatDistribution(0.8, 0.99)},
                                   user_attrs={"params": p}))
    info = slice_info(data_of(trials, config=cfg.to_dict()))
    assert info.series["one_minus_beta1"].x == [1 - 0.8, 1 - 0.9, 1 - 0.95]
    # a trial without the params attr is rebuilt from its sampled values and the stored space
    bare = create_trial(state=TrialState.COMPLETE, value=0.9, params={"lr": 0.05, "beta1": 0.85},
                        distributions=trials[0].distributions)
    data = data_of([*trials, bare], config=cfg.to_dict())
    assert data.trials[-1].knobs["one_minus_beta1"] == pytest.approx(0.15)
    assert knobs_of(None) == {}


def test_importances_are_keyed_by_knob_names() -> None:
    info = importance_info(data_of(mixed_trials()))
    assert info.missing is None, info.missing
    assert set(info.importances) <= set(KNOBS) and "lr" in info.importances
    assert list(info.importances.values()) == sorted(info.importances.values(), reverse=True)
    assert info.n_trials == 4 and "rough" in (info.note or "")


def test_history_parallel_contour_grad_timeline_top() -> None:
    data = data_of(mixed_trials(), verify={3: {1000: 0.73, 1001: 0.77}})  # as keys.verify_records gives
    h = history_info(data)
    assert h.numbers == [0, 3, 5, 6] and h.best_so_far == [0.6, 0.8, 0.8, 0.8]
    assert (1, "pruned", 0.1) in h.other and (2, "diverged", 0.2) in h.other

    p = parallel_info(data)
    keys = [d.key for d in p.dimensions]
    assert keys[:3] == ["lr", "one_minus_beta1", "eps"] and "clip_threshold" in keys and "one_minus_beta2" not in keys
    clip = next(d for d in p.dimensions if d.key == "clip_threshold")
    assert clip.ticktext[0] == "off" and clip.values[0] == clip.tickvals[0]  # trial 0 had no clipping

    c = contour_info(data, "lr", "one_minus_beta1")
    assert c.missing is None and len(c.x) == 4 and len(c.grid_z) == 40 and len(c.grid_z[0]) == 40
    assert min(map(min, c.grid_z)) >= 0.4 - 1e-9 and max(map(max, c.grid_z)) <= 0.8 + 1e-9  # interpolation
    few = contour_info(data_of(mixed_trials()[:4]), "lr", "eps")
    assert few.missing and "too few points" in few.missing and str(MIN_CONTOUR_POINTS) in few.missing

    g = grad_info(data)
    by = {pt.number: pt for pt in g.points}
    assert set(by) == {0, 1, 2, 3, 5, 6} and by[2].grad_norm_p90 == 50.0 and by[3].clip_fraction == 0.5
    assert by[3].accuracy == 0.8 and g.any_clipped

    tl = timeline_info(data)
    assert [b.number for b in tl.bars] == list(range(7))
    assert {b.kind for b in tl.bars} == {"complete", "pruned", "diverged", "failed"}
    assert all(b.end >= b.start for b in tl.bars)

    top = top_info(data, k=2)
    assert [r["trial"] for r in top.rows] == [3, 5] and top.verified
    assert top.rows[0]["verified"]["mean"] == pytest.approx(0.75)
    assert top.rows[0]["verified"]["std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std
    assert top.rows[0]["verified"]["n"] == 2 and top.rows[1]["verified"] is None


# ---------------------------------------------------------------------------------------------
# Degenerate studies: every panel is drawn or says what is missing
# ---------------------------------------------------------------------------------------------

DEGENERATE = {
    "one trial": lambda: [trial(TrialState.COMPLETE, [0.3, 0.5], lr=1e-3)],
    "only failed": lambda: [trial(TrialState.FAIL, [], lr=1e-3, error="boom"), trial(TrialState.FAIL, [], lr=1e-2)],
    "only pruned": lambda: [trial(TrialState.PRUNED, [0.1], lr=1e-3),
                            trial(TrialState.PRUNED, [0.2], lr=9.0, diverged_epoch=1)],
    "no trials": lambda: [],
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_studies_still_report(case: str) -> None:
    data = data_of(DEGENERATE[case](), config={**parse_study(TINY).to_dict()})
    sections = report_sections(data, top=5)
    assert len(sections) == 10
    for s in sections:
        assert s.missing or s.figure is not None or s.body_html, s.title
    missing = {s.title: s.missing for s in sections if s.missing}
    page = build_report(data)
    for reason in missing.values():
        assert reason.replace("'", "&#x27;") in page
    assert page.count("Not drawn:") == len(missing)
    if case == "one trial":
        assert "too few points" in missing["Contour: lr × 1 − beta1"]
        assert "at least 2 COMPLETE" in missing["Hyperparameter importances"]
        assert "Optimization history" not in missing and "Learning curves" not in missing
    elif case == "only failed":
        assert "2 failed" in missing["Optimization history"] and "Learning curves" in missing
        assert "Timeline" not in missing
    elif case == "only pruned":
        assert "no COMPLETE trial" in missing["Optimization history"]
        assert "Learning curves" not in missing and "Gradient norms and clipping" not in missing
        assert "Top 5 configs" in missing
    else:
        assert len(missing) == 10 and "no trials yet" in missing["Timeline"]


def test_degenerate_study_from_storage_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A study made with plain Optuna (no tuner config), only failed trials: the CLI still writes a report."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    study = optuna.create_study(storage=url, study_name="broken", direction="maximize")
    for _ in range(2):
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": "CUDA out of memory"}))
    code, out, err = cli_main(capsys, "report", "broken", "--storage", url, "-o", str(tmp_path / "b.html"))
    assert code == 0, err
    assert "2 failed" in out
    page = (tmp_path / "b.html").read_text()
    assert "no tuner config stored" in page and page.count("Not drawn:") == 9


# ---------------------------------------------------------------------------------------------
# A real study, through the CLI
# ---------------------------------------------------------------------------------------------

def test_real_study_info(real: tuple[str, StudyData]) -> None:
    url, data = real
    study = optuna.load_study(study_name="tiny", storage=url)
    assert data.config == study.user_attrs[keys.CONFIG]
    states = {t.number: t for t in study.trials}
    curves = curves_info(data)
    for c in curves.curves:
        t = states[c.number]
        expected = ("diverged" if t.user_attrs.get("diverged") else "pruned") if t.state == TrialState.PRUNED \
            else t.state.name.lower()
        assert c.kind == expected
        assert c.values == [t.intermediate_values[e] for e in c.epochs]
    sl = slice_info(data)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    assert sl.series["one_minus_beta1"].x == [1 - t.user_attrs["params"]["optimizer"]["betas"][0] for t in complete]
    assert sl.series["lr"].x == [t.user_attrs["params"]["optimizer"]["lr"] for t in complete]
    imp = importance_info(data)
    if imp.missing is None:
        assert set(imp.importances) <= set(TINY["space"])
    for x_key, y_key in CONTOUR_PAIRS:
        ci = contour_info(data, x_key, y_key)
        assert ci.missing or len(ci.x) >= MIN_CONTOUR_POINTS
    assert len(timeline_info(data).bars) == 10


def test_report_cli_writes_one_self_contained_file(real: tuple[str, StudyData], tmp_path: Path) -> None:
    url, data = real
    out = tmp_path / "sub" / "report.html"
    r = run_cli("report", "tiny", "--storage", url, "-o", str(out), "--top", "3", cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    page = out.read_text()
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:200]) == 1 and page.count("plotly.js v") == 1  # embedded exactly once
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?https?:", page)  # nothing fetched
    drawn = [s for s in report_sections(data, 3) if s.figure is not None]
    assert page.count('class="plotly-graph-div"') == len(drawn) >= 5
    assert page.count("Plotly.newPlot(") == len(drawn)
    assert 'id="js-errors"' in page or "id='js-errors'" in page
    assert "Top 3 configs" in page or "Top " in page


def test_report_never_shows_a_password(real: tuple[str, StudyData], tmp_path: Path) -> None:
    url, _ = real
    data = load_study_data(open_storage(url), "tiny", "postgresql+psycopg://tuner:hunter2@db.example/studies")
    page = build_report(data)
    assert "hunter2" not in page and "tuner:***@db.example" in page


def test_report_cli_errors(real: tuple[str, StudyData], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = real
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(capsys, "report", "nope", "--storage", url, "-o", str(tmp_path / "x.html"))
    assert code == 2 and "study 'nope' not found" in err and "tiny" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli_main(capsys, "report", "tiny", "--storage", url, "--top", "0")
    assert code == 2 and "--top" in err
    code, _, err = cli_main(capsys, "report", "tiny", "--storage", f"sqlite:///{tmp_path / 'missing.db'}")
    assert code == 2 and "no study database" in err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "x.html").exists()


def test_verified_stats_show_in_the_report(real: tuple[str, StudyData]) -> None:
    url, _ = real
    storage = open_storage(url)
    sid = storage.get_study_id_from_name("tiny")
    best = max((t for t in storage.get_all_trials(sid) if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    # one study user attr per run (`tuner_verify:N:S`); mean 0.4242, sample std 0.0101
    runs = {keys.verify_key(best.number, 1000): 0.4242 - 0.0071418,
            keys.verify_key(best.number, 1001): 0.4242 + 0.0071418}
    for key, value in runs.items():
        storage.set_study_user_attr(sid, key, value)
    try:
        page = build_report(load_study_data(storage, "tiny"))
        assert "0.4242 ± 0.0101 (2)" in page and "verified mean ± std (n)" in page
    finally:
        for key in runs:
            storage.set_study_user_attr(sid, key, None)  # not a number: no longer a record


def test_report_and_compare_do_not_import_torch(tmp_path: Path) -> None:
    """`tuner report` and `tuner compare` read a storage and draw: torch (seconds to import) stays out."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    for name in ("a", "b"):
        study = optuna.create_study(storage=url, study_name=name, direction="maximize")
        study.add_trial(trial(TrialState.COMPLETE, [0.3, 0.5], lr=1e-3))
    code = ("import sys\nfrom tuner.cli import main\n"
            f"for args in (['report', 'a', '--storage', {url!r}, '-o', {str(tmp_path / 'r.html')!r}],\n"
            f"             ['compare', 'a', 'b', '--storage', {url!r}, '-o', {str(tmp_path / 'c.html')!r}]):\n"
            "    try:\n        main(args)\n    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "no torch"
    assert (tmp_path / "r.html").is_file() and (tmp_path / "c.html").is_file()
