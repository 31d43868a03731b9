"""Sampler and pruner registries: every name builds, is seeded, and unknown names list the valid ones."""

from __future__ import annotations

import warnings

import optuna
import pytest

from tuner.study.registry import PRUNERS, SAMPLERS, build_pruner, build_sampler


def _sample(sampler: optuna.samplers.BaseSampler, n: int = 4) -> list[float]:
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 1e-4, 1.0, log=True) + t.suggest_float("y", 0, 1), n_trials=n)
    return [t.params["x"] for t in study.trials]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_builds_and_is_seeded(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _sample(build_sampler(name, {}, seed=7))
        b = _sample(build_sampler(name, {}, seed=7))
    assert a == b, f"{name} is not reproducible under a seed"
    assert len(set(a)) > 1


def test_sampler_options_pass_through():
    assert build_sampler("qmc", {"qmc_type": "sobol"}, seed=0)._qmc_type == "sobol"
    assert build_sampler("tpe", {"n_startup_trials": 3}, seed=0)._n_startup_trials == 3


@pytest.mark.parametrize("name, cls", [
    ("median", optuna.pruners.MedianPruner), ("percentile", optuna.pruners.PercentilePruner),
    ("successive_halving", optuna.pruners.SuccessiveHalvingPruner), ("hyperband", optuna.pruners.HyperbandPruner),
    ("patient", optuna.pruners.PatientPruner), ("threshold", optuna.pruners.ThresholdPruner),
    ("none", optuna.pruners.NopPruner),
])
def test_every_pruner_builds(name, cls):
    assert name in PRUNERS
    assert isinstance(build_pruner(name, {}, max_epochs=8), cls)


def test_pruner_options_pass_through_and_unknown_names():
    assert build_pruner("median", {"n_startup_trials": 2}, 8)._n_startup_trials == 2
    default = build_pruner("median", {}, 8)  # the study default: see docs/performance.md
    assert (default._n_startup_trials, default._n_warmup_steps, default._percentile) == (3, 1, 50.0)
    assert build_pruner("hyperband", {}, 8)._max_resource == 8
    with pytest.raises(ValueError, match="valid: hyperband, median"):
        build_pruner("wilcoxon", {}, 8)
