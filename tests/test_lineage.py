"""A population-based study's lineage, as `tuner best`, `tuner report` and `tuner dashboard` show it.

The study (tests/pbt_studies.py) is built with plain Optuna on SQLite: 4 members, 3 segments each,
2 exploit events; the winner is trial 9, whose lineage is trials 0 → 7 → 9.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from pbt_studies import CHAIN, SEGMENTS, WINNER, make_pbt_study, params, segment_trials

from conftest import cli_main
from tuner.insight.lineage import lineage_lines, pbt_lineage
from tuner.insight.report import build_report, load_study_data, report_sections, write_report
from tuner.insight.report.panels.lineage import knobs_figure, lineage_figure, lineage_info
from tuner.storage import keys
from tuner.storage.database import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def pbt_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pbt.db'}"
    make_pbt_study(open_storage(url))
    return url


def plain_study(url: str, name: str = "plain") -> None:
    """A study that is not population-based: two COMPLETE trials with tuner's params attr."""
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    for lr, value in ((1e-3, 0.5), (3e-3, 0.6)):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params={"lr": lr},
                                     distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                                     user_attrs={keys.PARAMS: params(lr, 0.1)},
                                     intermediate_values={1: value / 2, 2: value}))


# ---------------------------------------------------------------------------------------------
# The lineage model
# ---------------------------------------------------------------------------------------------

def test_lineage_finds_the_winner_its_chain_and_the_exploits() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trials(segment_trials())
    lin = pbt_lineage(study.trials)
    assert lin is not None and lin.winner is not None
    assert lin.winner.number == WINNER == 9 and lin.winner.member == 1 and lin.winner.value == 0.72
    assert [s.number for s in lin.chain] == CHAIN == [0, 7, 9]
    assert [(s.member, s.first, s.last, s.exploit) for s in lin.chain] == [(0, 1, 2, False), (3, 3, 4, True),
                                                                           (1, 5, 6, True)]
    assert lin.members == [0, 1, 2, 3] and lin.knobs == ["lr", "one_minus_beta1"]
    assert [(e.epoch, e.member, e.trial, e.source_member, e.source_trial, e.source_value) for e in lin.exploits] == [
        (2, 3, 7, 0, 0, 0.40), (4, 1, 9, 3, 7, 0.60)]
    assert lin.exploits[0].explored == {"lr": (1e-3, 1.2e-3), "one_minus_beta1": (0.1, 0.08)}


def test_the_winner_ends_its_run_even_when_a_middle_segment_scored_higher() -> None:
    """A segment that does not end the run (epochs 3-4 of 6) never wins, however good its value."""
    rows = list(SEGMENTS)
    rows[4] = (0, 0, False, 1e-3, 0.1, 0.99)  # trial 4: member 0's middle segment, best value of all
    study = optuna.create_study(direction="maximize")
    study.add_trials(segment_trials(rows))
    lin = pbt_lineage(study.trials)
    assert lin is not None and lin.winner is not None and lin.winner.number == 9


def test_no_winner_while_no_last_segment_is_complete() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trials(segment_trials(states={n: TrialState.RUNNING for n in range(8, 12)}))
    lin = pbt_lineage(study.trials)
    assert lin is not None and lin.winner is None and lin.chain == []
    assert len(lin.exploits) == 2  # the exploits are recorded when a segment starts
    lines = lineage_lines(lin)
    assert lines[0].startswith("lineage: no member has finished its run yet (12 segments, 4 members)")


def test_a_study_without_segments_has_no_lineage() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)}))
    assert pbt_lineage(study.trials) is None


# ---------------------------------------------------------------------------------------------
# tuner best
# ---------------------------------------------------------------------------------------------

def test_best_prints_the_winners_lineage_and_the_exploit_events(pbt_url: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_main(capsys, "best", "pbt", "--storage", pbt_url)
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"1\s+9\s+0\.7200\s+adam", lines[1])  # the table as before
    start = lines.index("lineage of trial 9 (member 1, val_acc 0.7200), 3 segments:")
    chain = lines[start + 1:start + 4]
    assert [re.split(r"\s{2,}", line.strip())[:3] for line in chain] == [
        ["epochs 1-2", "member 0", "trial 0"], ["epochs 3-4", "member 3", "trial 7"],
        ["epochs 5-6", "member 1", "trial 9"]]
    assert "←" not in chain[0] and "← member 0 (trial 0)" in chain[1] and "← member 3 (trial 7)" in chain[2]
    assert "lr=0.0012 one_minus_beta1=0.08" in chain[1] and chain[1].endswith("val_acc 0.6000")
    assert chain[2].endswith("val_acc 0.7200")
    events = lines[start + 4:]
    assert events == [
        "exploit events (2):",
        "  at epoch 2:",
        "    member 3 copied member 0's segment trial 0 (val_acc 0.4000) and explored: lr 0.001 → 0.0012, "
        "one_minus_beta1 0.1 → 0.08 (now trial 7)",
        "  at epoch 4:",
        "    member 1 copied member 3's segment trial 7 (val_acc 0.6000) and explored: lr 0.0012 → 0.00096, "
        "one_minus_beta1 0.08 → 0.096 (now trial 9)"]


def test_best_of_a_study_that_is_not_population_based_is_unchanged(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    plain_study(url)
    code, out, err = cli_main(capsys, "best", "plain", "--top", "2", "--storage", url)
    assert code == 0, err
    assert len(out.splitlines()) == 3 and "lineage" not in out and "exploit" not in out


# ---------------------------------------------------------------------------------------------
# tuner report
# ---------------------------------------------------------------------------------------------

def test_report_shows_the_lineage_tree_and_the_knobs(pbt_url: str) -> None:
    data = load_study_data(open_storage(pbt_url), "pbt")
    info = lineage_info(data)
    assert info.missing is None and info.lineage is not None

    tree = lineage_figure(info).to_plotly_json()["data"]
    by_name = {t["name"]: t for t in tree}
    band = by_name["winner's lineage (trial 9)"]
    # the winner's chain: member 0 from its start (epoch 0) to epoch 2, then to member 3 at 4, to member 1 at 6
    assert list(band["x"]) == [0, 2, None, 2, 4, None, 4, 6, None]
    assert list(band["y"]) == [0, 0, None, 0, 3, None, 3, 1, None]
    exploit = by_name["exploit: copied another member"]
    assert list(exploit["x"]) == [2, 4, None, 4, 6, None] and list(exploit["y"]) == [0, 3, None, 3, 1, None]
    assert exploit["line"]["color"] != by_name["own checkpoint"]["line"]["color"]
    own = by_name["own checkpoint"]
    assert len(own["x"]) == 3 * 10  # the other 10 segments, each joined to its parent or its start
    segs = by_name["segment (complete)"]
    assert sorted(segs["customdata"]) == list(range(12))
    assert dict(zip(segs["customdata"], zip(segs["x"], segs["y"])))[7] == (4, 3)
    diamonds = by_name["winner's segments"]
    assert list(diamonds["customdata"]) == [0, 7, 9] and diamonds["marker"]["size"] > segs["marker"]["size"]

    knobs = knobs_figure(info).to_plotly_json()
    lr_traces = [t for t in knobs["data"] if t.get("yaxis", "y") == "y"]
    assert [t["name"] for t in lr_traces] == ["member 0", "member 1", "member 2", "member 3",
                                              "winner's lineage (trial 9)"]
    member3 = lr_traces[3]
    assert member3["line"]["shape"] == "hv"  # a step: the value in force from each segment's start
    assert list(member3["x"]) == [0, 2, 4, 6] and list(member3["y"]) == [3e-2, 1.2e-3, 1.2e-3, 1.2e-3]
    winner = lr_traces[4]
    assert list(winner["x"]) == [0, 2, 4, 6] and list(winner["y"]) == [1e-3, 1.2e-3, 9.6e-4, 9.6e-4]
    assert winner["line"]["width"] > member3["line"]["width"] and member3["opacity"] < 1
    assert knobs["layout"]["yaxis"]["type"] == "log"  # lr
    assert [a["text"] for a in knobs["layout"]["annotations"]] == ["lr", "1 − beta1"]

    titles = [s.title for s in report_sections(data)]
    assert titles[2:4] == ["PBT lineage", "PBT knobs over epochs"]  # after the learning curves
    page = build_report(data)
    assert "population</b></td><td>4 members, 12 segments, 2 exploit events; winner trial 9 (member 1, 0.7200), " \
           "lineage 0 → 7 → 9" in page
    assert "<h2>PBT lineage</h2>" in page and "<h2>PBT knobs over epochs</h2>" in page
    assert "winner&#x27;s lineage (trial 9)" in page or "winner's lineage (trial 9)" in page
    assert "exploit: copied another member" in page


def test_report_of_a_study_that_is_not_population_based_has_no_pbt_panels(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    plain_study(url)
    data = load_study_data(open_storage(url), "plain")
    assert lineage_info(data).missing is not None
    page = build_report(data)
    assert "PBT" not in page and "population" not in page


def test_report_cli_writes_the_pbt_panels(pbt_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pbt.html"
    code, _, err = cli_main(capsys, "report", "pbt", "--storage", pbt_url, "-o", str(out))
    assert code == 0, err
    page = out.read_text()
    assert page.count("<h2>PBT lineage</h2>") == 1 and page.count("<h2>PBT knobs over epochs</h2>") == 1


# ---------------------------------------------------------------------------------------------
# tuner dashboard: the note and the graphs, through optuna-dashboard's own API
# ---------------------------------------------------------------------------------------------

def dashboard_detail(storage: Any, study_id: int) -> dict:
    from test_dashboard import detail  # optuna-dashboard's WSGI app, driven in this process

    return detail(storage, study_id)


def test_publish_writes_the_lineage_into_the_note_and_two_graphs(pbt_url: str) -> None:
    from tuner.insight.dashboard import GRAPHS, NOTE_MARK, PBT_GRAPHS, publish  # optuna_dashboard: this test only

    storage = open_storage(pbt_url)
    publish(storage, "pbt")
    publish(storage, "pbt")  # idempotent: nothing duplicated, nothing rewritten
    sid = storage.get_study_id_from_name("pbt")
    before = storage.get_study_system_attrs(sid)
    publish(storage, "pbt")
    assert storage.get_study_system_attrs(sid) == before

    body = dashboard_detail(storage, sid)
    note = body["note"]
    assert note["version"] == 1
    text = note["body"]
    assert text.count("### Population-based training") == 1 and text.count(NOTE_MARK) == 1
    assert "**Winner: trial 9** (member 1, val_accuracy 0.7200)" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+–\d+ \|", line)]
    assert rows == ["| 1–2 | 0 | 0 | own | 0.001 | 0.1 | 0.4000 |",
                    "| 3–4 | 3 | 7 | ← member 0 (trial 0) | 0.0012 | 0.08 | 0.6000 |",
                    "| 5–6 | 1 | 9 | ← member 3 (trial 7) | 0.00096 | 0.096 | 0.7200 |"]
    assert "- epoch 2: member 3 copied member 0's segment trial 0 (val_acc 0.4000)" in text
    assert "- epoch 4: member 1 copied member 3's segment trial 7 (val_acc 0.6000)" in text

    ids = [g["id"] for g in body["plotly_graph_objects"]]
    assert sorted(ids) == sorted({**GRAPHS, **PBT_GRAPHS}) and len(ids) == 4
    graphs = {g["id"]: json.loads(g["graph_object"]) for g in body["plotly_graph_objects"]}
    tree = graphs["tuner-pbt-lineage"]
    assert "PBT lineage" in tree["layout"]["title"]["text"]
    assert "winner's lineage (trial 9)" in {t["name"] for t in tree["data"]}
    assert "PBT knobs" in graphs["tuner-pbt-knobs"]["layout"]["title"]["text"]


# ---------------------------------------------------------------------------------------------
# tuner dashboard in headless Chromium: the lineage is on the study's pages
# ---------------------------------------------------------------------------------------------

def rendered_text(chromium: str, url: str, profile: Path) -> str:
    """The text of the page Chromium rendered (scripts run; the dashboard's API answers on loopback)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--no-proxy-server",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--enable-unsafe-swiftshader",
           "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", r.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).replace("&amp;", "&").replace("&#x27;", "'")


@pytest.mark.browser
def test_dashboard_shows_the_lineage_in_chromium(pbt_url: str, chromium: str, tmp_path: Path) -> None:
    from test_dashboard import free_port, get_json  # the dashboard tests' server helpers

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", "--storage", pbt_url, "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNER_DEBUG": "0"})
    try:
        summaries = get_json(f"http://127.0.0.1:{port}/api/studies", time.time() + 60)["study_summaries"]
        sid = summaries[0]["study_id"]
        base = f"http://127.0.0.1:{port}/dashboard/studies/{sid}"
        note = rendered_text(chromium, f"{base}/note", tmp_path / "profile-note")
        study = rendered_text(chromium, base, tmp_path / "profile-study")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

    # the note: the winner's lineage as a table, the exploit events as a list
    assert "Population-based training" in note and "Winner: trial 9 (member 1, val_accuracy 0.7200)" in note
    assert "3–4 3 7 ← member 0 (trial 0) 0.0012 0.08 0.6000" in note
    assert "5–6 1 9 ← member 3 (trial 7) 0.00096 0.096 0.7200" in note
    assert "epoch 2: member 3 copied member 0's segment trial 0 (val_acc 0.4000) and explored" in note
    assert "epoch 4: member 1 copied member 3's segment trial 7 (val_acc 0.6000) and explored" in note
    assert note.count("Population-based training") == 1
    # the study page: the two PBT graphs, drawn by plotly in the browser
    assert "PBT lineage: segments by member and epoch" in study and "winner's lineage (trial 9)" in study
    assert "exploit: copied another member" in study
    assert "PBT knobs over epochs" in study and "member 3" in study


@pytest.mark.browser
def test_the_pbt_report_renders_in_chromium_without_errors(pbt_url: str, chromium: str, tmp_path: Path) -> None:
    from test_browser import open_in_chromium, page_errors, plots  # the report's browser checks

    out = tmp_path / "pbt.html"
    data = write_report(open_storage(pbt_url), "pbt", out)
    dom, log = open_in_chromium(chromium, out, tmp_path)
    assert plots(dom) == sum(1 for s in report_sections(data) if s.figure is not None)
    assert page_errors(dom, log, out) == []
    assert "winner's lineage (trial 9)" in dom and "exploit: copied another member" in dom
