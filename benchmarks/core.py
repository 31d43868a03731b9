"""What every benchmark figure shares: the run context, the result type, targets and timing helpers.

A figure is one function `fn(ctx) -> Measurement` plus one `Figure` entry in `run.py`'s registry.
`Measurement.values` become top-level keys of the final JSON line (one figure may report several
related keys, e.g. a ratio and the two accuracies behind it); `details` holds the raw numbers
behind them (per-round samples, settings) under `details[figure name]`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# The real CIFAR-10 subset does not ship with the project: it sits beside the clone in the
# development checkout (../shared), or wherever TUNER_SUBSET points.
SUBSET = Path(os.environ.get("TUNER_SUBSET")
              or ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar10-subset.npz")

Value = float | int | str | bool | None


@dataclass(frozen=True)
class Target:
    """An acceptable range for one value; `None` bounds are open. `text` is what the table shows."""

    lo: float | None = None
    hi: float | None = None
    text: str = ""

    def met(self, value: Value) -> bool | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)


@dataclass
class Measurement:
    """What a figure function returns."""

    values: dict[str, Value]
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # one line for the table (method, caveats)
    skipped: str | None = None  # reason, when the figure could not be measured here (values are then None)


@dataclass(frozen=True)
class Figure:
    """One registry entry: `name` is what `--only` selects; `keys` are the JSON keys it reports
    (in table order); `units` and `targets` are per key and optional."""

    name: str
    fn: Callable[[Context], Measurement]
    keys: tuple[str, ...]
    units: Mapping[str, str] = field(default_factory=dict)
    targets: Mapping[str, Target] = field(default_factory=dict)
    always: bool = False  # reported even when --only leaves it out (free to measure, e.g. peak RSS)


@dataclass
class Context:
    """The run's settings and shared, lazily built state (the dataset is staged once per run)."""

    device: torch.device
    dataset: str
    quick: bool
    data_note: str = ""
    _data: Any = None
    _warm: bool = False

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick-mode or the full-mode value of a knob (rounds, steps, epochs)."""
        return quick if self.quick else full

    @property
    def data(self):  # -> tuner.training.data.DeviceData
        if self._data is None:
            from tuner.training.data import load_dataset

            log(f"loading dataset {self.dataset} onto {self.device}")
            self._data = load_dataset(self.dataset, self.device)
        return self._data

    def warm_up(self) -> None:
        """One untimed engine epoch per run (both batch shapes, validation included), so the first
        timed round does not pay one-off costs: kernel/primitive selection, allocator growth."""
        if not self._warm:
            from tuner.training.train import train

            log("warm-up: one untimed train() epoch")
            train(self.params(epochs=1), self.data)
            self._warm = True

    def params(self, **training: Any):  # -> tuner.study.params.TrialParams
        """The default trial params (what `tuner train` uses without overrides) on this run's dataset."""
        from tuner.study.params import TrialParams

        return TrialParams().with_training(dataset=self.dataset, **training)


def log(message: str) -> None:
    """Progress goes to stderr, so stdout is only the table and the final JSON line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of fn, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(runs: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each run once per round, in the same order every round (A B A B ...), `warmup` rounds
    discarded. Each run returns the seconds it measured itself. Interleaving spreads slow drift
    and bursts of load from other processes over all runs instead of biasing one of them."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(warmup + rounds):
        for name, run in runs.items():
            seconds = run()
            if r >= warmup:
                samples[name].append(seconds)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Relative spread (max - min) / median of the samples: how noisy the machine was."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def trimmed(data, batch_size: int):
    """`data` with its training split cut to a whole number of batches (every step full-size)."""
    n = len(data.y_train)
    m = (n // batch_size) * batch_size
    if m == 0 or m == n:
        return data
    return replace(data, x_train=data.x_train[:m], y_train=data.y_train[:m])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


class OtherLoad:
    """How much CPU other processes used while a block ran, in cores (0 = the machine was ours
    alone; 2 on a 2-core machine = they wanted all of it). From /proc/stat (Linux) less this
    process's own CPU time and its children's (DataLoader workers); None where unavailable."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        wall, busy, own = (e - s for e, s in zip(end, self._start))
        self.cores = round(max(0.0, busy - own) / wall, 2)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(v) for v in fields]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks[:7]) - ticks[3] - ticks[4]) / hz  # user nice system irq softirq (guest is in user)
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, own


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
