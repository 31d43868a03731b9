"""benchmarks/search.py, the harness and not its figures: one real smoke run of every strategy (real
sweeps on SQLite, synthetic data, 1-epoch trials) must print the table, write the curves and the JSON,
and its curves must be what they claim (best so far against cumulative epochs). No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.search import Run, best_at, epochs_to, stages_for, summarize
from conftest import ROOT


@pytest.mark.parametrize("trials", [4, 12, 24])
def test_stages_split_the_budget_in_the_playbook_order(trials):
    stages = stages_for(trials)
    assert sum(s["trials"] for s in stages) == trials
    assert [s["knobs"][0] for s in stages] == ["lr"] * len(stages)  # lr is re-tuned in every stage
    assert stages[0]["knobs"] == ["lr"] and "one_minus_beta2" in stages[-1]["knobs"]


def test_curve_helpers():
    run = Run("x", 0, curve=[(2, None), (5, 0.3), (8, 0.3), (9, 0.6)])
    assert best_at(run, 1) is None and best_at(run, 5) == 0.3 and best_at(run, 8) == 0.3 and best_at(run, 100) == 0.6
    assert epochs_to(run, 0.3) == 5 and epochs_to(run, 0.55) == 9 and epochs_to(run, 0.7) is None
    other = Run("y", 0, curve=[(3, 0.5), (6, 0.62)], best=0.62, epochs=6)
    run.best, run.epochs = 0.6, 9
    summary, budget, top = summarize({"x": [run], "y": [other]})
    assert budget == 6 and top == 0.62  # E*: the fewest epochs any run used
    assert summary["x"]["best_at_budget"] == 0.3 and summary["y"]["best_at_budget"] == 0.62
    assert summary["x"]["epochs_to_within_1pt_median"] is None and summary["x"]["reached"] == "0/1"
    assert summary["y"]["epochs_to_within_1pt_median"] == 6


KINDS = ["staged", "warm", "pbt"]  # the study changes the harness builds: stages, a warm start, a population


def test_the_strategies():
    from benchmarks.search import modes, strategies

    assert list(strategies(modes("synthetic")["smoke"])) == [
        "tpe+median", "tpe+median/aware", "random+median", "qmc+median", "staged", "warm", "tpe+asha",
        "random+asha", "tpe+hyperband", "pbt", "pbt/sampler"]


def test_smoke_run_of_each_kind_of_strategy(tmp_path):
    """A staged search, a warm-started one (the default sampler and pruner otherwise) and a population;
    the other strategies differ from these only by a sampler or pruner name, which
    tests/test_registry.py builds."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), "--smoke", "--out", str(out),
                          "--only", ",".join(KINDS)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    names = list(record["strategies"])
    assert names == KINDS
    for name in names:
        assert f"| {name} |" in run.stdout  # the table
        s = record["strategies"][name]
        assert s["final_best_mean"] is not None and 0.0 <= s["final_best_mean"] <= 1.0
        assert len(s["winner_test"]) == 3 and all(0.0 <= v <= 1.0 for v in s["winner_test"])
        for seed_curve in record["curves"][name]:
            epochs = [e for e, _ in seed_curve["curve"]]
            best = [v for _, v in seed_curve["curve"] if v is not None]
            assert epochs == sorted(epochs) and best == sorted(best)  # cumulative, and best so far
            assert epochs[-1] <= record["trials"] * record["epochs"]
    assert record["budget_epochs"] == min(s["epochs_mean"] for s in record["strategies"].values())
    html = (out / "search-curves.html").read_text()
    assert "plotly" in html.lower() and "cumulative epochs trained" in html
    assert (out / "search-table.md").read_text().startswith("search strategies, smoke mode")


def test_bad_arguments_exit_2(tmp_path):
    """Arguments are checked before the data, and on a machine without the real subset (TUNER_SUBSET
    pointing nowhere, as on a clone with no ../shared) the default dataset is one clear line too."""
    missing = str(tmp_path / "no-subset.npz")
    cases = ((["--only", "nope"], "unknown strategy 'nope'"), (["--seeds", "0"], "--seeds"),
             (["--dataset", str(tmp_path / "gone.npz")], "gone.npz: no such file"),
             ([], "no-subset.npz: the real CIFAR-10 subset is not on this machine; pass --dataset"))
    for args, says in cases:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TUNER_SUBSET": missing})
        assert run.returncode == 2 and says in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.glob("search-results*")), "nothing is written on bad input"
