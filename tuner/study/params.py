"""The params file: one Adam trial's optimizer, schedule, clipping and training settings.

This is the format `tuner train` reads and `tuner export` writes:

    optimizer: {name: adam, lr: 0.001, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.0, amsgrad: false}
    schedule:  {name: cosine, warmup_fraction: 0.0}
    clipping:  {mode: none, threshold: null}      # mode: none | norm | value
    training:  {model: fastcnn, epochs: 10, batch_size: 512, dataset: cifar10, seed: 0}

`optimizer` without `name` is accepted verbatim by `torch.optim.Adam` / `AdamW`.

`training.model` is a registry name or a reference to your own model, `package.module:callable` or
`path/to/file.py:callable`, with optional `training.model_options` (keyword arguments). Optional
training keys: `augment` (true, false, or {crop_padding, flip}) and `image_size` (imagefolder data).

An optional `intervals:` list changes the mutable knobs during the run (a population-based study's
winner, replayed): each entry holds the values in force from `from_epoch` epochs on, the first one
`optimizer:`'s values (see `Interval`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tuner.errors import ConfigError
from tuner.study.schema import CLIP_MODES, OPTIMIZERS, PARAMS_FILE, PRECISIONS, SCHEDULES, allowed
from tuner.study.validate import Checker, as_float, as_int, read_yaml
from tuner.training.models import MODELS, SHAPE_KWARGS, check_model, check_reference_syntax, is_reference

DEFAULT_MODEL = "fastcnn"


@dataclass(frozen=True)
class OptimizerParams:
    name: str = "adam"
    lr: float = 1e-3  # peak learning rate, per step
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # L2 penalty for adam, decoupled decay for adamw
    amsgrad: bool = False

    def torch_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `torch.optim.Adam` / `AdamW`."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "amsgrad": self.amsgrad}


@dataclass(frozen=True)
class ScheduleParams:
    name: str = "cosine"
    warmup_fraction: float = 0.0  # linear warmup, as a fraction of all steps
    gamma: float | None = None  # step: factor at each milestone (0.1); exponential: factor per epoch (0.9)
    milestones: tuple[float, ...] | None = None  # step: fractions of training (0.5, 0.75)
    min_lr_fraction: float = 0.0  # cosine/linear: final lr as a fraction of the peak
    pct_start: float = 0.25  # onecycle: rising fraction when warmup_fraction is 0


@dataclass(frozen=True)
class ClippingParams:
    mode: str = "none"
    threshold: float | None = None  # max global L2 norm (norm) or max |g| (value)


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding `crop_padding` (None: 4 at 32 px, scaled with the image size)
    and, with `flip`, random horizontal mirroring. `augment: true` is Augment()."""

    crop_padding: int | None = None
    flip: bool = True

    def padding(self, image_size: int) -> int:
        """The crop padding for images of `image_size` pixels (the smaller side)."""
        if self.crop_padding is not None:
            return self.crop_padding
        return max(1, round(4 * image_size / 32))


@dataclass(frozen=True)
class TrainingParams:
    model: str = DEFAULT_MODEL
    epochs: int = 10
    batch_size: int = 512
    dataset: str = "cifar10"
    seed: int = 0
    val_fraction: float = 0.1  # carved from train, seeded; what sweeps optimise
    augment: bool | Augment = True  # True: random crop (pad 4 at 32 px) + horizontal flip; or Augment(...)
    precision: str = "auto"  # auto: bf16 autocast on CUDA with bf16 support, else fp32
    compile: bool = False  # torch.compile (CUDA only; ignored on CPU)
    model_options: Mapping[str, Any] | None = None  # keyword arguments of a model reference
    image_size: int | None = None  # imagefolder datasets: the side images are resized to (None: 32)

    @property
    def augmentation(self) -> Augment | None:
        """The augmentation settings, or None when augmentation is off."""
        if self.augment is True:
            return Augment()
        return self.augment or None

    def to_dict(self) -> dict[str, Any]:
        """The params-file mapping; keys that keep their defaults and were added later are left out,
        so files and stored studies from before them read the same."""
        d = asdict(self)
        for key in ("model_options", "image_size"):
            if not d[key]:
                d.pop(key)
        if self.model_options:
            d["model_options"] = dict(self.model_options)
        return d


@dataclass(frozen=True)
class Interval:
    """One entry of `intervals:`: the values of the mutable knobs in force once `from_epoch` epochs
    are done. A None value is unchanged from the entry before (the first entry: from `optimizer:`
    and `clipping:`)."""

    from_epoch: int
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    clip_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"from_epoch": int(self.from_epoch)}
        for key in INTERVAL_KNOBS:
            value = getattr(self, key)
            if value is not None:
                d[key] = [float(b) for b in value] if key == "betas" else float(value)
        return d


INTERVAL_KNOBS = ("lr", "betas", "eps", "weight_decay", "clip_threshold")  # what an interval may change


@dataclass(frozen=True)
class TrialParams:
    optimizer: OptimizerParams = field(default_factory=OptimizerParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    clipping: ClippingParams = field(default_factory=ClippingParams)
    training: TrainingParams = field(default_factory=TrainingParams)
    intervals: tuple[Interval, ...] = ()  # per-interval values of the mutable knobs; () = `optimizer:` throughout

    def at_epoch(self, completed: int) -> TrialParams:
        """The params in force once `completed` epochs are done: `optimizer` and `clipping` with the
        values of every interval that has begun, and no intervals. Without intervals, `self`."""
        if not self.intervals:
            return self
        opt, clip = self.optimizer, self.clipping
        for entry in self.intervals:
            if entry.from_epoch > completed:
                break
            opt = replace(opt, **{k: getattr(entry, k) for k in ("lr", "betas", "eps", "weight_decay")
                                  if getattr(entry, k) is not None})
            if entry.clip_threshold is not None:
                clip = replace(clip, threshold=entry.clip_threshold)
        return replace(self, optimizer=opt, clipping=clip, intervals=())

    def with_training(self, **changes: Any) -> TrialParams:
        """A copy with some training settings replaced (CLI overrides); None values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, training=replace(self.training, **changes)) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """The params-file mapping: plain floats, lists and strings; `yaml.safe_dump`-able."""
        opt = asdict(self.optimizer)
        opt["betas"] = [float(b) for b in self.optimizer.betas]
        for key in ("lr", "eps", "weight_decay"):
            opt[key] = float(opt[key])
        sched: dict[str, Any] = {"name": self.schedule.name,
                                 "warmup_fraction": float(self.schedule.warmup_fraction)}
        default = ScheduleParams()
        for key in ("gamma", "milestones", "min_lr_fraction", "pct_start"):
            value = getattr(self.schedule, key)
            if value != getattr(default, key):
                sched[key] = list(value) if isinstance(value, tuple) else value
        clip = {"mode": self.clipping.mode,
                "threshold": None if self.clipping.threshold is None else float(self.clipping.threshold)}
        out: dict[str, Any] = {"optimizer": opt, "schedule": sched, "clipping": clip,
                               "training": self.training.to_dict()}
        if self.intervals:  # only then: params dicts (and checkpoints) without intervals read as before
            out["intervals"] = [entry.to_dict() for entry in self.intervals]
        return out


def parse_params(data: Any, *, file: str | None = None) -> TrialParams:
    """Validate a params mapping. Unknown keys and out-of-range values raise `ConfigError`; the keys
    are those of `tuner.study.schema.PARAMS_FILE` (an exported file's `study:` block is informational)."""
    top = Checker(data, file=file, prefix="", allowed=allowed("", PARAMS_FILE))
    params = TrialParams(
        optimizer=_optimizer(top.raw("optimizer"), file),
        schedule=_schedule(top.raw("schedule"), file),
        clipping=_clipping(top.raw("clipping"), file),
        training=training_params(top.raw("training"), file),
    )
    intervals = _intervals(top.raw("intervals"), params, file)
    return replace(params, intervals=intervals) if intervals else params


def _betas(c: Checker, raw: Any) -> tuple[float, float]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise c.error("betas", f"must be a list of two numbers, got {raw!r}")
    betas = []
    for i, b in enumerate(raw):
        x = as_float(b)
        if x is None or not 0.0 <= x < 1.0:
            raise c.error("betas", f"betas[{i}] must be a number in [0, 1), got {b!r}")
        betas.append(x)
    return betas[0], betas[1]


def _optimizer(data: Any, file: str | None) -> OptimizerParams:
    d = OptimizerParams()
    c = Checker(data, file=file, prefix="optimizer", allowed=allowed("optimizer", PARAMS_FILE))
    return OptimizerParams(
        name=c.str("name", d.name, choices=OPTIMIZERS),
        lr=c.float("lr", d.lr, gt=0.0),
        betas=_betas(c, c.raw("betas", list(d.betas))),
        eps=c.float("eps", d.eps, gt=0.0),
        weight_decay=c.float("weight_decay", d.weight_decay, ge=0.0),
        amsgrad=c.bool("amsgrad", d.amsgrad),
    )


def _schedule(data: Any, file: str | None) -> ScheduleParams:
    d = ScheduleParams()
    c = Checker(data, file=file, prefix="schedule", allowed=allowed("schedule", PARAMS_FILE))
    milestones = c.raw("milestones")
    if milestones is not None:
        if not isinstance(milestones, (list, tuple)) or not milestones:
            raise c.error("milestones", f"must be a non-empty list of fractions, got {milestones!r}")
        read = [as_float(m) for m in milestones]
        values = [v for v in read if v is not None and 0.0 < v < 1.0]
        if len(values) != len(read) or values != sorted(values):
            raise c.error("milestones", f"must be increasing fractions in (0, 1), got {milestones!r}")
        milestones = tuple(values)
    return ScheduleParams(
        name=c.str("name", d.name, choices=SCHEDULES),
        warmup_fraction=c.float("warmup_fraction", d.warmup_fraction, ge=0.0, lt=1.0),
        gamma=c.float("gamma", None, gt=0.0, le=1.0, optional=True),
        milestones=milestones,
        min_lr_fraction=c.float("min_lr_fraction", d.min_lr_fraction, ge=0.0, le=1.0),
        pct_start=c.float("pct_start", d.pct_start, gt=0.0, lt=1.0),
    )


def _clipping(data: Any, file: str | None) -> ClippingParams:
    c = Checker(data, file=file, prefix="clipping", allowed=allowed("clipping", PARAMS_FILE))
    mode = c.str("mode", "none", choices=CLIP_MODES)
    if mode == "none":
        threshold = c.float("threshold", None, gt=0.0, optional=True)
        return ClippingParams(mode="none", threshold=None if threshold is None else threshold)
    if c.raw("threshold") is None:
        raise c.error("threshold", f"is required when mode is {mode!r} (a number > 0)")
    return ClippingParams(mode=mode, threshold=c.float("threshold", None, gt=0.0))


def _intervals(data: Any, params: TrialParams, file: str | None) -> tuple[Interval, ...]:
    """`intervals:`: entries with increasing `from_epoch`, the first at 0 holding `optimizer:`'s (and
    `clipping.threshold`'s) values, each before `training.epochs`; `clip_threshold` only when clipping."""
    if data is None:
        return ()
    if not isinstance(data, list) or not data:
        raise ConfigError("must be a non-empty list of {from_epoch, lr, betas, eps, weight_decay, clip_threshold}",
                          file=file, key="intervals")
    epochs = params.training.epochs
    out: list[Interval] = []
    for i, item in enumerate(data):
        c = Checker(item, file=file, prefix=f"intervals[{i}]", allowed=allowed("intervals[]", PARAMS_FILE))
        if not c.has("from_epoch"):
            raise c.error("from_epoch", "is required (the epochs done before the values apply)")
        start = c.int("from_epoch", None, ge=0)
        if i == 0 and start != 0:
            raise c.error("from_epoch", f"must be 0 in the first entry (the values from the start), got {start}")
        if out and start <= out[-1].from_epoch:
            raise c.error("from_epoch", f"must be greater than intervals[{i - 1}]'s {out[-1].from_epoch}, "
                                        f"got {start}")
        if start >= epochs:
            raise c.error("from_epoch", f"must be less than training.epochs ({epochs}), got {start}")
        if c.has("clip_threshold") and params.clipping.mode == "none":
            raise c.error("clip_threshold", "applies only when clipping.mode is norm or value (it is none)")
        entry = Interval(
            from_epoch=start,
            lr=c.float("lr", None, gt=0.0, optional=True),
            betas=_betas(c, c.raw("betas")) if c.has("betas") else None,
            eps=c.float("eps", None, gt=0.0, optional=True),
            weight_decay=c.float("weight_decay", None, ge=0.0, optional=True),
            clip_threshold=c.float("clip_threshold", None, gt=0.0, optional=True),
        )
        if i == 0:
            _check_first(c, entry, params)
        out.append(entry)
    return tuple(out)


def _check_first(c: Checker, entry: Interval, params: TrialParams) -> None:
    """The first interval holds the values of `optimizer:` and `clipping:` (the file states them once)."""
    opt = params.optimizer
    given = {"lr": (entry.lr, opt.lr, "optimizer.lr"), "betas": (entry.betas, opt.betas, "optimizer.betas"),
             "eps": (entry.eps, opt.eps, "optimizer.eps"),
             "weight_decay": (entry.weight_decay, opt.weight_decay, "optimizer.weight_decay"),
             "clip_threshold": (entry.clip_threshold, params.clipping.threshold, "clipping.threshold")}
    for key, (value, stated, where) in given.items():
        if value is not None and value != stated:
            shown = list(value) if isinstance(value, tuple) else value
            raise c.error(key, f"{shown!r} differs from {where} "
                               f"({list(stated) if isinstance(stated, tuple) else stated!r}): the first entry holds "
                               f"{where.partition('.')[0]}:'s values")


TRAINING_KEYS = allowed("training", PARAMS_FILE)


def training_params(data: Any, file: str | None) -> TrainingParams:
    """Validate a `training:` mapping (a params file's, or a study file's budget and training settings)."""
    d = TrainingParams()
    c = Checker(data, file=file, prefix="training", allowed=TRAINING_KEYS)
    model, options = model_setting(c, "model", "model_options")
    image_size = c.int("image_size", None, ge=4, optional=True)
    return TrainingParams(
        model=model, model_options=options, image_size=image_size,
        epochs=c.int("epochs", d.epochs, ge=1),
        batch_size=c.int("batch_size", d.batch_size, ge=1),
        dataset=c.str("dataset", d.dataset),
        seed=c.int("seed", d.seed, ge=0),
        val_fraction=c.float("val_fraction", d.val_fraction, gt=0.0, lt=1.0),
        augment=_augment(c),
        precision=c.str("precision", d.precision, choices=PRECISIONS),
        compile=c.bool("compile", d.compile),
    )


def model_setting(c: Checker, key: str, options_key: str) -> tuple[str, dict[str, Any] | None]:
    """`model` (a registry name or a reference) and its `model_options`, checked for form only (the
    reference is imported by `check_training_model`, when a file is loaded)."""
    name = c.str(key, DEFAULT_MODEL)
    if is_reference(name):
        problem = check_reference_syntax(name)
        if problem:
            raise c.error(key, problem)
    elif name not in MODELS:
        raise c.error(key, f"unknown value {name!r} (valid: {', '.join(sorted(MODELS))}, or a reference "
                           "package.module:callable or path/to/file.py:callable)")
    options = c.raw(options_key)
    if options is None:
        return name, None
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise c.error(options_key, f"must be a mapping of keyword arguments, got {options!r}")
    if not is_reference(name):
        raise c.error(options_key, f"applies to a model reference (package.module:callable), not to {name!r}")
    for k in options:
        if k in SHAPE_KWARGS:
            raise c.error(f"{options_key}.{k}", "is set from the dataset")
    return name, dict(options) or None


def _augment(c: Checker) -> bool | Augment:
    raw = c.raw("augment", True)
    if isinstance(raw, bool):
        return raw
    if not isinstance(raw, Mapping):
        raise c.error("augment", f"must be true, false or a mapping {{crop_padding, flip}}, got {raw!r}")
    sub = Checker(raw, file=c.file, prefix=c.key("augment"), allowed=allowed("training.augment", PARAMS_FILE))
    aug = Augment(crop_padding=sub.int("crop_padding", None, ge=0, optional=True), flip=sub.bool("flip", True))
    return True if aug == Augment() else aug


def check_training_model(t: TrainingParams, *, file: str | None, key: str = "training.model",
                         data_dir: str | Path | None = None) -> None:
    """Import a model reference, build it on the CPU and run one dummy batch of the dataset's shape
    through it (`ConfigError` naming `file` and `key`, exit 2). Registry names are not checked here."""
    if not is_reference(t.model):
        return
    from tuner.training.data import describe  # torch: only for a reference, which needs it anyway

    shape = describe(t.dataset, data_dir=data_dir, image_size=t.image_size)
    check_model(t.model, t.model_options, num_classes=shape.num_classes, in_channels=shape.channels,
                image_size=shape.image_size, file=file, key=key)


def load_params(path: str | Path, *, check_model: bool = True) -> TrialParams:
    """Read and validate a params file (an exported file's `study:` block is informational). A model
    reference is imported and tried on one dummy batch unless `check_model` is false."""
    data, name = read_yaml(path)
    params = parse_params(data, file=name)
    if check_model:
        check_training_model(params.training, file=name)
    return params


def dump_params(params: TrialParams, extra: Mapping[str, Any] | None = None) -> str:
    """The params file text; `extra` top-level blocks (such as `study:`) come last."""
    data = params.to_dict()
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


PACK_AUTO = "auto"


def parse_pack(value: Any) -> int | str:
    """A `pack` setting (trials trained at once per worker, tuner.packing): a whole number >= 1 or "auto".
    A whole number is read the way other integer keys are (`4`, `4.0`, `"4"`). Raises ValueError
    with the reason."""
    if isinstance(value, str) and value.strip().lower() == PACK_AUTO:
        return PACK_AUTO
    number = as_int(value.strip() if isinstance(value, str) else value)
    if number is None or number < 1:
        raise ValueError(f"must be a whole number >= 1 or auto, got {value!r}")
    return number


def check_override(name: str, value: Any, *, ge: int = 1) -> None:
    """Validate a CLI override such as --epochs."""
    if value is not None and value < ge:
        raise ConfigError(f"must be >= {ge}, got {value}", key=name)
