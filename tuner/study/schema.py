"""The schema of study files and params files: every key, its type, default, description and valid values.

This table is the single source of truth for which keys a file may have. The validators
(`tuner.study.config`, `tuner.study.params`, `tuner.study.space`) take their allowed-key lists from
`allowed(...)`, and the documentation's study-file and params-file references are generated from
`STUDY_FILE` and `PARAMS_FILE`. A key cannot be added without a description: `Key` refuses an
empty one, and `tests/test_docs.py` checks that every key a validator accepts is described here.

Paths are dotted: `training.augment.flip`. `space.<knob>` stands for any knob name, and
`stages[]` for any item of the `stages:` list.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "step", "exponential", "cosine", "linear", "onecycle")
CLIP_MODES = ("none", "norm", "value")
PRECISIONS = ("auto", "fp32", "bf16")
DIRECTIONS = ("maximize",)  # the objective is validation accuracy
SAMPLER_NAMES = ("tpe", "random", "qmc", "cmaes", "gp")  # tuner.study.registry.SAMPLERS (a test compares)
STRATEGIES = ("search", "pbt")
EXPLORERS = ("perturb", "sampler")
PRUNER_NAMES = ("median", "percentile", "successive_halving", "hyperband", "patient", "threshold", "none")

KNOB = "<knob>"  # the path segment that stands for any knob of `space:`


@dataclass(frozen=True)
class Key:
    """One key of a file: dotted `path`, `type`, `default` (as written in YAML), a one-line
    `description` and, where the values are restricted, `values`."""

    path: str
    type: str
    default: str
    description: str
    values: str = ""

    def __post_init__(self) -> None:
        if not self.description.strip() or "\n" in self.description:
            raise ValueError(f"schema key {self.path!r} needs a one-line description")
        if not self.type.strip():
            raise ValueError(f"schema key {self.path!r} needs a type")

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values)


# The augment mapping and the training keys shared by both files.
_AUGMENT = (
    ("augment.crop_padding", "int >= 0", "null",
     "zero padding of the random crop; null scales it with the image size (4 at 32 px, at least 1)", ""),
    ("augment.flip", "bool", "true", "random horizontal flip", ""),
)
_TRAINING_SETTINGS = {
    "val_fraction": ("float", "0.1", "fraction of the training set held out (seeded) for validation; what sweeps "
                     "optimise", "0 < x < 1"),
    "augment": ("bool or mapping", "true", "augmentation: true (crop and flip), false, or {crop_padding, flip}", ""),
    "precision": ("str", "auto", "numeric precision; auto is bf16 autocast on a CUDA GPU with native bf16, else fp32",
                  _one_of(PRECISIONS)),
    "compile": ("bool", "false", "torch.compile the model once per worker process, with static shapes (CUDA only)",
                ""),
    "image_size": ("int >= 4", "null", "side that imagefolder images are resized to (null: 32); other datasets keep "
                   "their size", ""),
}


def _training(prefix: str, names: tuple[str, ...]) -> tuple[Key, ...]:
    keys = [Key(f"{prefix}.{n}", *_TRAINING_SETTINGS[n]) for n in names]
    if "augment" in names:
        keys += [Key(f"{prefix}.{p}", t, d, desc, v) for p, t, d, desc, v in _AUGMENT]
    return tuple(keys)


_MODEL = ("str", "fastcnn", "a built-in model (fastcnn, fastcnn-wide, resnet18, tiny) or a reference "
          "package.module:callable or path/to/file.py:callable", "")
_MODEL_OPTIONS = ("mapping", "{}", "keyword arguments for a model reference (not num_classes, in_channels, image_size)",
                  "")
_DATASET = ("str", "cifar10", "dataset spec: cifar10, cifar100, path/to/file.npz, imagefolder:PATH, synthetic[:N]", "")

_KNOBS = (
    ("optimizer", "adam", "adam, or adamw (decoupled weight decay)", _one_of(OPTIMIZERS)),
    ("lr", "0.001", "peak learning rate", "> 0"),
    ("beta1", "0.9", "Adam's β1 (give beta1 or one_minus_beta1, not both)", "0 <= x < 1"),
    ("beta2", "0.999", "Adam's β2 (give beta2 or one_minus_beta2, not both)", "0 <= x < 1"),
    ("one_minus_beta1", "0.1", "1 − β1, searched on a log scale and written back as betas", "0 < x <= 1"),
    ("one_minus_beta2", "0.001", "1 − β2, searched on a log scale and written back as betas", "0 < x <= 1"),
    ("eps", "1.0e-8", "Adam's epsilon", "> 0"),
    ("weight_decay", "0.0", "L2 penalty (adam) or decoupled weight decay (adamw)", ">= 0"),
    ("amsgrad", "false", "the AMSGrad variant", "true, false"),
    ("schedule", "cosine", "learning-rate schedule, stepped per optimizer step", _one_of(SCHEDULES)),
    ("warmup_fraction", "0.0", "linear warm-up over this fraction of all steps", "0 <= x < 1"),
    ("clipping", "none", "gradient clipping: by global L2 norm, by value, or none", _one_of(CLIP_MODES)),
    ("clip_threshold", "1.0", "clipping threshold; sampled only when clipping is not none", "> 0"),
)

STUDY_FILE: tuple[Key, ...] = (
    Key("name", "str", "(required)", "the study name; a second sweep with the same name continues the study"),
    Key("direction", "str", "maximize", "optimisation direction of the objective (validation accuracy)",
        _one_of(DIRECTIONS)),
    Key("dataset", *_DATASET),
    Key("model", *_MODEL),
    Key("model_options", *_MODEL_OPTIONS),
    Key("epochs", "int >= 1", "10", "epochs per trial: the budget, and the pruning resource"),
    Key("batch_size", "int >= 1", "512", "training batch size"),
    Key("seed", "int >= 0", "0", "training seed of every trial; samplers are seeded from it (plus the worker index)"),
    Key("n_trials", "int >= 1 or null", "20", "trials of the whole study, across workers (with stages: their sum)"),
    Key("timeout", "float > 0 or null", "null", "seconds a sweep runs before it stops creating trials"),
    Key("sampler", "str or mapping", "qmc", "the sampler: a name, or {name, options}"),
    Key("pruner", "str or mapping", "median", "the pruner: a name, or {name, options, schedule_aware}"),
    Key("storage", "str or null", "null", "SQLAlchemy URL of the study database (after --storage and TUNER_STORAGE)"),
    Key("heartbeat", "mapping", "{interval: 60}", "heartbeat settings, for detecting crashed workers"),
    Key("training", "mapping", "{}", "further training settings"),
    Key("space", "mapping", "(required)", "the search space: each knob a fixed value, a range or choices"),
    Key("stages", "list or null", "null", "search a few knobs at a time, in order: a list of {name, knobs, trials}"),
    Key("strategy", "str", "search", "search: trials sampled and pruned; pbt: population-based training (a population "
        "whose weak members copy strong ones and explore, every interval epochs)", _one_of(STRATEGIES)),
    Key("population", "mapping", "(required with pbt)", "population-based training: {size, interval, quantile, "
        "perturb, resample_probability, explore, mutable}"),
    Key("sampler.name", "str", "qmc", "sampler name", _one_of(SAMPLER_NAMES)),
    Key("sampler.options", "mapping", "{}", "keyword arguments for the Optuna sampler's constructor (not seed)"),
    Key("pruner.name", "str", "median", "pruner name", _one_of(PRUNER_NAMES)),
    Key("pruner.options", "mapping", "{}", "keyword arguments for the Optuna pruner's constructor"),
    Key("pruner.schedule_aware", "bool", "false", "do not judge a trial at an epoch that ends inside its lr warm-up"),
    Key("heartbeat.interval", "int >= 1", "60", "seconds between a running trial's heartbeats"),
    Key("heartbeat.grace_period", "int >= interval or null", "null",
        "seconds without a heartbeat before a trial is stale (null: 2 × interval)"),
    Key("heartbeat.max_retry", "int >= 0", "3", "how often a crashed trial is queued again"),
    *_training("training", ("val_fraction", "augment", "precision", "compile", "image_size")),
    Key("training.pack", "int >= 1 or auto", "auto", "trials a worker trains at once as one fused model "
        "(auto: 1 on a CPU, sized on CUDA)"),
    *(Key(f"space.{name}", "value, range or choices", default, desc, values)
      for name, default, desc, values in _KNOBS),
    Key(f"space.{KNOB}.low", "float", "(required)", "lower end of a range"),
    Key(f"space.{KNOB}.high", "float", "(required)", "upper end of a range"),
    Key(f"space.{KNOB}.log", "bool", "false", "sample the range on a log scale (low must be > 0)"),
    Key(f"space.{KNOB}.step", "float or null", "null", "discretisation step of a range"),
    Key(f"space.{KNOB}.choices", "list", "(required)", "the values of a categorical knob (not with low/high)"),
    Key("population.size", "int >= 2", "(required)", "members trained side by side"),
    Key("population.interval", "int >= 1", "(required)", "epochs per segment (one trial); less than epochs"),
    Key("population.quantile", "float", "0.25", "a member in the bottom quantile of its generation copies one in the "
        "top quantile", "0 < x <= 0.5"),
    Key("population.perturb", "list of float", "[0.8, 1.25]", "explore: multiply each mutable knob by one of these "
        "(clipped to its range)", "each > 0"),
    Key("population.resample_probability", "float", "0.25", "explore: draw a knob afresh from its range instead, "
        "with this probability", "0 <= x <= 1"),
    Key("population.explore", "str", "perturb", "perturb (as above), or sampler: the study's sampler proposes the "
        "new values, conditioned on every finished segment", _one_of(EXPLORERS)),
    Key("population.mutable", "list of str", "(every searched one)", "knobs that may change during training",
        "lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, clip_threshold"),
    Key("stages[].name", "str", "stageN", "stage name, unique in the study"),
    Key("stages[].knobs", "list of str", "(required)", "knobs the stage searches, as space: names them"),
    Key("stages[].trials", "int >= 1", "(required)", "trials the stage runs"),
)

PARAMS_FILE: tuple[Key, ...] = (
    Key("optimizer", "mapping", "{}", "the optimizer; without name, accepted verbatim by torch.optim.Adam/AdamW"),
    Key("schedule", "mapping", "{}", "the learning-rate schedule"),
    Key("clipping", "mapping", "{}", "gradient clipping"),
    Key("training", "mapping", "{}", "model, data and budget of the run"),
    Key("study", "mapping", "(absent)", "written by tuner export: where the params came from (informational)"),
    Key("intervals", "list or null", "null", "values of the mutable knobs from given epochs on (a population-based "
        "study's winner, as tuner export writes it); the first entry holds optimizer:'s values"),
    Key("optimizer.name", "str", "adam", "adam, or adamw (decoupled weight decay)", _one_of(OPTIMIZERS)),
    Key("optimizer.lr", "float", "0.001", "peak learning rate", "> 0"),
    Key("optimizer.betas", "[float, float]", "[0.9, 0.999]", "Adam's β1 and β2", "each 0 <= x < 1"),
    Key("optimizer.eps", "float", "1.0e-08", "Adam's epsilon", "> 0"),
    Key("optimizer.weight_decay", "float", "0.0", "L2 penalty (adam) or decoupled weight decay (adamw)", ">= 0"),
    Key("optimizer.amsgrad", "bool", "false", "the AMSGrad variant"),
    Key("schedule.name", "str", "cosine", "learning-rate schedule, stepped per optimizer step", _one_of(SCHEDULES)),
    Key("schedule.warmup_fraction", "float", "0.0", "linear warm-up over this fraction of all steps", "0 <= x < 1"),
    Key("schedule.gamma", "float or null", "null", "step: factor at each milestone (0.1); exponential: factor per "
        "epoch (0.9)", "0 < x <= 1"),
    Key("schedule.milestones", "list of float", "[0.5, 0.75]", "step: milestones as fractions of training",
        "increasing, each 0 < x < 1"),
    Key("schedule.min_lr_fraction", "float", "0.0", "cosine/linear: final lr as a fraction of the peak", "0 <= x <= 1"),
    Key("schedule.pct_start", "float", "0.25", "onecycle: rising fraction when warmup_fraction is 0", "0 < x < 1"),
    Key("clipping.mode", "str", "none", "none, by global L2 norm, or by value", _one_of(CLIP_MODES)),
    Key("clipping.threshold", "float or null", "null", "max global L2 norm (norm) or max |g| (value); required "
        "when mode is not none", "> 0"),
    Key("training.model", *_MODEL),
    Key("training.model_options", *_MODEL_OPTIONS),
    Key("training.epochs", "int >= 1", "10", "epochs to train"),
    Key("training.batch_size", "int >= 1", "512", "training batch size"),
    Key("training.dataset", *_DATASET),
    Key("training.seed", "int >= 0", "0", "seed of initialisation, data order and augmentation"),
    *_training("training", ("val_fraction", "augment", "precision", "compile", "image_size")),
    Key("intervals[].from_epoch", "int >= 0", "(required)", "epochs done before the entry's values apply: 0 in the "
        "first entry, then increasing", "< training.epochs"),
    Key("intervals[].lr", "float", "(unchanged)", "peak learning rate from then on (the schedule's multiplier still "
        "runs over all epochs)", "> 0"),
    Key("intervals[].betas", "[float, float]", "(unchanged)", "Adam's β1 and β2 from then on", "each 0 <= x < 1"),
    Key("intervals[].eps", "float", "(unchanged)", "Adam's epsilon from then on", "> 0"),
    Key("intervals[].weight_decay", "float", "(unchanged)", "weight decay from then on", ">= 0"),
    Key("intervals[].clip_threshold", "float", "(unchanged)", "clipping threshold from then on; only when "
        "clipping.mode is not none", "> 0"),
)

TABLES = {"study": STUDY_FILE, "params": PARAMS_FILE}


def allowed(parent: str, table: tuple[Key, ...] = STUDY_FILE) -> tuple[str, ...]:
    """The names of the keys directly under `parent` ("" for the top level), in table order.
    A knob's range/choices mapping is `space.<knob>`."""
    names = tuple(k.name for k in table if k.parent == parent)
    if not names:
        raise KeyError(f"the schema has no keys under {parent!r}")
    return names


def find(path: str, table: tuple[Key, ...] = STUDY_FILE) -> Key:
    """The key at `path`."""
    for k in table:
        if k.path == path:
            return k
    raise KeyError(path)
