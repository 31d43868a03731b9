"""`tuner train` as a user runs it: output, --json, exit codes and one-line errors, checkpoints, overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tuner.study.params import dump_params, parse_params

SPEC = "synthetic:200"


def params_text(epochs: int = 1, dataset: str = SPEC, **sections: dict) -> str:
    training = {"model": "tiny", "epochs": epochs, "batch_size": 32, "dataset": dataset,
                **sections.pop("training", {})}
    return dump_params(parse_params({"training": training, **sections}))


@pytest.fixture(scope="module")
def mini_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 train / 40 test random images: a CLI run on it is as short as a run can be."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "mini.npz"
    np.savez(path, x_train=rng.integers(0, 256, (150, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 150), x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 40))
    return path


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(proc, code: int, *words: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_train_prints_epochs_and_test_accuracy(cli, tmp_path: Path) -> None:
    path = write(tmp_path, params_text(epochs=2))
    proc = cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "training tiny on synthetic (180 train / 20 val / 1000 test)" in out
    assert re.search(r"^epoch 1/2 .*val_acc \d\.\d{4}", out, re.M)
    assert re.search(r"^epoch 2/2 ", out, re.M)
    match = re.search(r"^test_accuracy (\d\.\d{4})  val_accuracy (\d\.\d{4})  epochs 2 ", out, re.M)
    assert match, out
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_json_output(cli, tmp_path: Path, mini_npz: Path) -> None:
    path = write(tmp_path, params_text(epochs=2, dataset=str(mini_npz)))
    proc = cli("train", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # nothing but the JSON object
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    for key in ("test_accuracy", "val_accuracy", "epochs", "seconds", "history"):
        assert key in out, key
    assert out["outcome"] == "completed"
    assert out["epochs"] == 2 == len(out["history"])
    assert 0.0 <= out["test_accuracy"] <= 1.0 and 0.0 <= out["val_accuracy"] <= 1.0
    assert out["val_accuracy"] == out["history"][-1]["val_accuracy"]
    assert out["seconds"] > 0
    assert out["params"] == yaml.safe_load(path.read_text())


def test_divergence_exits_1_with_one_line(cli, tmp_path: Path, mini_npz: Path) -> None:
    path = write(tmp_path, params_text(epochs=2, dataset=str(mini_npz), optimizer={"lr": 10}))
    proc = cli("train", str(path))
    line = assert_one_line_error(proc, 1, "diverged", "lr=10")
    assert "test_accuracy" not in proc.stdout
    assert "clipping" in line or "learning rate" in line  # says what to do


def test_invalid_value_exits_2_naming_key_and_file(cli, tmp_path: Path) -> None:
    text = params_text().replace("eps: 1.0e-08", "eps: -1")
    assert "eps: -1" in text
    path = write(tmp_path, text)
    assert_one_line_error(cli("train", str(path)), 2, "optimizer.eps", str(path))


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "syntax", "binary"])
def test_unusable_params_file_exits_2(cli, tmp_path: Path, case: str) -> None:
    path = tmp_path / "params.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_text("")
    elif case == "syntax":
        path.write_text("optimizer: {lr: 0.1\ntraining: [oops\n")
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    line = assert_one_line_error(cli("train", "params.yaml"), 2, "params.yaml")
    if case == "syntax":
        assert "line" in line


@pytest.mark.parametrize("args,word", [
    (["--epochs", "0"], "--epochs"),
    (["--seed", "-1"], "--seed"),
    (["--bogus"], "--bogus"),
])
def test_bad_flags_exit_2(cli, tmp_path: Path, args: list[str], word: str) -> None:
    path = write(tmp_path, params_text())
    proc = cli("train", str(path), *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert word in proc.stderr
    assert "test_accuracy" not in proc.stdout


def test_missing_argument_exits_2(cli) -> None:
    proc = cli("train")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_debug_shows_traceback(cli, tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer: {eps: -1}\n")
    plain = cli("train", str(path))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = cli("train", str(path), "--debug")
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert error_lines(debug)[-1] == error_lines(plain)[0]  # and still ends with the same one line
    env = cli("train", str(path), env={"TUNER_DEBUG": "1"})
    assert env.returncode == 2 and "Traceback" in env.stderr


def test_checkpoint_written_and_resumed(cli, tmp_path: Path, mini_npz: Path) -> None:
    path = write(tmp_path, params_text(epochs=1, dataset=str(mini_npz)))
    first = cli("train", str(path), "--checkpoint", "run/ckpt.pt")
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "run" / "ckpt.pt"
    assert ckpt.is_file()
    assert "resumed" not in first.stdout
    second = cli("train", str(path), "--checkpoint", "run/ckpt.pt")
    assert second.returncode == 0, second.stderr
    assert "resumed from epoch 1" in second.stdout
    assert re.search(r"^test_accuracy \d\.\d{4} .* epochs 1 ", second.stdout, re.M)
    # the final metrics are the same model's: the resumed run evaluates the checkpointed weights
    acc = lambda out: re.search(r"test_accuracy (\S+)", out).group(1)  # noqa: E731
    assert acc(first.stdout) == acc(second.stdout)
    # other params (here: one more epoch) are refused with one line, exit 1
    third = cli("train", str(path), "--checkpoint", "run/ckpt.pt", "--epochs", "2")
    assert_one_line_error(third, 1, "other params", "ckpt.pt")
    # a corrupt checkpoint is refused early
    ckpt.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(cli("train", str(path), "--checkpoint", "run/ckpt.pt"), 1, "ckpt.pt")


def test_dataset_override(cli, tmp_path: Path, mini_npz: Path) -> None:
    (tmp_path / "mini.npz").write_bytes(mini_npz.read_bytes())
    path = write(tmp_path, params_text(epochs=1))  # the file says synthetic
    proc = cli("train", str(path), "--dataset", "mini.npz", "--batch-size", "64", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "on mini.npz (135 train / 15 val / 40 test)" in proc.stdout
    assert "batch 64" in proc.stdout and "test_accuracy" in proc.stdout
    assert_one_line_error(cli("train", str(path), "--dataset", "imagenet"), 2, "imagenet")
    assert_one_line_error(cli("train", str(path), "--dataset", "missing.npz"), 2, "missing.npz")
