"""tuner: hyperparameter tuning of Adam with Optuna and PyTorch, on CIFAR-10 or your own model and data.

The Python API (for notebooks), in `tuner.api`: `tuner.tune(config, model=..., data=..., storage=...,
n_trials=...)` runs a sweep in this process and returns the `optuna.Study`; `tuner.export_best(study,
path)` writes the best trial's params file (a population-based study's: its winner's lineage, as
`intervals`). (`tuner.engine.sweep` is the module that drives sweeps.)
`import tuner` stays cheap (no torch, no Optuna): they are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tuner.api import export_best, load_config, tune

__all__ = ["__version__", "export_best", "load_config", "tune"]


def __getattr__(name: str) -> Any:
    if name in ("export_best", "load_config", "tune"):
        from tuner import api  # Optuna and the engine: `import tuner` stays cheap, the API loads on first use

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
