"""Retry rules and budget, backoff, outlier detection, token bucket, faults: all on fake clocks."""

from __future__ import annotations

import random

import pytest

from mesh_agent import protocol
from mesh_agent.balancer import Endpoint
from mesh_agent.resilience import (
    FaultInjector,
    OutlierDetector,
    RetryBudget,
    RetryRules,
    TokenBucket,
    backoff_delay,
    percent_chance,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- token bucket


def test_token_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.4)  # 0.8 tokens: still not one
    assert not bucket.try_acquire()
    clock.advance(0.1)  # 1.0 token
    assert bucket.try_acquire()
    assert not bucket.try_acquire()


def test_token_bucket_never_stores_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=2, clock=clock)
    clock.advance(3600)
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]


# -- retry budget


def test_retry_budget_floor_allows_min_retries_per_second_times_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(percent=20, min_per_second=1, window_s=10, clock=clock)
    allowed = sum(budget.try_retry() for _ in range(50))
    assert allowed == 10  # no requests at all: only the floor, 1/s over 10 s


def test_retry_budget_is_twenty_percent_of_requests_plus_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(percent=20, min_per_second=0, window_s=10, clock=clock)
    for _ in range(1000):
        budget.record_request()
    allowed = sum(budget.try_retry() for _ in range(1000))
    assert allowed == 200


def test_retry_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(percent=50, min_per_second=0, window_s=2, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.advance(5)  # the old requests and retries fell out of the window
    assert not budget.try_retry()
    for _ in range(4):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(10)) == 2


# -- backoff


def test_backoff_is_jittered_exponential_with_cap() -> None:
    rng = random.Random(7)
    for n, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)]:
        samples = [backoff_delay(n, 0.025, 0.25, rng.random) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9  # jitter really spans the range
        assert min(samples) < ceiling * 0.1


# -- retry rules


def test_retry_rules_follow_policy() -> None:
    rules = RetryRules(protocol.RetryPolicy(retry_on=("5xx",)))
    assert rules.method_allowed(b"GET") and rules.method_allowed(b"PUT")
    assert not rules.method_allowed(b"POST")
    assert rules.status_retryable(500) and rules.status_retryable(503)
    assert not rules.status_retryable(404)
    gw = RetryRules(protocol.RetryPolicy(retry_on=("gateway-error",), retry_non_idempotent=True))
    assert gw.method_allowed(b"POST")
    assert gw.status_retryable(502) and not gw.status_retryable(500)
    only_connect = RetryRules(protocol.RetryPolicy(retry_on=("connect-failure",)))
    assert only_connect.failure_retryable("connect-failure")
    assert not only_connect.failure_retryable("reset")
    assert not only_connect.status_retryable(503)


# -- outlier detection


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80) for i in range(n)]


def test_outlier_ejects_after_five_consecutive_failures() -> None:
    clock = FakeClock()
    det = OutlierDetector(protocol.OutlierDetection(), clock)
    a, b = _eps(2)
    assert not any(det.report(a, True, [a, b]) for _ in range(4))
    assert det.report(a, True, [a, b])
    assert not a.available(clock())
    clock.advance(29.9)
    assert not a.available(clock())
    clock.advance(0.2)
    assert a.available(clock())


def test_outlier_success_resets_the_streak() -> None:
    det = OutlierDetector(protocol.OutlierDetection(), FakeClock())
    a, b = _eps(2)
    for _ in range(4):
        det.report(a, True, [a, b])
    det.report(a, False, [a, b])
    assert not any(det.report(a, True, [a, b]) for _ in range(4))


def test_outlier_ejection_grows_and_is_capped() -> None:
    clock = FakeClock()
    det = OutlierDetector(
        protocol.OutlierDetection(base_ejection_ms=30_000, max_ejection_ms=70_000), clock
    )
    a, b = _eps(2)
    durations = []
    for _ in range(4):
        for _ in range(5):
            det.report(a, True, [a, b])
        durations.append(round(a.ejected_until - clock(), 3))
        clock.now = a.ejected_until
    assert durations == [30.0, 60.0, 70.0, 70.0]


def test_outlier_never_ejects_the_last_host() -> None:
    clock = FakeClock()
    det = OutlierDetector(protocol.OutlierDetection(), clock)
    a, b = _eps(2)
    for _ in range(5):
        det.report(a, True, [a, b])
    assert not a.available(clock())
    for _ in range(20):
        assert not det.report(b, True, [a, b])
    assert b.available(clock())
    (solo,) = _eps(1)
    for _ in range(20):
        det.report(solo, True, [solo])
    assert solo.available(clock())


def test_outlier_detection_can_be_disabled() -> None:
    det = OutlierDetector(protocol.OutlierDetection(enabled=False), FakeClock())
    a, b = _eps(2)
    assert not any(det.report(a, True, [a, b]) for _ in range(50))


# -- faults and percentages


def test_percent_chance_is_statistically_right() -> None:
    rng = random.Random(1)
    hits = sum(percent_chance(10, rng.random) for _ in range(20_000))
    assert 1800 < hits < 2200
    assert not any(percent_chance(0, rng.random) for _ in range(1000))
    assert all(percent_chance(100, rng.random) for _ in range(1000))


def test_fault_injector_delay_and_abort_by_percent() -> None:
    rng = random.Random(3)
    policy = protocol.FaultPolicy(
        delay=protocol.DelayFault(percent=25, duration_ms=200),
        abort=protocol.AbortFault(percent=50, status=418),
    )
    faults = FaultInjector(policy, rng.random)
    delays = [faults.delay() for _ in range(10_000)]
    assert set(delays) == {0.0, 0.2}
    assert 2300 < delays.count(0.2) < 2700
    aborts = [faults.abort() for _ in range(10_000)]
    assert set(aborts) == {None, 418}
    assert 4700 < aborts.count(418) < 5300


def test_fault_injector_without_policy_parts_does_nothing() -> None:
    faults = FaultInjector(protocol.FaultPolicy())
    assert all(faults.delay() == 0 and faults.abort() is None for _ in range(100))


@pytest.mark.parametrize("percent", [0.0, 100.0])
def test_fault_extremes(percent: float) -> None:
    faults = FaultInjector(
        protocol.FaultPolicy(abort=protocol.AbortFault(percent=percent, status=503))
    )
    results = {faults.abort() for _ in range(200)}
    assert results == ({503} if percent else {None})
