"""The search space: parsing, validation naming file and key, and `suggest` as a pure function."""

from __future__ import annotations

import math

import pytest
from optuna.trial import FixedTrial

from tuner.errors import ConfigError
from tuner.study.config import parse_study
from tuner.study.params import TrainingParams
from tuner.study.space import Choices, Fixed, Range, parse_space, suggest

T = TrainingParams(model="tiny", dataset="synthetic", epochs=2, batch_size=64)


def test_knob_kinds_and_yaml_style_numbers():
    space = parse_space({"lr": {"low": "1e-5", "high": 0.1, "log": True}, "eps": "1e-8",
                         "schedule": {"choices": ["cosine", "constant"]}})
    assert space.knobs["lr"] == Range(1e-5, 0.1, log=True)
    assert space.knobs["eps"] == Fixed(1e-8)
    assert space.knobs["schedule"] == Choices(("cosine", "constant"))
    assert space.sampled() == ["lr", "schedule"]


def test_suggest_writes_one_minus_beta_back_as_betas():
    space = parse_space({"one_minus_beta1": {"low": 1e-3, "high": 0.5, "log": True},
                         "one_minus_beta2": {"low": 1e-4, "high": 0.1, "log": True}, "lr": 0.01})
    p = suggest(FixedTrial({"one_minus_beta1": 0.1, "one_minus_beta2": 0.001}), space, T)
    assert p.optimizer.betas == pytest.approx((0.9, 0.999))
    assert p.optimizer.lr == 0.01
    assert p.training == T


def test_clip_threshold_sampled_only_when_clipping():
    space = parse_space({"clipping": {"choices": ["none", "norm", "value"]},
                         "clip_threshold": {"low": 0.1, "high": 10, "log": True}})
    none = suggest(FixedTrial({"clipping": "none"}), space, T)  # FixedTrial would raise if asked for more
    assert none.clipping.mode == "none" and none.clipping.threshold is None
    norm = suggest(FixedTrial({"clipping": "norm", "clip_threshold": 2.5}), space, T)
    assert norm.clipping.mode == "norm" and norm.clipping.threshold == 2.5


def test_unnamed_knobs_take_adam_defaults():
    p = suggest(FixedTrial({"lr": 0.003}), parse_space({"lr": {"low": 1e-4, "high": 1e-1, "log": True}}), T)
    o = p.optimizer
    assert (o.name, o.betas, o.eps, o.weight_decay, o.amsgrad) == ("adam", (0.9, 0.999), 1e-8, 0.0, False)
    assert p.schedule.name == "cosine" and p.clipping.mode == "none"


def test_suggest_is_pure():
    space = parse_space({"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "optimizer": {"choices": ["adam", "adamw"]}})
    values = {"lr": 0.02, "optimizer": "adamw"}
    assert suggest(FixedTrial(values), space, T) == suggest(FixedTrial(values), space, T)


@pytest.mark.parametrize("space, key, words", [
    ({"lr": {"low": 0.1, "high": 0.01}}, "space.lr.low", "<= high"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "space.lr.low", "> 0"),
    ({"eps": {"low": -1.0, "high": 1.0}}, "space.eps.low", "> 0"),
    ({"weight_decay": {"low": 0.0, "high": 1.0, "log": True}}, "space.weight_decay.low", "log range"),
    ({"schedule": {"choices": []}}, "space.schedule.choices", "non-empty"),
    ({"schedule": {"choices": ["cosine", "warm"]}}, "space.schedule.choices[1]", "one of"),
    ({"optimizer": "sgd"}, "space.optimizer", "one of"),
    ({"clipping": {"low": 0, "high": 1}}, "space.clipping", "categorical"),
    ({"lr": {"low": 1e-3}}, "space.lr.high", "required"),
    ({"lr": {"low": 1e-3, "high": 1e-2, "lg": True}}, "space.lr.lg", "unknown key"),
    ({"momentum": 0.9}, "space.momentum", "unknown key"),
    ({"beta1": 0.9, "one_minus_beta1": {"low": 0.01, "high": 0.1}}, "space.one_minus_beta1", "either"),
    ({"beta1": 1.0}, "space.beta1", "[0, 1)"),
    ({"lr": "fast"}, "space.lr", "number"),
    ({"amsgrad": "yes"}, "space.amsgrad", "true or false"),
    ({}, "space", "at least one"),
])
def test_invalid_space_names_file_and_key(space, key, words):
    with pytest.raises(ConfigError) as err:
        parse_space(space, file="studies/x.yaml")
    message = str(err.value)
    assert message.startswith(f"studies/x.yaml: {key}: "), message
    assert words in message


BASE = {"name": "s", "dataset": "synthetic", "model": "tiny", "epochs": 2, "batch_size": 64,
        "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}


@pytest.mark.parametrize("change, key, words", [
    ({"sampler": "annealing"}, "sampler.name", "valid: cmaes, gp, qmc, random, tpe"),
    ({"pruner": {"name": "wilcoxon"}}, "pruner.name", "valid:"),
    ({"pruner": {"name": "median", "options": {"n_startup": 2}}}, "pruner.options", "n_startup"),
    ({"sampler": {"name": "tpe", "options": {"seed": 3}}}, "sampler.options.seed", "top-level"),
    ({"epochs": 0}, "epochs", ">= 1"),
    ({"epochs": "ten"}, "epochs", "whole number"),
    ({"model": "vgg"}, "model", "valid:"),
    ({"n_trials": 0}, "n_trials", ">= 1"),
    ({"n_trials": None}, "n_trials", "set n_trials, timeout"),
    ({"direction": "minimize"}, "direction", "maximize"),
    ({"heartbeat": {"interval": 10, "grace_period": 5}}, "heartbeat.grace_period", ">= interval"),
    ({"training": {"lr": 1}}, "training.lr", "unknown key"),
    ({"extra": 1}, "extra", "unknown key"),
])
def test_invalid_study_names_file_and_key(change, key, words):
    with pytest.raises(ConfigError) as err:
        parse_study({**BASE, **change}, file="s.yaml")
    assert str(err.value).startswith(f"s.yaml: {key}: "), str(err.value)
    assert words in str(err.value)


def test_study_round_trips_through_stored_dict():
    config = parse_study({**BASE, "sampler": {"name": "qmc", "options": {"qmc_type": "sobol"}}}, file="s.yaml")
    again = parse_study(config.to_dict(), file="stored")
    assert again.fingerprint() == config.fingerprint()
    assert again.sampler.options == {"qmc_type": "sobol"}
    assert "storage" not in config.to_dict()
    assert math.isclose(again.space.knobs["lr"].low, 1e-4)
