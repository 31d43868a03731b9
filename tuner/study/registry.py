"""Samplers and pruners by name. Options from the study file pass through to Optuna's constructors;
samplers are seeded from the study's `seed`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from optuna import pruners, samplers


def _tpe(seed: int | None, **opts: Any) -> samplers.BaseSampler:
    opts.setdefault("multivariate", True)  # Adam's knobs interact (lr with beta1, lr with eps)
    opts.setdefault("n_startup_trials", 10)
    return samplers.TPESampler(seed=seed, **opts)


def _qmc(seed: int | None, **opts: Any) -> samplers.BaseSampler:
    opts.setdefault("qmc_type", "halton")
    opts.setdefault("scramble", True)
    opts.setdefault("warn_independent_sampling", False)  # a conditional knob (clip_threshold) is drawn at random
    return samplers.QMCSampler(seed=seed, **opts)


SAMPLERS: dict[str, Callable[..., samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, **o: samplers.RandomSampler(seed=seed, **o),
    "qmc": _qmc,  # scrambled Halton by default; options: {qmc_type: sobol}
    "cmaes": lambda seed, **o: samplers.CmaEsSampler(seed=seed, **o),
    "gp": lambda seed, **o: samplers.GPSampler(seed=seed, **o),
}


def _patient(max_epochs: int, **opts: Any) -> pruners.BasePruner:
    wrapped = opts.pop("wrapped", "median")
    inner = None if wrapped in (None, "none") else build_pruner(wrapped, {}, max_epochs)
    opts.setdefault("patience", 2)
    return pruners.PatientPruner(inner, **opts)


def _hyperband(max_epochs: int, **opts: Any) -> pruners.BasePruner:
    opts.setdefault("min_resource", 1)
    opts.setdefault("max_resource", max_epochs)
    return pruners.HyperbandPruner(**opts)


def _threshold(max_epochs: int, **opts: Any) -> pruners.BasePruner:
    opts.setdefault("lower", 0.15)  # val accuracy barely above chance (0.1) after warm-up: hopeless
    opts.setdefault("n_warmup_steps", 1)
    return pruners.ThresholdPruner(**opts)


PRUNERS: dict[str, Callable[..., pruners.BasePruner]] = {
    # the default: 3 finished trials before the first prune (Optuna's default is 5), then stop a
    # trial whose epoch-k accuracy is below the median of the finished trials' epoch-k accuracy;
    # see docs/performance.md for what it saves and what it costs
    "median": lambda e, **o: pruners.MedianPruner(**{"n_startup_trials": 3, "n_warmup_steps": 1, **o}),
    "percentile": lambda e, **o: pruners.PercentilePruner(**{"percentile": 25.0, "n_startup_trials": 5,
                                                           "n_warmup_steps": 1, **o}),
    "successive_halving": lambda e, **o: pruners.SuccessiveHalvingPruner(**{"min_resource": 1, **o}),
    "hyperband": _hyperband,
    "patient": _patient,
    "threshold": _threshold,
    "none": lambda e, **o: pruners.NopPruner(**o),
}


def build_sampler(name: str, options: dict[str, Any], seed: int | None) -> samplers.BaseSampler:
    return SAMPLERS[name](seed, **dict(options))


def build_pruner(name: str, options: dict[str, Any], max_epochs: int) -> pruners.BasePruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r} (valid: {', '.join(sorted(PRUNERS))})")
    return PRUNERS[name](max_epochs, **dict(options))


def check_options(builder: Callable[..., Any], options: dict[str, Any]) -> str | None:
    """Build once with these options; return the problem as one line, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            builder(0 if builder in SAMPLERS.values() else 10, **dict(options))
    except (TypeError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None
