"""`training.pack` in a study file is read like every other whole-number key: `4.0` is 4, and a
value that is not a whole number >= 1 (or auto) is refused in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import cli_main
from tuner.study.config import load_study_file
from tuner.study.params import parse_pack


def study(folder: Path, **training) -> Path:
    data = {"name": "p", "direction": "maximize", "dataset": "synthetic:200", "model": "tiny", "epochs": 4.0,
            "n_trials": 2, "training": training, "space": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}}
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("value", [4.0, 4, "4", "4.0"])
def test_a_whole_number_is_accepted_as_epochs_is(tmp_path, value):
    config = load_study_file(study(tmp_path, pack=value), check_model=False)
    assert config.pack == 4 and isinstance(config.pack, int)
    assert config.training.epochs == 4  # the same file's `epochs: 4.0`


@pytest.mark.parametrize("value, shown", [(4.5, "4.5"), (0, "0"), (-1, "-1"), ("x", "'x'"), (True, "True"),
                                          (0.0, "0.0")])
def test_anything_else_is_one_line_naming_the_key(tmp_path, capsys, value, shown):
    path = study(tmp_path, pack=value)
    code, out, err = cli_main(capsys, "sweep", str(path), "--create-only", "--storage",
                              f"sqlite:///{tmp_path / 'study.db'}")
    assert (code, out) == (2, "")
    assert err == f"error: {path}: training.pack: must be a whole number >= 1 or auto, got {shown}\n"
    assert not (tmp_path / "study.db").exists()


def test_the_flag_reads_the_same_way():
    assert parse_pack("auto") == "auto" and parse_pack(" 3 ") == 3 and parse_pack(2.0) == 2
    with pytest.raises(ValueError, match=r"got '2\.5'"):
        parse_pack("2.5")
