"""`tuner compare`: the side-by-side numbers, different knob sets, the HTML, and the shipped study pair."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from conftest import ONE_THREAD, ROOT, cli_main, run_cli
from tuner.engine.sweep import Flags, run_sweep
from tuner.insight.compare import (
    build_compare,
    compare_info,
    knob_descriptions,
    load_compare,
    summarize_study,
    table_rows,
)
from tuner.insight.report import study_data_from_trials
from tuner.storage.database import open_storage
from tuner.study.config import load_study_file, parse_study

optuna.logging.set_verbosity(optuna.logging.WARNING)



pytestmark = pytest.mark.usefixtures("one_thread")



BASE = {
    "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 2, "batch_size": 64, "seed": 0,
    "n_trials": 6, "sampler": {"name": "random"}, "pruner": {"name": "none"},
}
WIDE = {**BASE, "name": "wide", "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                          "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True},
                                          "clipping": {"choices": ["norm"]},
                                          "clip_threshold": {"low": 0.1, "high": 10.0, "log": True}}}
NARROW = {**BASE, "name": "narrow", "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                              "eps": 1e-6, "clipping": "none"}}


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two small real studies with different knob sets, in one storage."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cmp') / 'c.db'}"
    for cfg in (WIDE, NARROW):
        run_sweep(parse_study(cfg), Flags(storage=url, device="cpu"))
    optuna.create_study(storage=url, study_name="empty", direction="maximize")
    return url


def study(name: str, rows: list[tuple[TrialState, float | None, float]], config: dict | None = None):
    s = optuna.create_study(direction="maximize")
    for state, value, seconds in rows:
        s.add_trial(create_trial(state=state, value=value, user_attrs={"seconds": seconds}))
    return study_data_from_trials(name, s.trials, config=config or {})


def test_summary_numbers() -> None:
    a = study("a", [(TrialState.COMPLETE, 0.5, 10), (TrialState.PRUNED, None, 2), (TrialState.COMPLETE, 0.8, 10),
                    (TrialState.COMPLETE, 0.96, 10), (TrialState.FAIL, None, 1), (TrialState.COMPLETE, 1.0, 10)])
    s = summarize_study(a)
    assert s.counts["complete"] == 4 and s.counts["pruned"] == 1 and s.counts["failed"] == 1
    assert s.best == 1.0 and s.best_number == 5
    assert s.median_top == pytest.approx((0.8 + 0.96) / 2)  # median of [1.0, .96, .8, .5]
    assert s.total_seconds == 43
    assert (s.trials_to_target, s.seconds_to_target) == (4, 32)  # 0.96 >= 0.95 × 1.0 at the 4th trial
    assert s.best_so_far == [0.5, 0.5, 0.8, 0.96, 0.96, 1.0] and s.cum_seconds == [10, 12, 22, 32, 33, 43]
    assert s.final_values == [0.5, 0.8, 0.96, 1.0]

    b = study("b", [(TrialState.COMPLETE, 0.6, 5), (TrialState.COMPLETE, 0.7, 5)])
    none = study("none", [(TrialState.PRUNED, None, 3)])
    info = compare_info([a, b, none])
    assert info.overall_best == 1.0
    assert info.studies[0].trials_to_common == 4 and info.studies[1].trials_to_common is None
    assert info.studies[1].trials_to_target == 2  # 0.7 is its own best
    headers, rows = table_rows(info)
    assert headers == ["", "a", "b", "none"]
    table = {r[0]: r[1:] for r in rows}
    assert table["best value"] == ["1.0000 (trial 5)", "0.7000 (trial 1)", "–"]
    assert table["median of top 5"] == ["0.8800", "0.6500", "–"]
    assert table["to 95% of overall best"] == ["4 trials, 32.0 s", "never", "–"]
    assert table["by state"][2] == "pruned 1"
    assert info.missing is None
    page = build_compare(info)
    assert page.count('class="plotly-graph-div"') == 3 and "no COMPLETE trial in none" in page
    nothing = compare_info([none, study("z", [])])
    assert nothing.missing and build_compare(nothing).count("Not drawn:") == 3


def test_knobs_missing_from_a_study_show_as_fixed() -> None:
    wide, narrow = parse_study(WIDE).to_dict(), parse_study(NARROW).to_dict()
    w, n = knob_descriptions(wide), knob_descriptions(narrow)
    assert w["beta1"] == "1 − beta1: 0.01 … 0.5 log" and n["beta1"] == "fixed: 0.9"
    assert w["eps"] == "fixed: 1e-08" and n["eps"] == "fixed: 1e-06"
    assert w["clipping"] == "{norm}" and n["clipping"] == "fixed: none"
    assert w["clip_threshold"] == "0.1 … 10 log" and n["clip_threshold"] == "unused (clipping none)"
    assert n["lr"] == w["lr"] == "0.001 … 0.1 log"
    info = compare_info([study("w", [], wide), study("n", [], narrow)])
    assert {"lr", "beta1", "eps", "clipping", "clip_threshold"} <= set(info.knob_rows)
    assert "weight_decay" not in info.knob_rows  # fixed to the same default in both: not worth a row


def test_compare_cli_on_real_studies(two_studies: str, tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    r = run_cli("compare", "wide", "narrow", "empty", "--storage", two_studies, "-o", str(out), cwd=tmp_path,
                env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["wide", "narrow", "empty"]
    text = r.stdout
    for label in ("trials", "by state", "best value", "median of top 5", "training time", "to 95% of own best",
                  "knob beta1", "fixed: 0.9", "unused (clipping none)"):
        assert label in text, label
    info = load_compare(open_storage(two_studies), ["wide", "narrow", "empty"])
    wide, narrow, empty = info.studies
    assert wide.n_trials == narrow.n_trials == 6 and empty.n_trials == 0
    assert wide.total_seconds > 0 and wide.best is not None and narrow.best is not None
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') == 3 and page.count("plotly.js v") == 1
    assert "wrote" in r.stderr


def test_compare_cli_errors(two_studies: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli_main(capsys, "compare", "wide", "--storage", two_studies)
    assert code == 2 and "at least two" in err
    code, _, err = cli_main(capsys, "compare", "wide", "wide", "--storage", two_studies)
    assert code == 2 and "more than once" in err
    code, _, err = cli_main(capsys, "compare", "wide", "nope", "--storage", two_studies)
    assert code == 2 and "'nope' not found" in err and len(err.strip().splitlines()) == 1


def test_shipped_clip_pair_differs_only_in_clipping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    none = load_study_file(ROOT / "studies" / "compare-clip-none.yaml")
    norm = load_study_file(ROOT / "studies" / "compare-clip-norm.yaml")
    quick = load_study_file(ROOT / "studies" / "quickstart.yaml")
    assert (none.name, norm.name) == ("compare-clip-none", "compare-clip-norm")
    for cfg in (none, norm):
        a, q = cfg.to_dict(), quick.to_dict()
        for key in ("dataset", "model", "epochs", "batch_size", "seed", "n_trials", "sampler", "pruner", "training"):
            assert a[key] == q[key], key
        other = {k: v for k, v in a["space"].items() if k not in ("clipping", "clip_threshold")}
        assert other == {k: v for k, v in q["space"].items() if k not in ("clipping", "clip_threshold")}
    assert none.to_dict()["space"]["clipping"] == "none" and "clip_threshold" not in none.to_dict()["space"]
    assert norm.to_dict()["space"]["clipping"] == {"choices": ["norm"]}
    assert norm.to_dict()["space"]["clip_threshold"] == {"low": 0.1, "high": 10.0, "log": True}
    # two trials each, on small data, then the comparison the files are for
    url = f"sqlite:///{tmp_path / 'pair.db'}"
    for f in ("compare-clip-none", "compare-clip-norm"):
        code, _, err = cli_main(capsys, "sweep", str(ROOT / "studies" / f"{f}.yaml"), "--storage", url,
                                "--n-trials", "2", "--dataset", "synthetic:300", "--device", "cpu")
        assert code == 0, err
    code, out, err = cli_main(capsys, "compare", "compare-clip-none", "compare-clip-norm", "--storage", url)
    assert code == 0, err
    assert "fixed: none" in out and "{norm}" in out and "0.1 … 10 log" in out
