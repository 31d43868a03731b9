"""The search space over Adam's knobs, and `suggest(trial, space, training) -> TrialParams`.

Each knob is a fixed value, a range `{low, high, log}` (floats; `step` optional), or
`{choices: [...]}`. `one_minus_beta1` / `one_minus_beta2` sample 1−β (on a log scale, that is
how β near 1 should be searched) and are written back as `betas`. `clip_threshold` is sampled
only when the clipping mode is not `none`. `suggest` is a pure function of the trial: test it
with `optuna.trial.FixedTrial`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuner.errors import ConfigError
from tuner.study.params import (
    CLIP_MODES,
    OPTIMIZERS,
    SCHEDULES,
    ClippingParams,
    OptimizerParams,
    ScheduleParams,
    TrainingParams,
    TrialParams,
)
from tuner.study.schema import KNOB, allowed
from tuner.study.validate import Checker, as_float

_RANGE_KEYS = tuple(k for k in allowed(f"space.{KNOB}") if k != "choices")  # low, high, log, step
_CHOICES_KEYS = ("choices",)


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choices:
    choices: tuple[Any, ...]


Knob = Fixed | Range | Choices


@dataclass(frozen=True)
class KnobSpec:
    kind: str  # "float" or "categorical"
    valid: Callable[[Any], bool]
    domain: str  # for messages
    default: Any


def _in(values: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in values


KNOBS: dict[str, KnobSpec] = {
    "optimizer": KnobSpec("categorical", _in(OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}", "adam"),
    "lr": KnobSpec("float", lambda v: v > 0, "> 0", 1e-3),
    "beta1": KnobSpec("float", lambda v: 0 <= v < 1, "in [0, 1)", 0.9),
    "beta2": KnobSpec("float", lambda v: 0 <= v < 1, "in [0, 1)", 0.999),
    "one_minus_beta1": KnobSpec("float", lambda v: 0 < v <= 1, "in (0, 1]", None),
    "one_minus_beta2": KnobSpec("float", lambda v: 0 < v <= 1, "in (0, 1]", None),
    "eps": KnobSpec("float", lambda v: v > 0, "> 0", 1e-8),
    "weight_decay": KnobSpec("float", lambda v: v >= 0, ">= 0", 0.0),
    "amsgrad": KnobSpec("categorical", lambda v: isinstance(v, bool), "true or false", False),
    "schedule": KnobSpec("categorical", _in(SCHEDULES), f"one of {', '.join(SCHEDULES)}", "cosine"),
    "warmup_fraction": KnobSpec("float", lambda v: 0 <= v < 1, "in [0, 1)", 0.0),
    "clipping": KnobSpec("categorical", _in(CLIP_MODES), f"one of {', '.join(CLIP_MODES)}", "none"),
    "clip_threshold": KnobSpec("float", lambda v: v > 0, "> 0", 1.0),
}


@dataclass(frozen=True)
class SearchSpace:
    knobs: dict[str, Knob]  # only the knobs the file names; the rest take KNOBS defaults

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, knob in self.knobs.items():
            if isinstance(knob, Fixed):
                out[name] = knob.value
            elif isinstance(knob, Range):
                out[name] = {"low": knob.low, "high": knob.high, "log": knob.log}
                if knob.step is not None:
                    out[name]["step"] = knob.step
            else:
                out[name] = {"choices": list(knob.choices)}
        return out

    def sampled(self) -> list[str]:
        """The knobs that are searched (not fixed)."""
        return [n for n, k in self.knobs.items() if not isinstance(k, Fixed)]


def parse_space(data: Any, *, file: str | None = None) -> SearchSpace:
    c = Checker(data, file=file, prefix="space", allowed=allowed("space"))  # the schema's knobs: KNOBS
    if not c.data:
        raise ConfigError("must name at least one knob", file=file, key="space")
    for a, b in (("beta1", "one_minus_beta1"), ("beta2", "one_minus_beta2")):
        if c.has(a) and c.has(b):
            raise c.error(b, f"give either {a} or {b}, not both")
    knobs = {name: _knob(c, name, raw) for name, raw in c.data.items()}
    return SearchSpace(knobs)


def _knob(c: Checker, name: str, raw: Any) -> Knob:
    spec = KNOBS[name]
    key = c.key(name)

    def check(value: Any, where: str) -> Any:
        if spec.kind == "float":
            number = as_float(value)
            if number is None:
                raise ConfigError(f"must be a number, got {value!r}", file=c.file, key=where)
            value = number
        if not spec.valid(value):
            raise ConfigError(f"must be {spec.domain}, got {value!r}", file=c.file, key=where)
        return value

    if not isinstance(raw, dict):
        return Fixed(check(raw, key))
    if "choices" in raw:
        sub = Checker(raw, file=c.file, prefix=key, allowed=_CHOICES_KEYS)
        choices = sub.raw("choices")
        if not isinstance(choices, list) or not choices:
            raise sub.error("choices", "must be a non-empty list")
        return Choices(tuple(check(v, f"{key}.choices[{i}]") for i, v in enumerate(choices)))
    sub = Checker(raw, file=c.file, prefix=key, allowed=_RANGE_KEYS)
    if spec.kind != "float":
        raise ConfigError("is categorical: give a fixed value or {choices: [...]}, not a range",
                          file=c.file, key=key)
    for bound in ("low", "high"):
        if not sub.has(bound):
            raise sub.error(bound, "is required for a range ({low, high, log})")
    low = check(sub.raw("low"), f"{key}.low")
    high = check(sub.raw("high"), f"{key}.high")
    log = sub.bool("log", False)
    step = sub.float("step", None, gt=0.0, optional=True)
    if low > high:
        raise sub.error("low", f"must be <= high ({high}), got {low}")
    if log and low <= 0:
        raise sub.error("low", f"must be > 0 for a log range, got {low}")
    if log and step is not None:
        raise sub.error("step", "cannot be combined with log: true")
    return Range(low=low, high=high, log=log, step=step)


def _value(trial: Any, name: str, space: SearchSpace) -> Any:
    knob = space.knobs.get(name)
    if knob is None:
        return KNOBS[name].default
    if isinstance(knob, Fixed):
        return knob.value
    if isinstance(knob, Choices):
        return trial.suggest_categorical(name, list(knob.choices))
    if knob.low == knob.high:
        return knob.low
    return trial.suggest_float(name, knob.low, knob.high, log=knob.log, step=knob.step)


def suggest(trial: Any, space: SearchSpace, training: TrainingParams) -> TrialParams:
    """Sample one trial's params. Pure: the same trial values give the same params."""
    v = lambda name: _value(trial, name, space)  # noqa: E731

    def beta(i: int) -> float:
        if f"one_minus_beta{i}" in space.knobs:
            return 1.0 - float(v(f"one_minus_beta{i}"))
        return float(v(f"beta{i}"))

    mode = v("clipping")
    return TrialParams(
        optimizer=OptimizerParams(name=v("optimizer"), lr=float(v("lr")), betas=(beta(1), beta(2)),
                                  eps=float(v("eps")), weight_decay=float(v("weight_decay")),
                                  amsgrad=bool(v("amsgrad"))),
        schedule=ScheduleParams(name=v("schedule"), warmup_fraction=float(v("warmup_fraction"))),
        clipping=ClippingParams(mode=mode, threshold=None if mode == "none" else float(v("clip_threshold"))),
        training=training,
    )
