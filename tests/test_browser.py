"""Real-browser checks: headless Chromium opens report.html and compare.html from disk, with the
network off, renders every plot, and logs no JavaScript error.

The page records JavaScript errors in `<pre id="js-errors">` (a hook that runs before plotly), and
Chromium's console log goes to stderr; both are checked. A deliberately broken page checks that
the checks can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from tuner.engine.sweep import Flags, run_sweep
from tuner.insight.compare import load_compare, write_compare
from tuner.insight.report import render_page, report_sections, write_report
from tuner.storage.database import open_storage
from tuner.study.config import parse_study

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]
optuna.logging.set_verbosity(optuna.logging.WARNING)



QUICK = {
    "name": "quick", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 3,
    "batch_size": 64, "seed": 0, "n_trials": 8, "sampler": {"name": "random"}, "pruner": {"name": "none"},
    "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
              "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True},
              "one_minus_beta2": {"low": 1e-4, "high": 0.1, "log": True},
              "eps": {"low": 1e-10, "high": 1e-4, "log": True},
              "schedule": {"choices": ["constant", "cosine"]},
              "clipping": {"choices": ["none", "norm"]},
              "clip_threshold": {"low": 0.1, "high": 10.0, "log": True}},
}
OTHER = {**QUICK, "name": "other", "n_trials": 4, "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}


def _no_network_prefix() -> list[str]:
    """`unshare -rn` (a network namespace with no interfaces) where the kernel allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def open_in_chromium(chromium: str, page: Path, tmp_path: Path) -> tuple[str, str]:
    """(dumped DOM, browser log) of `page` opened from disk with the network off."""
    profile = tmp_path / f"profile-{page.stem}"
    cmd = [*_no_network_prefix(), chromium, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--enable-unsafe-swiftshader",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # belt and braces: no network
           "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


def page_errors(dom: str, log: str, page: Path) -> list[str]:
    """JavaScript errors: recorded by the page's hook, or logged by Chromium for this page."""
    errors = []
    m = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert m, "the error hook's <pre id=js-errors> is missing"
    if m.group(1).strip():
        errors.append(m.group(1).strip())
    uri = page.resolve().as_uri()
    for line in log.splitlines():
        if ("Uncaught" in line or "ERROR:CONSOLE" in line) and (uri in line or "file://" in line):
            errors.append(line)
    return errors


def plots(dom: str) -> int:
    return dom.count('class="plot-container')


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'b.db'}"
    for cfg in (QUICK, OTHER):
        run_sweep(parse_study(cfg), Flags(storage=url, device="cpu"))
    study = optuna.create_study(storage=url, study_name="failed-only", direction="maximize")
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": "RuntimeError: boom"}))
    return url


def test_report_renders_offline_without_errors(chromium: str, storage_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    data = write_report(open_storage(storage_url), "quick", out, url=storage_url)
    expected = sum(1 for s in report_sections(data) if s.figure is not None)
    assert expected >= 9  # every plot panel is drawn for this study
    dom, log = open_in_chromium(chromium, out, tmp_path)
    assert plots(dom) == expected >= 8
    assert dom.count("js-plotly-plot") >= expected
    assert "<svg" in dom and "main-svg" in dom  # plotly drew into the containers
    assert page_errors(dom, log, out) == []
    assert "Not drawn:" not in dom


def test_degenerate_report_renders_notes(chromium: str, storage_url: str, tmp_path: Path) -> None:
    out = tmp_path / "failed.html"
    write_report(open_storage(storage_url), "failed-only", out)
    dom, log = open_in_chromium(chromium, out, tmp_path)
    assert plots(dom) == 1  # the timeline; the rest explain what is missing
    assert dom.count("Not drawn:") == 9
    assert page_errors(dom, log, out) == []


def test_compare_renders_offline_without_errors(chromium: str, storage_url: str, tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    write_compare(load_compare(open_storage(storage_url), ["quick", "other", "failed-only"]), out)
    dom, log = open_in_chromium(chromium, out, tmp_path)
    assert plots(dom) == 3
    assert "fixed: 0.9" in dom  # `other` did not search beta1
    assert page_errors(dom, log, out) == []


def test_the_error_checks_catch_a_broken_page(chromium: str, tmp_path: Path) -> None:
    from tuner.insight.report import Section

    out = tmp_path / "broken.html"
    page = render_page("broken", "<h1>broken</h1>", [Section("x", "y", body_html="<script>noSuchFunction();</script>")])
    out.write_text(page)
    dom, log = open_in_chromium(chromium, out, tmp_path)
    errors = page_errors(dom, log, out)
    assert errors and "noSuchFunction" in errors[0]
