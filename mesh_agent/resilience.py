"""Resilience mechanisms: retries and their budget, backoff, outlier detection, rate limiting,
fault injection and mirroring decisions.

Each mechanism is a small synchronous object with an injectable clock and random source, so the
tests can drive it deterministically; the proxy only asks them questions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Final

from mesh_agent import schema
from mesh_agent.balancer import Endpoint

__all__ = [
    "IDEMPOTENT_METHODS",
    "Clock",
    "FaultInjector",
    "OutlierDetector",
    "RetryBudget",
    "RetryRules",
    "TokenBucket",
    "backoff_delay",
    "percent_chance",
]

Clock = Callable[[], float]
Rng = Callable[[], float]

# RFC 9110 section 9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def percent_chance(percent: float, rng: Rng = random.random) -> bool:
    """True in ``percent`` % of calls."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    return rng() * 100.0 < percent


class TokenBucket:
    """Local rate limit: ``rate`` tokens per second, at most ``burst`` stored."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def try_acquire(self) -> bool:
        now = self._clock()
        tokens = self._tokens + (now - self._stamp) * self.rate
        self._stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


class RetryBudget:
    """Retries allowed within a sliding window: ``percent`` % of the requests seen in the last
    ``window_s`` seconds plus ``min_per_second`` * ``window_s`` (Linkerd's retry budget).

    Counts live in one-second buckets so that recording a request is O(1).
    """

    __slots__ = ("_buckets", "_clock", "_floor", "_ratio", "_window")

    def __init__(
        self,
        percent: float = 20.0,
        min_per_second: float = 10.0,
        window_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ratio = percent / 100.0
        self._window = max(1, round(window_s))
        self._floor = min_per_second * self._window
        self._clock = clock
        # second -> [requests, retries]
        self._buckets: dict[int, list[int]] = {}

    def _bucket(self) -> list[int]:
        sec = int(self._clock())
        b = self._buckets.get(sec)
        if b is None:
            horizon = sec - self._window
            for old in [s for s in self._buckets if s <= horizon]:
                del self._buckets[old]
            b = self._buckets[sec] = [0, 0]
        return b

    def record_request(self) -> None:
        self._bucket()[0] += 1

    def try_retry(self) -> bool:
        b = self._bucket()
        requests = retries = 0
        for r, t in self._buckets.values():
            requests += r
            retries += t
        if retries + 1 > self._ratio * requests + self._floor:
            return False
        b[1] += 1
        return True


def backoff_delay(
    retry_number: int, base_s: float = 0.025, cap_s: float = 0.25, rng: Rng = random.random
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^(n-1))] for the n-th
    retry (n ≥ 1). Jitter keeps many clients retrying at once from moving in lockstep."""
    ceiling: float = min(cap_s, base_s * 2.0 ** max(0, retry_number - 1))
    return rng() * ceiling


class RetryRules:
    """What may be retried under one route's retry policy."""

    __slots__ = (
        "attempts",
        "backoff_base_s",
        "backoff_max_s",
        "non_idempotent",
        "on_5xx",
        "on_connect_failure",
        "on_gateway_error",
        "on_reset",
        "per_try_timeout_s",
    )

    def __init__(self, policy: schema.RetryPolicy) -> None:
        self.attempts = policy.attempts
        self.per_try_timeout_s = (
            policy.per_try_timeout_ms / 1000.0 if policy.per_try_timeout_ms else None
        )
        self.on_5xx = "5xx" in policy.retry_on
        self.on_gateway_error = "gateway-error" in policy.retry_on
        self.on_connect_failure = "connect-failure" in policy.retry_on
        self.on_reset = "reset" in policy.retry_on
        self.non_idempotent = policy.retry_non_idempotent
        self.backoff_base_s = policy.backoff_base_ms / 1000.0
        self.backoff_max_s = policy.backoff_max_ms / 1000.0

    def method_allowed(self, method: bytes) -> bool:
        return self.non_idempotent or method in IDEMPOTENT_METHODS

    def status_retryable(self, status: int) -> bool:
        if status >= 500 and self.on_5xx:
            return True
        return self.on_gateway_error and status in (502, 503, 504)

    def failure_retryable(self, kind: str) -> bool:
        """``kind`` is one of connect-failure, reset, timeout."""
        if kind == "connect-failure":
            return self.on_connect_failure or self.on_5xx or self.on_gateway_error
        if kind == "reset":
            return self.on_reset or self.on_5xx
        # A per-try timeout counts as a gateway error, as in Envoy.
        return self.on_5xx or self.on_gateway_error

    def backoff(self, retry_number: int, rng: Rng = random.random) -> float:
        return backoff_delay(retry_number, self.backoff_base_s, self.backoff_max_s, rng)


class OutlierDetector:
    """Consecutive-failure ejection with growing ejection time; never ejects the last available
    endpoint of a group."""

    __slots__ = ("_base", "_clock", "_max", "enabled", "threshold")

    def __init__(self, policy: schema.OutlierDetection, clock: Clock = time.monotonic) -> None:
        self.enabled = policy.enabled
        self.threshold = policy.consecutive_5xx
        self._base = policy.base_ejection_ms / 1000.0
        self._max = policy.max_ejection_ms / 1000.0
        self._clock = clock

    def report(self, endpoint: Endpoint, failed: bool, group: Sequence[Endpoint]) -> bool:
        """Record one outcome; return True when this outcome ejected the endpoint."""
        if not failed:
            endpoint.consecutive_failures = 0
            return False
        endpoint.consecutive_failures += 1
        if not self.enabled or endpoint.consecutive_failures < self.threshold:
            return False
        now = self._clock()
        if endpoint.ejected_until > now:
            return False
        others = sum(1 for e in group if e is not endpoint and e.ejected_until <= now)
        if others == 0:
            # Ejecting the last host would turn degraded service into no service.
            return False
        endpoint.times_ejected += 1
        endpoint.consecutive_failures = 0
        endpoint.ejected_until = now + min(self._max, self._base * endpoint.times_ejected)
        return True


class FaultInjector:
    """A route's fault policy, decided per request."""

    __slots__ = ("_rng", "abort_percent", "abort_status", "delay_percent", "delay_s")

    def __init__(self, policy: schema.FaultPolicy, rng: Rng = random.random) -> None:
        self.delay_percent = policy.delay.percent if policy.delay else 0.0
        self.delay_s = policy.delay.duration_ms / 1000.0 if policy.delay else 0.0
        self.abort_percent = policy.abort.percent if policy.abort else 0.0
        self.abort_status = policy.abort.status if policy.abort else 503
        self._rng = rng

    def delay(self) -> float:
        """Seconds to hold this request (0 for most)."""
        return self.delay_s if percent_chance(self.delay_percent, self._rng) else 0.0

    def abort(self) -> int | None:
        """Status to answer with instead of forwarding, or None."""
        return self.abort_status if percent_chance(self.abort_percent, self._rng) else None
