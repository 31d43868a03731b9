"""Study files: what to sweep, on which data, with which budget, sampler and pruner.

    name: quickstart
    direction: maximize            # validation accuracy
    dataset: synthetic
    model: tiny                    # or your own: package.module:callable, path/to/file.py:callable
    model_options: {}              # optional: keyword arguments for a model reference
    epochs: 6                      # the budget, and the pruning resource
    batch_size: 128
    seed: 0
    n_trials: 16                   # counts all trials of the study, across workers
    timeout: null                  # seconds, per sweep run
    sampler: qmc                   # the default; or {name: tpe, options: {...}} (options pass through to Optuna)
    pruner: median                 # the default; {name, options, schedule_aware}
    storage: null                  # optional SQLAlchemy URL
    heartbeat: {interval: 60}      # optional: interval, grace_period, max_retry
    training: {val_fraction: 0.1}  # optional: val_fraction, augment, precision, compile, image_size
    stages:                        # optional: search a few knobs at a time, in order (stages.py)
      - {name: lr, knobs: [lr], trials: 8}
    space:                         # each knob: a fixed value, {low, high, log}, or {choices: [...]}
      lr: {low: 1.0e-4, high: 1.0e-1, log: true}
      one_minus_beta1: {low: 1.0e-3, high: 0.5, log: true}
      ...

Everything is validated when the file is loaded: unknown keys, wrong types, low > high, a log
range with low <= 0, and empty choices raise `ConfigError` naming the file and the key. A model
reference is imported and run on one dummy batch of the dataset's shape (`load_study_file`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.engine.stages import Stage, parse_stages
from tuner.errors import ConfigError
from tuner.study.params import TrainingParams, check_training_model, model_setting, parse_pack, training_params
from tuner.study.population import Population, parse_population
from tuner.study.registry import PRUNERS, SAMPLERS, check_options
from tuner.study.schema import DIRECTIONS, STRATEGIES, allowed
from tuner.study.space import SearchSpace, parse_space
from tuner.study.validate import Checker, read_yaml


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: a registry name and options passed through to its constructor."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pruner(Component):
    """The pruner, and whether it waits for each trial's lr warm-up: with `schedule_aware` a trial is not
    judged at an epoch that ends inside its own warm-up (one-cycle: its rise). Off by default: measured
    on the real subset it kept no winner and cost epochs (docs/study-files.md, "Samplers and pruners"; the
    runs are in benchmarks/RESULTS.md)."""

    schedule_aware: bool = False


@dataclass(frozen=True)
class Heartbeat:
    interval: int = 60  # seconds between a running trial's heartbeats
    grace_period: int | None = None  # seconds without a heartbeat before a trial is stale (2 × interval)
    max_retry: int = 3  # how often a crashed trial is queued again


@dataclass(frozen=True)
class StudyConfig:
    name: str
    space: SearchSpace
    training: TrainingParams  # the budget: dataset, model, epochs, batch size, seed
    direction: str = "maximize"
    sampler: Component = field(default_factory=lambda: Component("qmc"))
    pruner: Pruner = field(default_factory=lambda: Pruner("median"))
    n_trials: int | None = 20
    timeout: float | None = None
    storage: str | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    source: str | None = None  # the file it came from, for messages
    stages: tuple[Stage, ...] = ()  # `stages:` (stages.py); n_trials is their sum
    pack: int | str = "auto"  # `training.pack`: trials a worker trains at once (tuner.packing); auto: 1 on a CPU
    population: Population | None = None  # `strategy: pbt` (population.py); n_trials is size × segments

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as stored in the study. It never holds the storage URL."""
        t = self.training.to_dict()
        return {
            "name": self.name, "direction": self.direction, "dataset": t.pop("dataset"), "model": t.pop("model"),
            **({"model_options": t.pop("model_options")} if "model_options" in t else {}),
            "epochs": t.pop("epochs"), "batch_size": t.pop("batch_size"), "seed": t.pop("seed"),
            "training": {**t, **({"pack": self.pack} if self.pack != "auto" else {})},
            "n_trials": self.n_trials, "timeout": self.timeout,
            "sampler": asdict(self.sampler), "pruner": asdict(self.pruner),
            "heartbeat": asdict(self.heartbeat), "space": self.space.to_dict(),
            **({"stages": [s.to_dict() for s in self.stages]} if self.stages else {}),
            **({"strategy": "pbt", "population": self.population.to_dict()} if self.population else {}),
        }

    def fingerprint(self) -> dict[str, Any]:
        """What may not change when a study is continued: space, stages, direction and budget."""
        d = self.to_dict()
        out = {k: d[k] for k in ("direction", "dataset", "model", "epochs", "batch_size", "training", "space")}
        out["training"] = {k: v for k, v in out["training"].items() if k != "pack"}  # packing changes no result
        return {**out, "model_options": d.get("model_options"), "stages": d.get("stages"),
                "population": d.get("population")}


TOP_KEYS = allowed("")  # every key is described in tuner.study.schema.STUDY_FILE
# The sampler and pruner of a study file that names none, chosen from the full run of
# benchmarks/search.py (docs/search.md): the winners re-trained on new seeds scored best, at every
# budget, with QMC (or random) sampling and the median pruner.
DEFAULT_SAMPLER, DEFAULT_PRUNER = "qmc", "median"
LEARNING_SAMPLERS = ("tpe", "gp", "cmaes")  # samplers that model earlier results


def parse_study(data: Any, *, file: str | None = None) -> StudyConfig:
    """Validate a study mapping (from a file, or as stored in a study)."""
    c = Checker(data, file=file, prefix="", allowed=TOP_KEYS)
    if not c.has("name"):
        raise c.error("name", "is required (the study name)")
    if not c.has("space"):
        raise c.error("space", "is required (the search space: at least one knob)")
    n_trials = c.int("n_trials", 20, ge=1, optional=True)
    timeout = c.float("timeout", None, gt=0.0, optional=True)
    strategy = c.str("strategy", "search", choices=STRATEGIES)
    if strategy == "pbt" and c.raw("stages") is not None:
        raise c.error("stages", "cannot be combined with strategy: pbt (a population explores every knob it "
                                "mutates at once)")
    if n_trials is None and timeout is None and c.raw("stages") is None and strategy != "pbt":
        raise c.error("n_trials", "set n_trials, timeout, or both")
    extra = Checker(c.raw("training"), file=file, prefix="training", allowed=allowed("training"))
    try:  # trials per pack (tuner.packing): how workers run trials, not a trial's setting
        pack = parse_pack(extra.data.pop("pack", "auto"))
    except ValueError as exc:
        raise extra.error("pack", str(exc)) from None

    model, options = model_setting(c, "model", "model_options")
    training = training_params({
        "model": model, **({"model_options": options} if options else {}), "epochs": c.int("epochs", 10, ge=1),
        "batch_size": c.int("batch_size", 512, ge=1), "dataset": c.str("dataset", "cifar10"),
        "seed": c.int("seed", 0, ge=0), **extra.data,
    }, file)
    space = parse_space(c.raw("space"), file=file)
    stages = parse_stages(c.raw("stages"), space, file=file)
    if stages:
        total = sum(s.trials for s in stages)
        n_trials = _fixed_budget(c, n_trials, total, f"the stages add up to {total} trials "
                                                     f"({' + '.join(str(s.trials) for s in stages)})")
    population = None
    pruner = _pruner(c, PRUNERS, DEFAULT_PRUNER)
    if strategy == "pbt":
        if c.has("pruner") and pruner.name != "none":
            raise c.error("pruner", f"is {pruner.name}, but strategy: pbt replaces pruning (weak members copy "
                                    "strong ones): leave pruner out, or set it to none")
        pruner = Pruner("none")
        population = parse_population(c.raw("population"), space, training.epochs, file=file)
        segments = population.segments(training.epochs)
        total = population.size * segments
        n_trials = _fixed_budget(c, n_trials, total, f"a population of {population.size} × {segments} segments "
                                                     f"is {total} trials")
    elif c.has("population"):
        raise c.error("population", "needs strategy: pbt")
    learns = population is not None and population.explore == "sampler"  # PB2's idea: a sampler that models results
    sampler = _component(c, "sampler", "tpe" if learns else DEFAULT_SAMPLER, SAMPLERS)
    if learns and sampler.name not in LEARNING_SAMPLERS:
        raise c.error("sampler", f"is {sampler.name}, which does not learn from results; population.explore: sampler "
                                 f"needs one that does ({', '.join(LEARNING_SAMPLERS)}; tpe when sampler is left out)")
    return StudyConfig(
        name=c.str("name", None),
        direction=c.str("direction", "maximize", choices=DIRECTIONS),
        training=training,
        space=space,
        sampler=sampler,
        pruner=pruner,
        n_trials=n_trials,
        timeout=timeout,
        storage=c.str("storage", None, optional=True),
        heartbeat=_heartbeat(c.raw("heartbeat"), file),
        pack=pack,
        source=file,
        stages=stages,
        population=population,
    )


def _fixed_budget(c: Checker, n_trials: int | None, total: int, why: str) -> int:
    """The budget of a study whose structure fixes it (stages, a population): `total`; an n_trials
    the file gives otherwise is refused, saying `why`."""
    if c.has("n_trials") and n_trials != total:
        given = "null" if n_trials is None else n_trials
        raise c.error("n_trials", f"is {given}, but {why}: leave n_trials out, or set it to {total}")
    return total


def _pruner(c: Checker, registry: dict[str, Any], default: str) -> Pruner:
    raw = c.raw("pruner", default)
    base = _component(c, "pruner", default, registry)
    aware = False
    if isinstance(raw, dict):
        aware = Checker(raw, file=c.file, prefix="pruner", allowed=allowed("pruner")).bool(
            "schedule_aware", False)
    return Pruner(name=base.name, options=base.options, schedule_aware=aware)


def _component(c: Checker, key: str, default: str, registry: dict[str, Any]) -> Component:
    raw = c.raw(key, default)
    if isinstance(raw, str):
        raw = {"name": raw}
    sub = Checker(raw, file=c.file, prefix=key, allowed=allowed(key))
    name = sub.str("name", default, choices=sorted(registry))
    options = sub.raw("options") or {}
    if not isinstance(options, dict):
        raise sub.error("options", f"must be a mapping of constructor arguments, got {options!r}")
    for opt in options:
        if opt in ("seed",):
            raise sub.error(f"options.{opt}", "is set from the study's top-level `seed`")
    problem = check_options(registry[name], options)
    if problem:
        raise sub.error("options", problem)
    return Component(name=name, options=dict(options))


def _heartbeat(raw: Any, file: str | None) -> Heartbeat:
    d = Heartbeat()
    c = Checker(raw, file=file, prefix="heartbeat", allowed=allowed("heartbeat"))
    interval = c.int("interval", d.interval, ge=1)
    grace = c.int("grace_period", None, ge=1, optional=True)
    if grace is not None and grace < interval:
        raise c.error("grace_period", f"must be >= interval ({interval}), got {grace}")
    return Heartbeat(interval=interval, grace_period=grace, max_retry=c.int("max_retry", d.max_retry, ge=0))


def load_study_file(path: str | Path, *, check_model: bool = True) -> StudyConfig:
    """Read and validate a study file. A model reference is imported, built on the CPU and run on one
    dummy batch of the dataset's shape unless `check_model` is false (see `check_study_model`)."""
    data, name = read_yaml(path)
    config = parse_study(data, file=name)
    if check_model:
        check_study_model(config)
    return config


def check_study_model(config: StudyConfig, data_dir: str | Path | None = None) -> None:
    """A model reference, imported and tried on one dummy batch (`ConfigError` naming the file and `model`)."""
    check_training_model(config.training, file=config.source, key="model", data_dir=data_dir)


def config_from_stored(data: dict[str, Any], study_name: str) -> StudyConfig:
    """The config stored in a study (by `tuner sweep`), read back by workers and other commands."""
    if not isinstance(data, dict):
        raise ConfigError("has no tuner config; was it created by `tuner sweep`?", key=f"study {study_name!r}")
    return parse_study(data, file=f"study {study_name!r}")
