"""The Python API, for notebooks and scripts: run a sweep on your own model and arrays, export the best.

    import tuner

    study = tuner.tune("studies/own-model.yaml", model=build, data=(x_train, y_train, x_test, y_test),
                       storage="sqlite:///notebook.db", n_trials=20)
    print(study.best_value)
    tuner.export_best(study, "best.yaml")      # then: tuner train best.yaml

A model callable or arrays passed here live in this process only: the study stores a description
(`in-process:module.name`, `in-process:arrays-<hash>`), the sweep runs here with one worker, and
`tuner worker` processes elsewhere cannot join it (they exit 1 saying why). A model given as a
reference string (`package.module:callable`, `path/to/file.py:callable`) and data given as a spec
string are stored as they are, like in a study file.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from tuner.engine.sweep import run_sweep
from tuner.errors import ConfigError
from tuner.files import atomic_write
from tuner.insight.export import choose_best_of, text_for
from tuner.storage.database import open_storage
from tuner.study.config import StudyConfig, check_study_model, load_study_file, parse_study
from tuner.study.settings import Flags, resolve
from tuner.training.models import register_in_process

__all__ = ["export_best", "load_config", "tune"]

ArrayData = Sequence[Any]  # (x_train, y_train, x_test, y_test[, classes]): numpy arrays or array-likes


def load_config(config: str | Path | Mapping[str, Any] | StudyConfig) -> StudyConfig:
    """A study config from a study file path, a mapping in the study-file format, or a `StudyConfig`.
    Validated like a study file (`ConfigError` naming the key); a model reference is not imported yet."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, Mapping):
        return parse_study(dict(config), file="config")
    return load_study_file(config, check_model=False)


def tune(config: str | Path | Mapping[str, Any] | StudyConfig, *,
          model: Callable[..., Any] | str | None = None,
          model_options: Mapping[str, Any] | None = None,
          data: ArrayData | str | None = None,
          storage: str | None = None,
          n_trials: int | None = None,
          timeout: float | None = None,
          study_name: str | None = None,
          device: str = "auto",
          data_dir: str | Path | None = None) -> optuna.Study:
    """Run (or continue) a sweep in this process and return its `optuna.Study`.

    `config`: a study file path, a dict in the study-file format, or a `StudyConfig`.
    `model`: a callable returning an `nn.Module` (called with `model_options` and, when its signature
    accepts them, `num_classes`, `in_channels` and `image_size`), or a reference string; None keeps the
    config's. `data`: `(x_train, y_train, x_test, y_test)` or with a fifth item, the class names
    (uint8 N×H×W×C images, C = 1 or 3; labels 0..K−1), or a dataset spec; None keeps the config's.
    `storage`: a SQLAlchemy URL (default: env TUNER_STORAGE, with TUNER_STORAGE_PASSWORD_FILE, else
    the config's, else sqlite:///tuner.db). `n_trials`, `timeout`, `study_name` override the config's.
    The other settings come from the environment as for `tuner sweep` (TUNER_ARTIFACT_DIR,
    TUNER_DATA_DIR, TUNER_CHECKPOINT_EVERY, TUNER_DB_RETRY_SECONDS, TUNER_SQLITE_WAL; see
    tuner/study/settings.py). Bad input raises `ConfigError` or `DataError` before anything is written.
    """
    cfg = load_config(config)
    training = cfg.training
    if model is not None:
        if callable(model):
            training = replace(training, model=register_in_process(model), model_options=None)
        elif isinstance(model, str):
            training = replace(training, model=model)
        else:
            raise ConfigError(f"must be a callable or a reference string, got {type(model).__name__}", key="model")
    if model_options is not None:
        training = replace(training, model_options=dict(model_options) or None)
    if data is not None:
        training = replace(training, dataset=_dataset_spec(data))
    # the reference rules of a study file, for what was passed here
    checked = parse_study({**cfg.to_dict(), "model": training.model, "model_options": training.model_options,
                           "dataset": training.dataset}, file="config")
    cfg = replace(cfg, training=replace(checked.training, image_size=training.image_size),
                  name=study_name or cfg.name)
    # the arguments are the flags: the same precedence as `tuner sweep`'s (settings.resolve)
    settings = resolve(Flags(storage=storage, data_dir=data_dir, device=device, timeout=timeout), study=cfg)
    check_study_model(cfg, data_dir=settings.data_dir)
    run_sweep(cfg, settings, n_trials=n_trials, workers=1,
              handle_signals=threading.current_thread() is threading.main_thread())
    return optuna.load_study(study_name=cfg.name, storage=open_storage(settings.storage))


def _dataset_spec(data: ArrayData | str) -> str:
    """A dataset spec for `data`: a spec string as it is, arrays registered under a content-hash name
    (the same arrays give the same name, so a notebook cell run again continues the same study)."""
    from tuner.training.data import IN_PROCESS, is_registered, register_arrays  # torch: only for arrays

    if isinstance(data, (str, Path)):
        return str(data)
    if not isinstance(data, Sequence) or len(data) not in (4, 5):
        raise ConfigError("must be (x_train, y_train, x_test, y_test) or with a fifth item, the class names",
                          key="data")
    arrays = [np.asarray(a) for a in data]
    digest = hashlib.sha1()
    for a in arrays:
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(np.ascontiguousarray(a).tobytes() if a.dtype != object else repr(a.tolist()).encode())
    spec = f"{IN_PROCESS}arrays-{digest.hexdigest()[:12]}"
    if not is_registered(spec):
        register_arrays(arrays[0], arrays[1], arrays[2], arrays[3], arrays[4] if len(arrays) == 5 else None, spec=spec)
    return spec


def export_best(study: optuna.Study, path: str | Path | None = None) -> str:
    """The best trial of `study` as a params file (what `tuner export` writes and `tuner train` reads;
    a model reference is kept in `training.model` and `training.model_options`; a population-based
    study's winner is its lineage, with `intervals:`). With `path`, the file is also written there,
    atomically. Returns the text."""
    trials = study.get_trials(deepcopy=False)
    text = text_for(*choose_best_of(trials, study.user_attrs, study.study_name), trials=trials)
    if path is not None:
        atomic_write(Path(path), text)
    return text
