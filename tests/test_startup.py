"""Start-up: the read-side commands never import torch, an unsupported Optuna is one line and exit 1,
`tuner --version`, and `--debug` read from the arguments `main` is given. Nothing here is timed (the
start-up seconds are benchmark figures: benchmarks/startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import ROOT, cli_main
from tuner import __version__, cli

REQUIREMENT = cli.OPTUNA_REQUIREMENT


# -- the Optuna version check ------------------------------------------------------------------

@pytest.mark.parametrize("found", ["5.0.0", "5.0.1", "5.1.0", "5.1.3", "5.1.0.dev0", "5.1.0rc1", "5.0.0+loc"])
def test_supported_optuna_versions_pass(found: str) -> None:
    assert cli.optuna_problem(found) is None


@pytest.mark.parametrize("found", ["4.5.0", "4.8.0", "4.9.9", "5.0.0rc1", "5.2.0", "5.2.0rc1", "6.0.0", "banana"])
def test_unsupported_optuna_versions_are_one_line(found: str) -> None:
    assert cli.optuna_problem(found) == (f"tuner needs optuna{REQUIREMENT}, found {found} "
                                         f"(pip install 'optuna{REQUIREMENT}')")


def test_missing_optuna_is_named() -> None:
    assert cli.optuna_problem(None) == (f"tuner needs optuna{REQUIREMENT}, found none "
                                        f"(pip install 'optuna{REQUIREMENT}')")


def test_the_range_is_the_one_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert [d.replace(" ", "") for d in deps if d.startswith("optuna") and not d.startswith("optuna-")] == [
        f"optuna{REQUIREMENT}"]
    assert cli.optuna_problem(version("optuna")) is None  # this environment is supported


def test_cli_refuses_an_unsupported_optuna(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "installed_version", lambda dist: "4.8.0" if dist == "optuna" else version(dist))
    code, out, err = cli_main(capsys, "studies")
    assert (code, out) == (1, "")
    assert err == f"error: tuner needs optuna{REQUIREMENT}, found 4.8.0 (pip install 'optuna{REQUIREMENT}')\n"


def test_an_old_optuna_installed_gets_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A real process whose Optuna metadata says 4.8.0 (a dist-info ahead of the real one on the path):
    the check runs before anything imports Optuna, so there is no ImportError."""
    fake = tmp_path / "site" / "optuna-4.8.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: optuna\nVersion: 4.8.0\n", encoding="utf-8")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "tuner", "studies"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"error: tuner needs optuna{REQUIREMENT}, found 4.8.0 (pip install 'optuna{REQUIREMENT}')\n"
    assert r.stdout == ""


# -- tuner --version ---------------------------------------------------------------------------

def test_version_names_tuner_optuna_and_torch(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_main(capsys, "--version")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"tuner {__version__}", f"optuna {version('optuna')}", f"torch {version('torch')}"]


# -- --debug is read from the arguments main() is given ----------------------------------------

def test_debug_in_the_given_argv_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TUNER_DEBUG", raising=False)
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.setattr(sys, "argv", ["tuner"])  # not where main(argv) looks
    code, _, err = cli_main(capsys, "train", missing, "--debug")
    assert code == 2
    assert "Traceback (most recent call last)" in err and err.endswith(f"error: {missing}: file not found\n")

    monkeypatch.setattr(sys, "argv", ["tuner", "--debug"])  # the process's own argv does not count either
    code, _, err = cli_main(capsys, "train", missing)
    assert (code, err) == (2, f"error: {missing}: file not found\n")


# -- read-side commands do not import torch ----------------------------------------------------

# Runs tuner.cli.main(argv) in a fresh interpreter; exits 3 naming the import chain if torch was
# imported, else with the command's own exit code.
_WRAPPER = textwrap.dedent("""
    import builtins, sys, traceback
    chain = []
    _import = builtins.__import__

    def _hook(name, *args, **kwargs):
        if not chain and name.split(".")[0] in ("torch", "torchvision") and "torch" not in sys.modules:
            chain.extend(f"{f.filename}:{f.lineno}: {f.line}" for f in traceback.extract_stack()[:-1]
                         if "tuner" in f.filename)
        return _import(name, *args, **kwargs)

    builtins.__import__ = _hook
    from tuner.cli import main
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    if "torch" in sys.modules:
        print("torch was imported, via:", *chain, sep="\\n  ", file=sys.stderr)
        sys.exit(3)
    sys.exit(code)
""")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _params(lr: float) -> dict:
    from tuner.study.params import TrialParams

    p = TrialParams().to_dict()
    p["optimizer"]["lr"] = lr
    p["training"].update(model="tiny", epochs=2, batch_size=64, dataset="synthetic:300")
    return p


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two small real studies, made with plain Optuna: a stored config and COMPLETE trials with params."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from tuner.storage import keys
    from tuner.study.config import parse_study

    url = f"sqlite:///{tmp_path_factory.mktemp('startup') / 'tuner.db'}"
    for name, values in (("a", [0.61, 0.72, 0.55]), ("b", [0.58, 0.66])):
        study = optuna.create_study(storage=url, study_name=name, direction="maximize")
        config = parse_study({"name": name, "dataset": "synthetic:300", "model": "tiny", "epochs": 2, "batch_size": 64,
                              "n_trials": 4, "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}})
        study.set_user_attr(keys.CONFIG, config.to_dict())
        for i, value in enumerate(values):
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                         intermediate_values={1: value / 2, 2: value},
                                         user_attrs={keys.PARAMS: _params(1e-2 * (i + 1)), keys.SECONDS: 1.0}))
    return url


@pytest.mark.parametrize("args", [
    ["--help"],
    ["--version"],
    ["studies"],
    ["best", "a", "--top", "2"],
    ["export", "a"],
    ["export", "a", "-o", "best.yaml"],
    ["report", "a", "-o", "report.html"],
    ["compare", "a", "b"],
], ids=lambda a: " ".join(a))
def test_read_side_commands_do_not_import_torch(args: list[str], storage_url: str, tmp_path: Path) -> None:
    argv = [*args, "--storage", storage_url] if args[0] not in ("--help", "--version") else args
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 3, r.stderr
    assert r.returncode == 0, r.stderr
    if args[0] == "export" and "-o" not in args:
        assert "optimizer:" in r.stdout and "selected_by: best single run" in r.stdout
