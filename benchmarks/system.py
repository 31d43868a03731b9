"""Process-level figures."""

from __future__ import annotations

import resource
import sys

from .core import Context, Measurement, rounded


def _maxrss_mb(who: int) -> float:
    rss = resource.getrusage(who).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def peak_rss_mb(ctx: Context) -> Measurement:
    """Peak resident memory of this benchmark process so far (run it last). DataLoader worker
    processes are children and not included; their peak is in the details."""
    return Measurement(values={"peak_rss_mb": rounded(_maxrss_mb(resource.RUSAGE_SELF))},
                       details={"children_peak_rss_mb": rounded(_maxrss_mb(resource.RUSAGE_CHILDREN))},
                       note="resource.getrusage(RUSAGE_SELF).ru_maxrss at the end of the run")
