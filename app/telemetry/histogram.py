"""A fixed-bucket latency histogram that merges by addition.

Every rollup row stores counts over the same bounds, so the histogram of any window is the sum of
its buckets' histograms and a percentile over the window comes from that sum, never from averaging
percentiles. The bounds are the agent's (``mesh_agent.telemetry``) so its delta histograms map
one to one; the last count is the overflow bucket (above the largest bound).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

__all__ = ["LATENCY_BOUNDS_MS", "empty", "merge", "observe", "quantile"]

# Upper bounds in milliseconds, inclusive (Prometheus ``le`` semantics).
LATENCY_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BUCKETS = len(LATENCY_BOUNDS_MS) + 1


def empty() -> list[int]:
    return [0] * BUCKETS


def observe(counts: list[int], latency_ms: float, n: int = 1) -> None:
    counts[bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += n


def merge(histograms: Iterable[Sequence[int]]) -> list[int]:
    total = empty()
    for counts in histograms:
        for i, c in enumerate(counts[:BUCKETS]):
            total[i] += c
    return total


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation inside the bucket that holds it, as
    Prometheus' ``histogram_quantile`` does; None when the histogram is empty. Values in the
    overflow bucket are reported as the largest bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1]
            lower = LATENCY_BOUNDS_MS[i - 1] if i > 0 else 0.0
            upper = LATENCY_BOUNDS_MS[i]
            return lower + (upper - lower) * ((rank - seen) / c)
        seen += c
    return LATENCY_BOUNDS_MS[-1]
