"""Your own model, by reference (`path/to/file.py:callable`, `package.module:callable`) and through the
Python API: real sweeps with pruning on SQLite, export → train reproducing a trial, workers that cannot
import the model, and the example study in studies/."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from sweeps import assert_clean_finish, states, study_file, trials

from conftest import ONE_THREAD, ROOT

MODEL_FILE = textwrap.dedent('''
    """A user's model: it records each build (and the keywords it got) next to itself."""
    import json
    from pathlib import Path

    from torch import nn

    CALLS = Path(__file__).with_suffix(".calls")


    def build(num_classes, in_channels, width=8):
        with CALLS.open("a") as fh:
            fh.write(json.dumps({"num_classes": num_classes, "in_channels": in_channels, "width": width}) + "\\n")
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


    def no_kwargs():
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
''')


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "net.py"
    path.write_text(MODEL_FILE, encoding="utf-8")
    return path


def calls(model_file: Path) -> list[dict]:
    path = model_file.with_suffix(".calls")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sweep_on_a_model_from_a_py_file_then_export_and_train_reproduce(tmp_path: Path, cli, model_file: Path) -> None:
    url = sqlite(tmp_path)
    ref = f"{model_file}:build"
    path = study_file(tmp_path, name="own", model=ref, model_options={"width": 6}, n_trials=8)
    run = cli("sweep", str(path), "--storage", url, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(url, "own", 8)
    counts = states(url, "own")
    assert counts.get("PRUNED", 0) >= 1 and counts.get("COMPLETE", 0) >= 1, counts  # the pruner ran
    # the user's callable built every model: one check at load, then one per trial, with the dataset's shape
    built = calls(model_file)
    assert len(built) >= 1 + 8
    assert all(c == {"num_classes": 10, "in_channels": 3, "width": 6} for c in built)
    study = optuna.load_study(study_name="own", storage=url)
    assert study.user_attrs["tuner_config"]["model"] == ref
    assert study.user_attrs["tuner_config"]["model_options"] == {"width": 6}
    for t in trials(url, "own"):
        assert t.user_attrs["params"]["training"]["model"] == ref
        assert t.user_attrs["params"]["training"]["model_options"] == {"width": 6}

    out = tmp_path / "best.yaml"
    exp = cli("export", "own", "-o", str(out), "--storage", url)
    assert exp.returncode == 0, exp.stderr
    exported = yaml.safe_load(out.read_text())
    assert exported["training"]["model"] == ref and exported["training"]["model_options"] == {"width": 6}
    before = len(calls(model_file))
    train = cli("train", str(out), "--json", env=ONE_THREAD)
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    best = study.best_trial
    assert [h["val_accuracy"] for h in result["history"]] == [h["val_accuracy"] for h in best.user_attrs["history"]]
    assert [h["train_loss"] for h in result["history"]] == pytest.approx(
        [h["train_loss"] for h in best.user_attrs["history"]])
    assert len(calls(model_file)) == before + 2  # rebuilt: the load-time check, then the run


def test_a_worker_that_cannot_import_the_model_exits_1(tmp_path: Path, cli, model_file: Path) -> None:
    url = sqlite(tmp_path)
    path = study_file(tmp_path, name="gone", model=f"{model_file}:build", n_trials=4)
    created = cli("sweep", str(path), "--storage", url, "--create-only")
    assert created.returncode == 0, created.stderr
    model_file.unlink()  # another machine: the file is not there
    run = cli("worker", "--study-name", "gone", "--storage", url)
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    assert f"{model_file}:build" in lines[0] and "not found" in lines[0]
    assert trials(url, "gone") == []  # no trial was started


def test_a_module_reference_imports_from_the_working_directory(tmp_path: Path, cli, model_file: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODEL_FILE, encoding="utf-8")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"training": {"model": "mypkg.nets:build", "model_options": {"width": 4},
                                                   "epochs": 1, "batch_size": 64, "dataset": "synthetic:200"}}))
    run = cli("train", "params.yaml", "--json", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["params"]["training"]["model"] == "mypkg.nets:build"
    assert calls(pkg / "nets.py")[-1] == {"num_classes": 10, "in_channels": 3, "width": 4}


def test_the_check_uses_the_dataset_given_on_the_command_line(tmp_path: Path, cli, model_file: Path) -> None:
    """`--dataset` replaces the file's before the reference is tried: a 1-channel model passes on 1-channel data."""
    (tmp_path / "models" / "grey.py").write_text(textwrap.dedent('''
        from torch import nn

        def build(num_classes):  # a 1-channel model that takes no in_channels
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    '''))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x_train=x, y_train=np.arange(40) % 4, x_test=x[:10], y_test=np.arange(10) % 4)
    url = sqlite(tmp_path)
    path = study_file(tmp_path, name="grey", model=f"{tmp_path / 'models' / 'grey.py'}:build")
    refused = cli("sweep", str(path), "--storage", url, "--create-only")  # the file's data: 3 channels
    assert refused.returncode == 2 and "forward pass" in refused.stderr and "2×3×32×32" in refused.stderr
    assert not (tmp_path / "study.db").exists()
    ok = cli("sweep", str(path), "--storage", url, "--create-only", "--dataset", str(tmp_path / "grey.npz"))
    assert ok.returncode == 0, ok.stderr
    assert optuna.load_study(study_name="grey", storage=url).user_attrs["tuner_config"]["dataset"].endswith("grey.npz")


def test_kwargs_follow_the_signature(model_file: Path) -> None:
    from tuner.training.models import build_model, resolve_reference, shape_kwargs

    fn = resolve_reference(f"{model_file}:build")
    assert shape_kwargs(fn, 5, 1, 28) == {"num_classes": 5, "in_channels": 1}
    assert shape_kwargs(lambda **kw: None, 5, 1, 28) == {"num_classes": 5, "in_channels": 1, "image_size": 28}
    assert shape_kwargs(resolve_reference(f"{model_file}:no_kwargs"), 5, 1, 28) == {}
    model = build_model(f"{model_file}:build", 5, in_channels=1, image_size=28, options={"width": 4})
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)


def test_the_example_study_loads_and_its_model_trains() -> None:
    import os

    from tuner.study.config import load_study_file
    from tuner.study.params import TrialParams
    from tuner.training.data import load_dataset
    from tuner.training.train import train

    here = os.getcwd()
    os.chdir(ROOT)  # the example's path resolves against the working directory, as documented
    try:
        config = load_study_file(ROOT / "studies" / "own-model.yaml")
        assert config.training.model == "examples/my_model.py:build"
        params = TrialParams(training=config.training).with_training(epochs=1, dataset="synthetic:200")
        result = train(params, load_dataset("synthetic:200"))
    finally:
        os.chdir(here)
    assert result.outcome == "completed" and result.epochs == 1


def test_python_api_sweep_with_a_callable_and_arrays(tmp_path: Path, one_thread) -> None:
    import tuner
    from tuner.training.data import make_synthetic

    raw = make_synthetic(n_train=400, n_test=100, seed=3)
    seen: list[dict] = []

    def build(num_classes: int, in_channels: int, image_size: int, width: int = 8) -> torch.nn.Module:
        seen.append({"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size})
        from torch import nn

        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    config = yaml.safe_load(study_file(tmp_path, name="api").read_text())
    url = sqlite(tmp_path)
    data = (raw.x_train, raw.y_train, raw.x_test, raw.y_test)
    study = tuner.tune(config, model=build, model_options={"width": 4}, data=data, storage=url, n_trials=3)
    assert isinstance(study, optuna.Study) and study.study_name == "api"
    assert len(study.trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len(seen) == 1 + 3 and seen[0] == {"num_classes": 10, "in_channels": 3, "image_size": 32}
    stored = study.user_attrs["tuner_config"]
    assert stored["model"].startswith("in-process:") and "build" in stored["model"]
    assert stored["dataset"].startswith("in-process:arrays-")
    # the same call again continues the same study (same descriptions)
    again = tuner.tune(config, model=build, model_options={"width": 4}, data=data, storage=url, n_trials=4)
    assert len(again.trials) == 4
    out = tmp_path / "best.yaml"
    text = tuner.export_best(again, out)
    assert out.read_text() == text
    exported = yaml.safe_load(text)
    assert exported["study"]["trial"] == again.best_trial.number
    assert exported["training"]["model"] == stored["model"] and exported["training"]["model_options"] == {"width": 4}


def test_python_api_rejects_bad_arrays_before_writing(tmp_path: Path) -> None:
    import tuner
    from tuner.errors import DataError

    rng = np.random.default_rng(0)
    x = rng.random((40, 8, 8, 1)).astype(np.float32)  # not uint8
    y = np.arange(40) % 2
    config = yaml.safe_load(study_file(tmp_path, name="api-bad").read_text())
    with pytest.raises(DataError, match="uint8"):
        tuner.tune(config, data=(x, y, x, y), storage=sqlite(tmp_path), n_trials=1)
    assert not (tmp_path / "study.db").exists()


def test_import_tuner_is_cheap_and_the_api_is_typed_and_documented() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys, tuner; print('torch' in sys.modules, "
                        "'optuna' in sys.modules)"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
    import inspect

    import tuner
    import tuner.api

    for name in ("tune", "export_best", "load_config"):
        fn = getattr(tuner.api, name)
        assert fn.__doc__ and name in tuner.__all__ and name in tuner.api.__all__
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())
    assert tuner.export_best is tuner.api.export_best and tuner.tune is tuner.api.tune
