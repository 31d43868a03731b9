"""The params file: one Adam trial's optimizer, schedule, clipping and training settings.

This is the format `tuner train` reads and `tuner export` writes:

    optimizer: {name: adam, lr: 0.001, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.0, amsgrad: false}
    schedule:  {name: cosine, warmup_fraction: 0.0}
    clipping:  {mode: none, threshold: null}      # mode: none | norm | value
    training:  {model: fastcnn, epochs: 10, batch_size: 512, dataset: cifar10, seed: 0}

`optimizer` without `name` is accepted verbatim by `torch.optim.Adam` / `AdamW`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .validate import Checker, as_float, read_yaml

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "step", "exponential", "cosine", "linear", "onecycle")
CLIP_MODES = ("none", "norm", "value")
PRECISIONS = ("auto", "fp32", "bf16")
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
class TrainingParams:
    model: str = DEFAULT_MODEL
    epochs: int = 10
    batch_size: int = 512
    dataset: str = "cifar10"
    seed: int = 0
    val_fraction: float = 0.1  # carved from train, seeded; what sweeps optimise
    augment: bool = True  # random crop (pad 4) + horizontal flip
    precision: str = "auto"  # auto: bf16 autocast on CUDA with bf16 support, else fp32
    compile: bool = False  # torch.compile (CUDA only; ignored on CPU)


@dataclass(frozen=True)
class TrialParams:
    optimizer: OptimizerParams = field(default_factory=OptimizerParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    clipping: ClippingParams = field(default_factory=ClippingParams)
    training: TrainingParams = field(default_factory=TrainingParams)

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
        return {"optimizer": opt, "schedule": sched, "clipping": clip, "training": asdict(self.training)}


def parse_params(data: Any, *, file: str | None = None, extra_keys: tuple[str, ...] = ("study",)) -> TrialParams:
    """Validate a params mapping. Unknown keys and out-of-range values raise `ConfigError`."""
    top = Checker(data, file=file, prefix="", allowed=("optimizer", "schedule", "clipping", "training", *extra_keys))
    return TrialParams(
        optimizer=_optimizer(top.raw("optimizer"), file),
        schedule=_schedule(top.raw("schedule"), file),
        clipping=_clipping(top.raw("clipping"), file),
        training=_training(top.raw("training"), file),
    )


def _optimizer(data: Any, file: str | None) -> OptimizerParams:
    d = OptimizerParams()
    c = Checker(data, file=file, prefix="optimizer", allowed=("name", "lr", "betas", "eps", "weight_decay", "amsgrad"))
    betas_raw = c.raw("betas", list(d.betas))
    if not isinstance(betas_raw, (list, tuple)) or len(betas_raw) != 2:
        raise c.error("betas", f"must be a list of two numbers, got {betas_raw!r}")
    betas = []
    for i, b in enumerate(betas_raw):
        x = as_float(b)
        if x is None or not 0.0 <= x < 1.0:
            raise c.error("betas", f"betas[{i}] must be a number in [0, 1), got {b!r}")
        betas.append(x)
    return OptimizerParams(
        name=c.str("name", d.name, choices=OPTIMIZERS),
        lr=c.float("lr", d.lr, gt=0.0),
        betas=(betas[0], betas[1]),
        eps=c.float("eps", d.eps, gt=0.0),
        weight_decay=c.float("weight_decay", d.weight_decay, ge=0.0),
        amsgrad=c.bool("amsgrad", d.amsgrad),
    )


def _schedule(data: Any, file: str | None) -> ScheduleParams:
    d = ScheduleParams()
    c = Checker(data, file=file, prefix="schedule",
                allowed=("name", "warmup_fraction", "gamma", "milestones", "min_lr_fraction", "pct_start"))
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
    c = Checker(data, file=file, prefix="clipping", allowed=("mode", "threshold"))
    mode = c.str("mode", "none", choices=CLIP_MODES)
    if mode == "none":
        threshold = c.float("threshold", None, gt=0.0, optional=True)
        return ClippingParams(mode="none", threshold=None if threshold is None else threshold)
    if c.raw("threshold") is None:
        raise c.error("threshold", f"is required when mode is {mode!r} (a number > 0)")
    return ClippingParams(mode=mode, threshold=c.float("threshold", None, gt=0.0))


def _training(data: Any, file: str | None) -> TrainingParams:
    from .models import MODELS  # the registry names are the valid values

    d = TrainingParams()
    c = Checker(data, file=file, prefix="training",
                allowed=("model", "epochs", "batch_size", "dataset", "seed", "val_fraction", "augment",
                         "precision", "compile"))
    return TrainingParams(
        model=c.str("model", d.model, choices=sorted(MODELS)),
        epochs=c.int("epochs", d.epochs, ge=1),
        batch_size=c.int("batch_size", d.batch_size, ge=1),
        dataset=c.str("dataset", d.dataset),
        seed=c.int("seed", d.seed, ge=0),
        val_fraction=c.float("val_fraction", d.val_fraction, gt=0.0, lt=1.0),
        augment=c.bool("augment", d.augment),
        precision=c.str("precision", d.precision, choices=PRECISIONS),
        compile=c.bool("compile", d.compile),
    )


def load_params(path: str | Path) -> TrialParams:
    """Read and validate a params file (an exported file's `study:` block is informational)."""
    data, name = read_yaml(path)
    return parse_params(data, file=name)


def dump_params(params: TrialParams, extra: Mapping[str, Any] | None = None) -> str:
    """The params file text; `extra` top-level blocks (such as `study:`) come last."""
    data = params.to_dict()
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def check_override(name: str, value: Any, *, ge: int = 1) -> None:
    """Validate a CLI override such as --epochs."""
    if value is not None and value < ge:
        raise ConfigError(f"must be >= {ge}, got {value}", key=name)
