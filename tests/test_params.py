"""The params file: defaults, the documented format, round trips and every validation rule."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import tuner.study.params as params_module
from tuner.errors import ConfigError
from tuner.study.params import (
    CLIP_MODES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ClippingParams,
    OptimizerParams,
    ScheduleParams,
    TrainingParams,
    TrialParams,
    check_override,
    dump_params,
    load_params,
    parse_params,
)
from tuner.training.models import MODELS


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def documented_example() -> str:
    """The indented YAML block of tuner/study/params.py's module docstring (the documented format)."""
    doc = params_module.__doc__ or ""
    lines = [line for line in doc.splitlines() if line.startswith("    ") and ":" in line]
    assert lines, "the params module docstring no longer shows the file format"
    return textwrap.dedent("\n".join(lines)) + "\n"


# ---------------------------------------------------------------------------------------------
# Defaults and the documented format
# ---------------------------------------------------------------------------------------------

def test_defaults() -> None:
    for empty in ({}, None, {"optimizer": None, "schedule": {}, "clipping": None, "training": {}}):
        p = parse_params(empty)
        assert p == TrialParams()
    p = TrialParams()
    assert (p.optimizer.name, p.optimizer.lr, p.optimizer.betas, p.optimizer.eps) == ("adam", 1e-3, (0.9, 0.999), 1e-8)
    assert p.optimizer.weight_decay == 0.0 and p.optimizer.amsgrad is False
    assert (p.schedule.name, p.schedule.warmup_fraction) == ("cosine", 0.0)
    assert (p.clipping.mode, p.clipping.threshold) == ("none", None)
    t = p.training
    assert (t.model, t.epochs, t.batch_size, t.dataset, t.seed) == ("fastcnn", 10, 512, "cifar10", 0)
    assert t.val_fraction == 0.1 and t.augment is True and t.precision == "auto" and t.compile is False


def test_partial_sections_keep_other_defaults() -> None:
    p = parse_params({"optimizer": {"lr": 0.01}, "training": {"epochs": 3}})
    assert p.optimizer == OptimizerParams(lr=0.01)
    assert p.training == TrainingParams(epochs=3)
    assert p.schedule == ScheduleParams() and p.clipping == ClippingParams()


def test_documented_format_parses_and_round_trips(tmp_path: Path) -> None:
    text = documented_example()
    data = yaml.safe_load(text)
    assert set(data) == {"optimizer", "schedule", "clipping", "training"}
    p = load_params(write(tmp_path, text))
    # what the docstring shows is what is parsed
    assert p.optimizer.name == data["optimizer"]["name"]
    assert p.optimizer.lr == pytest.approx(float(data["optimizer"]["lr"]))
    assert p.optimizer.betas == tuple(data["optimizer"]["betas"])
    assert p.schedule.name == data["schedule"]["name"]
    assert p.clipping.mode == data["clipping"]["mode"]
    assert p.training.model == data["training"]["model"]
    assert p.training.epochs == data["training"]["epochs"]
    # dump -> load gives the same params, and dumping again gives the same text
    dumped = dump_params(p)
    again = load_params(write(tmp_path, dumped, "again.yaml"))
    assert again == p
    assert dump_params(again) == dumped


@pytest.mark.parametrize("data", [
    {},
    {"optimizer": {"name": "adamw", "lr": 3.5e-4, "betas": [0.85, 0.99], "eps": 1e-6, "weight_decay": 0.05,
                   "amsgrad": True},
     "schedule": {"name": "step", "warmup_fraction": 0.1, "gamma": 0.5, "milestones": [0.3, 0.6, 0.9]},
     "clipping": {"mode": "norm", "threshold": 2.5},
     "training": {"model": "tiny", "epochs": 7, "batch_size": 64, "dataset": "synthetic:300", "seed": 42,
                  "val_fraction": 0.2, "augment": False, "precision": "fp32", "compile": True}},
    {"schedule": {"name": "cosine", "min_lr_fraction": 0.05}, "clipping": {"mode": "value", "threshold": 0.1}},
    {"schedule": {"name": "onecycle", "pct_start": 0.4}},
    {"schedule": {"name": "exponential", "gamma": 0.95}},
])
def test_round_trip(tmp_path: Path, data: dict) -> None:
    p = parse_params(data)
    text = dump_params(p)
    assert load_params(write(tmp_path, text)) == p
    # the dumped file is plain YAML: safe_load reads it back, and parsing that mapping agrees
    assert parse_params(yaml.safe_load(text)) == p
    assert p.to_dict() == yaml.safe_load(text)


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    text = "optimizer: {lr: 1e-5, eps: 1e-8, weight_decay: 5e-4, betas: [9e-1, 0.999]}\n"
    raw = yaml.safe_load(text)
    assert isinstance(raw["optimizer"]["lr"], str)  # YAML 1.1: this is why the parser must cope
    p = load_params(write(tmp_path, text))
    assert isinstance(p.optimizer.lr, float) and p.optimizer.lr == 1e-5
    assert p.optimizer.eps == 1e-8 and p.optimizer.weight_decay == 5e-4
    assert p.optimizer.betas == (0.9, 0.999)
    # and the dumped file carries real floats, not strings
    again = yaml.safe_load(dump_params(p))
    assert isinstance(again["optimizer"]["lr"], float) and again["optimizer"]["lr"] == 1e-5
    assert isinstance(again["optimizer"]["eps"], float)


def test_whole_number_floats_are_accepted_for_ints() -> None:
    p = parse_params({"training": {"epochs": 3.0, "batch_size": "64"}})
    assert p.training.epochs == 3 and isinstance(p.training.epochs, int)
    assert p.training.batch_size == 64


# ---------------------------------------------------------------------------------------------
# Validation: every rule is rejected naming the key (and the file)
# ---------------------------------------------------------------------------------------------

BAD = [
    # optimizer
    ({"optimizer": {"lr": 0}}, "optimizer.lr"),
    ({"optimizer": {"lr": -1e-3}}, "optimizer.lr"),
    ({"optimizer": {"lr": "abc"}}, "optimizer.lr"),
    ({"optimizer": {"lr": True}}, "optimizer.lr"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr"),
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr"),
    ({"optimizer": {"lr": [0.1]}}, "optimizer.lr"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
    ({"optimizer": {"betas": [0.9, 0.99, 0.999]}}, "optimizer.betas"),
    ({"optimizer": {"betas": 0.9}}, "optimizer.betas"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
    ({"optimizer": {"betas": [1.5, 0.999]}}, "optimizer.betas"),
    ({"optimizer": {"betas": [-0.1, 0.999]}}, "optimizer.betas"),
    ({"optimizer": {"betas": ["x", 0.999]}}, "optimizer.betas"),
    ({"optimizer": {"eps": 0}}, "optimizer.eps"),
    ({"optimizer": {"eps": -1}}, "optimizer.eps"),
    ({"optimizer": {"weight_decay": -0.01}}, "optimizer.weight_decay"),
    ({"optimizer": {"amsgrad": "yes"}}, "optimizer.amsgrad"),
    ({"optimizer": {"amsgrad": 1}}, "optimizer.amsgrad"),
    # schedule
    ({"schedule": {"warmup_fraction": 1.0}}, "schedule.warmup_fraction"),
    ({"schedule": {"warmup_fraction": 1.5}}, "schedule.warmup_fraction"),
    ({"schedule": {"warmup_fraction": -0.1}}, "schedule.warmup_fraction"),
    ({"schedule": {"name": "step", "gamma": 0}}, "schedule.gamma"),
    ({"schedule": {"name": "step", "gamma": 1.5}}, "schedule.gamma"),
    ({"schedule": {"name": "step", "milestones": []}}, "schedule.milestones"),
    ({"schedule": {"name": "step", "milestones": [0.75, 0.5]}}, "schedule.milestones"),
    ({"schedule": {"name": "step", "milestones": [0.5, 1.0]}}, "schedule.milestones"),
    ({"schedule": {"min_lr_fraction": -0.1}}, "schedule.min_lr_fraction"),
    ({"schedule": {"min_lr_fraction": 1.5}}, "schedule.min_lr_fraction"),
    ({"schedule": {"pct_start": 0}}, "schedule.pct_start"),
    ({"schedule": {"pct_start": 1}}, "schedule.pct_start"),
    # clipping
    ({"clipping": {"mode": "norm"}}, "clipping.threshold"),
    ({"clipping": {"mode": "value"}}, "clipping.threshold"),
    ({"clipping": {"mode": "norm", "threshold": None}}, "clipping.threshold"),
    ({"clipping": {"mode": "norm", "threshold": 0}}, "clipping.threshold"),
    ({"clipping": {"mode": "value", "threshold": -1}}, "clipping.threshold"),
    ({"clipping": {"mode": "norm", "threshold": "big"}}, "clipping.threshold"),
    ({"clipping": {"mode": "none", "threshold": -1}}, "clipping.threshold"),
    # training
    ({"training": {"epochs": 1.5}}, "training.epochs"),
    ({"training": {"epochs": 0}}, "training.epochs"),
    ({"training": {"epochs": "ten"}}, "training.epochs"),
    ({"training": {"epochs": True}}, "training.epochs"),
    ({"training": {"batch_size": 0}}, "training.batch_size"),
    ({"training": {"seed": -1}}, "training.seed"),
    ({"training": {"val_fraction": 0}}, "training.val_fraction"),
    ({"training": {"val_fraction": 1}}, "training.val_fraction"),
    ({"training": {"augment": "no"}}, "training.augment"),
    ({"training": {"compile": 0}}, "training.compile"),
    ({"training": {"dataset": ""}}, "training.dataset"),
    ({"training": {"dataset": 5}}, "training.dataset"),
    # sections that are not mappings
    ({"optimizer": [1, 2]}, "optimizer"),
    ({"schedule": "cosine"}, "schedule"),
    ({"training": 3}, "training"),
]


@pytest.mark.parametrize("data,key", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_invalid_value_names_key_and_file(tmp_path: Path, data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(data)
    assert info.value.key == key
    assert info.value.exit_code == 2
    assert f"{key}: " in str(info.value)
    # through a file, the message starts with the file name
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_nan_from_yaml_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.lr: must be finite"):
        load_params(write(tmp_path, "optimizer: {lr: .nan}\n"))


@pytest.mark.parametrize("data,key,valid", [
    ({"bogus": 1}, "bogus", ("optimizer", "schedule", "clipping", "training", "study")),
    ({"optimizer": {"momentum": 0.9}}, "optimizer.momentum", ("lr", "betas", "eps", "weight_decay", "amsgrad")),
    ({"schedule": {"T_max": 5}}, "schedule.T_max", ("warmup_fraction", "gamma", "milestones", "pct_start")),
    ({"clipping": {"max_norm": 1.0}}, "clipping.max_norm", ("mode", "threshold")),
    ({"training": {"lr": 0.1}}, "training.lr", ("model", "epochs", "batch_size", "dataset", "seed")),
])
def test_unknown_keys_at_each_level(tmp_path: Path, data: dict, key: str, valid: tuple[str, ...]) -> None:
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and "unknown key" in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize("data,key,valid", [
    ({"optimizer": {"name": "sgd"}}, "optimizer.name", OPTIMIZERS),
    ({"optimizer": {"name": "Adam"}}, "optimizer.name", OPTIMIZERS),
    ({"schedule": {"name": "cyclic"}}, "schedule.name", SCHEDULES),
    ({"clipping": {"mode": "global"}}, "clipping.mode", CLIP_MODES),
    ({"training": {"model": "vgg16"}}, "training.model", tuple(MODELS)),
    ({"training": {"precision": "fp16"}}, "training.precision", PRECISIONS),
])
def test_unknown_names_list_the_valid_ones(tmp_path: Path, data: dict, key: str, valid: tuple[str, ...]) -> None:
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert info.value.key == key and message.startswith(f"{path}: {key}: ")
    bad = next(iter(next(iter(data.values())).values()))
    assert repr(bad) in message
    for name in valid:
        assert name in message


def test_every_registered_model_is_accepted() -> None:
    for name in MODELS:
        assert parse_params({"training": {"model": name}}).training.model == name


def test_check_override() -> None:
    check_override("--epochs", None)
    check_override("--epochs", 1)
    check_override("--seed", 0, ge=0)
    with pytest.raises(ConfigError, match="--epochs") as info:
        check_override("--epochs", 0)
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="--seed"):
        check_override("--seed", -1, ge=0)


def test_with_training_ignores_none() -> None:
    p = parse_params({"training": {"epochs": 5, "dataset": "synthetic"}})
    assert p.with_training(epochs=None, dataset=None) is p
    q = p.with_training(epochs=2, dataset=None, seed=7)
    assert (q.training.epochs, q.training.dataset, q.training.seed) == (2, "synthetic", 7)
    assert q.optimizer == p.optimizer and p.training.epochs == 5


# ---------------------------------------------------------------------------------------------
# Exported files and torch compatibility
# ---------------------------------------------------------------------------------------------

def test_exported_file_with_study_block_is_accepted(tmp_path: Path) -> None:
    p = parse_params({"optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                      "training": {"model": "tiny", "epochs": 4}})
    study = {"study": {"name": "adam-cifar10", "trial": 17, "val_accuracy": 0.8123, "storage": "sqlite:///tuner.db"}}
    text = dump_params(p, extra=study)
    assert list(yaml.safe_load(text))[-1] == "study"
    assert load_params(write(tmp_path, text)) == p
    # a hand-written study block with anything in it is informational too
    hand = documented_example() + "study: {name: x, note: free text, best: [1, 2, 3]}\n"
    assert load_params(write(tmp_path, hand, "hand.yaml")) == parse_params(yaml.safe_load(documented_example()))
    # but a study block does not let other unknown top-level keys through
    with pytest.raises(ConfigError, match="extra"):
        load_params(write(tmp_path, text + "extra: 1\n", "extra.yaml"))


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_dumped_optimizer_block_is_accepted_by_torch(name: str, cls: type) -> None:
    text = dump_params(parse_params({"optimizer": {"name": name, "lr": "3e-4", "betas": [0.8, 0.95],
                                                   "eps": "1e-7", "weight_decay": 0.02, "amsgrad": True}}))
    model = torch.nn.Linear(4, 2)
    kwargs = {k: v for k, v in yaml.safe_load(text)["optimizer"].items() if k != "name"}
    for optimizer_cls in (torch.optim.Adam, cls):
        opt = optimizer_cls(model.parameters(), **kwargs)
        group = opt.param_groups[0]
        assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-7
        assert group["weight_decay"] == 0.02 and group["amsgrad"] is True
        model(torch.randn(3, 4)).sum().backward()
        opt.step()  # the kwargs are real numbers, not strings: a step works
    assert yaml.safe_load(text)["optimizer"]["name"] == name


def test_torch_kwargs_match_the_file_block() -> None:
    p = parse_params({"optimizer": {"name": "adamw", "lr": 0.01, "betas": [0.5, 0.6], "eps": 1e-5}})
    block = {k: v for k, v in p.to_dict()["optimizer"].items() if k != "name"}
    kwargs = p.optimizer.torch_kwargs()
    assert set(kwargs) == set(block)
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()} == block


# ---------------------------------------------------------------------------------------------
# intervals: per-interval values of the mutable knobs (a population-based winner, replayed)
# ---------------------------------------------------------------------------------------------

INTERVALS_FILE = """\
optimizer: {lr: 0.003, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.0001}
clipping: {mode: norm, threshold: 1.0}
training: {model: tiny, epochs: 4}
intervals:   # the values in force from each epoch on
  - {from_epoch: 0, lr: 0.003, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.0001}
  - {from_epoch: 2, lr: 0.0024, betas: [0.85, 0.999], clip_threshold: 2.0}
  - {from_epoch: 3, eps: 1.0e-06}
"""


def test_intervals_parse_and_give_the_values_in_force(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, INTERVALS_FILE))
    assert [i.from_epoch for i in params.intervals] == [0, 2, 3]
    for done in (0, 1):
        assert params.at_epoch(done) == replace(params, intervals=())
    two = params.at_epoch(2)
    assert two.intervals == ()
    assert (two.optimizer.lr, two.optimizer.betas, two.optimizer.eps, two.optimizer.weight_decay) == (
        0.0024, (0.85, 0.999), 1e-8, 1e-4)
    assert two.clipping == ClippingParams(mode="norm", threshold=2.0)
    three = params.at_epoch(3)
    assert (three.optimizer.lr, three.optimizer.eps, three.clipping.threshold) == (0.0024, 1e-6, 2.0)
    assert three.schedule == params.schedule and three.training == params.training
    # what is not given stays as the file wrote it: the dict round-trips
    assert params.to_dict()["intervals"][2] == {"from_epoch": 3, "eps": 1e-6}
    again = load_params(write(tmp_path, dump_params(params), "again.yaml"))
    assert again == params


def test_params_without_intervals_are_unchanged() -> None:
    params = parse_params({"training": {"epochs": 3}})
    assert params.intervals == () and params.at_epoch(2) is params
    assert "intervals" not in params.to_dict()


BAD_INTERVALS = [
    ({"intervals": {"from_epoch": 0}}, "intervals", "non-empty list"),
    ({"intervals": []}, "intervals", "non-empty list"),
    ({"intervals": [{"lr": 0.001}]}, "intervals[0].from_epoch", "is required"),
    ({"intervals": [{"from_epoch": 1}]}, "intervals[0].from_epoch", "must be 0"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 2}, {"from_epoch": 2}]}, "intervals[2].from_epoch",
     "greater than intervals[1]"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 4}]}, "intervals[1].from_epoch", "less than training.epochs"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": -1}]}, "intervals[1].from_epoch", ">= 0"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "lr": 0}]}, "intervals[1].lr", "> 0"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "betas": [0.9]}]}, "intervals[1].betas", "two numbers"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "betas": [0.9, 1.0]}]}, "intervals[1].betas", "[0, 1)"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "eps": -1}]}, "intervals[1].eps", "> 0"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "weight_decay": -1}]}, "intervals[1].weight_decay", ">= 0"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "clip_threshold": 1.0}]}, "intervals[1].clip_threshold",
     "clipping.mode"),
    ({"intervals": [{"from_epoch": 0}, {"from_epoch": 1, "momentum": 0.9}]}, "intervals[1].momentum", "unknown key"),
    ({"intervals": [{"from_epoch": 0, "lr": 0.01}]}, "intervals[0].lr", "differs from optimizer.lr"),
    ({"intervals": [{"from_epoch": 0, "betas": [0.8, 0.999]}]}, "intervals[0].betas", "differs from optimizer.betas"),
    ({"intervals": ["x"]}, "intervals[0]", "mapping"),
]


@pytest.mark.parametrize("data,key,words", BAD_INTERVALS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_INTERVALS)])
def test_invalid_intervals_name_the_entry_and_key(tmp_path: Path, data: dict, key: str, words: str) -> None:
    data = {"training": {"model": "tiny", "epochs": 4}, **data}
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert info.value.key == key and info.value.exit_code == 2
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and words in message and "\n" not in message
