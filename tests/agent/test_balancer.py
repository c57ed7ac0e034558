"""Round robin and power-of-two-choices least-request."""

from __future__ import annotations

import collections
import random

from mesh_agent.balancer import Endpoint, EndpointRegistry, LeastRequest, RoundRobin


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80) for i in range(n)]


def test_round_robin_cycles_evenly() -> None:
    eps = _eps(3)
    rr = RoundRobin(eps)
    picks = [rr.pick(0.0) for _ in range(300)]
    assert collections.Counter(picks) == {e: 100 for e in eps}
    # strictly cyclic: each window of three has all endpoints
    assert all(len(set(picks[i : i + 3])) == 3 for i in range(0, 297))


def test_round_robin_skips_ejected_and_avoided() -> None:
    a, b, c = _eps(3)
    b.ejected_until = 100.0
    rr = RoundRobin([a, b, c])
    assert b not in {rr.pick(50.0) for _ in range(30)}
    assert {rr.pick(50.0, avoid=a) for _ in range(30)} == {c}
    assert b in {rr.pick(150.0) for _ in range(30)}  # ejection over


def test_all_ejected_falls_back_to_all_endpoints() -> None:
    eps = _eps(2)
    for e in eps:
        e.ejected_until = 100.0
    assert {RoundRobin(eps).pick(0.0) for _ in range(10)} == set(eps)
    assert {LeastRequest(eps).pick(0.0) for _ in range(50)} == set(eps)


def test_least_request_prefers_the_less_loaded() -> None:
    a, b = _eps(2)
    a.active_requests = 10
    lr = LeastRequest([a, b], random.Random(1))
    assert {lr.pick(0.0) for _ in range(100)} == {b}


def test_least_request_spreads_equal_load_and_avoids_the_busiest() -> None:
    eps = _eps(4)
    eps[0].active_requests = 100
    lr = LeastRequest(eps, random.Random(2))
    counts = collections.Counter(lr.pick(0.0) for _ in range(4000))
    assert eps[0] not in counts  # P2C never picks the single worst of any pair
    for e in eps[1:]:
        assert counts[e] > 1000


def test_least_request_skips_ejected_and_avoid() -> None:
    a, b, c = _eps(3)
    a.ejected_until = 10.0
    lr = LeastRequest([a, b, c], random.Random(3))
    picks = {lr.pick(5.0, avoid=b) for _ in range(100)}
    assert picks == {c}


def test_registry_shares_endpoints_and_forgets_unused() -> None:
    reg = EndpointRegistry()
    a = reg.get("10.0.0.1", 80)
    assert reg.get("10.0.0.1", 80) is a
    b = reg.get("10.0.0.2", 80)
    assert reg.retain([a]) == [b]
    assert reg.get("10.0.0.2", 80) is not b
