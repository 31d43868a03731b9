"""Population-based training (PBT) settings of a study file.

    strategy: pbt
    epochs: 12                    # each member's whole run
    population: {size: 8, interval: 2, quantile: 0.25, perturb: [0.8, 1.25], resample_probability: 0.25}

A member's run is cut into segments of `interval` epochs (the last one shorter when `interval` does
not divide `epochs`); each segment is one trial, so the study has size × segments trials. What
happens at a segment's end is tuner/engine/pbt.py.

Only knobs that can change during training are explored (`mutable`): lr, the betas, eps, weight
decay and the clipping threshold. The optimizer kind, amsgrad, the schedule family and its warm-up,
and the clipping mode stay fixed along a member's lineage (a member that exploits another takes
them with its weights). By default every searched knob that can change is mutable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tuner.study.schema import EXPLORERS, allowed
from tuner.study.space import SearchSpace
from tuner.study.validate import Checker

MUTABLE = ("lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay", "clip_threshold")


@dataclass(frozen=True)
class Population:
    size: int  # members trained side by side
    interval: int  # epochs per segment
    quantile: float = 0.25  # the bottom quantile exploits the top one
    perturb: tuple[float, ...] = (0.8, 1.25)  # explore: multiply a knob by one of these
    resample_probability: float = 0.25  # explore: or draw it afresh from the space, with this probability
    explore: str = "perturb"  # perturb (as above), or sampler: the study's sampler proposes the new values
    mutable: tuple[str, ...] = ()  # the knobs explored (space names)

    def segments(self, epochs: int) -> int:
        """Segments per member."""
        return math.ceil(epochs / self.interval)

    def span(self, generation: int, epochs: int) -> tuple[int, int]:
        """The epochs (1-based, inclusive) segment `generation` trains."""
        return generation * self.interval + 1, min((generation + 1) * self.interval, epochs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["perturb"] = list(self.perturb)
        d["mutable"] = list(self.mutable)
        return d


def parse_population(raw: Any, space: SearchSpace, epochs: int, *, file: str | None) -> Population:
    c = Checker(raw, file=file, prefix="population", allowed=allowed("population"))
    if not c.has("size"):
        raise c.error("size", "is required with strategy: pbt (members trained side by side, at least 2)")
    if not c.has("interval"):
        raise c.error("interval", "is required with strategy: pbt (epochs per segment)")
    size = c.int("size", None)
    if size < 2:
        raise c.error("size", f"must be >= 2 (a population of one has no one to exploit), got {size}")
    interval = c.int("interval", None, ge=1)
    if interval >= epochs:
        raise c.error("interval", f"must be < epochs ({epochs}): members need at least two segments, got {interval}")
    quantile = c.float("quantile", 0.25)
    if not 0.0 < quantile <= 0.5:
        raise c.error("quantile", f"must be in (0, 0.5], got {quantile}")
    perturb = c.raw("perturb", [0.8, 1.25])
    if (not isinstance(perturb, list) or not perturb
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in perturb)):
        raise c.error("perturb", f"must be a list of factors > 0, such as [0.8, 1.25], got {perturb!r}")
    resample = c.float("resample_probability", 0.25)
    if not 0.0 <= resample <= 1.0:
        raise c.error("resample_probability", f"must be in [0, 1], got {resample}")
    explore = c.str("explore", "perturb", choices=EXPLORERS)
    searched = [k for k in space.sampled() if k in MUTABLE]
    mutable = c.raw("mutable", None)
    if mutable is None:
        if not searched:
            raise c.error("mutable", "no knob that can change during training is searched in space: (searched: "
                                     f"{', '.join(space.sampled()) or 'none'}; mutable ones: {', '.join(MUTABLE)})")
        mutable = searched
    if not isinstance(mutable, list) or not mutable or not all(isinstance(k, str) for k in mutable):
        raise c.error("mutable", f"must be a list of knob names, got {mutable!r}")
    for knob in mutable:
        if knob not in MUTABLE:
            raise c.error("mutable", f"{knob} cannot change during training (mutable knobs: {', '.join(MUTABLE)}; "
                                     "the optimizer kind, amsgrad, schedule, warm-up and clipping mode stay fixed "
                                     "per member)")
        if knob not in space.sampled():
            raise c.error("mutable", f"{knob} is not searched in space: (give it a range there)")
    return Population(size=size, interval=interval, quantile=quantile, perturb=tuple(float(f) for f in perturb),
                      resample_probability=resample, explore=explore, mutable=tuple(mutable))


__all__ = ["MUTABLE", "Population", "parse_population"]
