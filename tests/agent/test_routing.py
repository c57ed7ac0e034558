"""Route matching (first match wins), the weighted version split, host lookup."""

from __future__ import annotations

import collections
import random
from typing import Any

from mesh_agent.balancer import EndpointRegistry
from mesh_agent.config import validate_config
from mesh_agent.routing import CompiledConfig, compile_config


def _compile(services: list[dict[str, Any]], rng: Any = random.random) -> CompiledConfig:
    loaded = validate_config({"services": services})
    return compile_config(loaded.config, loaded.version, EndpointRegistry(), rng=rng)


VERSIONS = {
    "v1": {"endpoints": ["10.0.0.1:80", "10.0.0.2:80"]},
    "v2": {"endpoints": ["10.0.0.3:80"]},
}


def _svc(routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "reviews", "versions": VERSIONS, "routes": routes, **extra}


def test_first_match_wins_across_path_method_and_headers() -> None:
    cfg = _compile(
        [
            _svc(
                [
                    {
                        "name": "jason",
                        "match": {"headers": [{"name": "End-User", "exact": "jason"}]},
                        "backends": [{"version": "v2"}],
                    },
                    {
                        "name": "exact",
                        "match": {"path": {"exact": "/health"}, "methods": ["GET", "HEAD"]},
                        "backends": [{"version": "v1"}],
                    },
                    {
                        "name": "regex",
                        "match": {"path": {"regex": "/items/[0-9]+"}},
                        "backends": [{"version": "v2"}],
                    },
                    {
                        "name": "api",
                        "match": {"path": {"prefix": "/api/"}},
                        "backends": [{"version": "v1"}],
                    },
                ]
            )
        ]
    )
    svc = cfg.service_for(b"reviews")
    assert svc is not None

    def name(method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None) -> str | None:
        r = svc.match(method, path, headers or {})
        return r.name if r else None

    assert name(b"GET", b"/health", {b"end-user": b"jason"}) == "jason"
    assert name(b"GET", b"/health") == "exact"
    assert name(b"POST", b"/health") is None  # method excluded, no later route matches
    assert name(b"GET", b"/health/x") is None  # exact is exact
    assert name(b"GET", b"/items/42") == "regex"
    assert name(b"GET", b"/items/42x") is None  # regex is a full match
    assert name(b"DELETE", b"/api/v1/x") == "api"
    assert name(b"GET", b"/apix") is None
    assert name(b"GET", b"/", {b"end-user": b"jasonx"}) is None


def test_header_match_kinds_and_invert() -> None:
    cfg = _compile(
        [
            _svc(
                [
                    {
                        "name": "canary-cookie",
                        "match": {"headers": [{"name": "cookie", "regex": ".*canary=1.*"}]},
                        "backends": [{"version": "v2"}],
                    },
                    {
                        "name": "beta",
                        "match": {"headers": [{"name": "x-group", "prefix": "beta"}]},
                        "backends": [{"version": "v2"}],
                    },
                    {
                        "name": "no-debug",
                        "match": {
                            "headers": [{"name": "x-debug", "present": True, "invert": True}]
                        },
                        "backends": [{"version": "v1"}],
                    },
                ]
            )
        ]
    )
    svc = cfg.service_for(b"reviews")
    assert svc is not None and svc.needs_headers

    def name(headers: dict[bytes, bytes]) -> str | None:
        r = svc.match(b"GET", b"/", headers)
        return r.name if r else None

    assert name({b"cookie": b"a=b; canary=1; c=d"}) == "canary-cookie"
    assert name({b"x-group": b"beta-testers"}) == "beta"
    assert name({}) == "no-debug"
    assert name({b"x-debug": b"1"}) is None


def test_weighted_split_is_within_tolerance() -> None:
    rng = random.Random(42)
    cfg = _compile(
        [
            _svc(
                [
                    {
                        "name": "canary",
                        "backends": [
                            {"version": "v1", "weight": 90},
                            {"version": "v2", "weight": 10},
                        ],
                    }
                ]
            )
        ],
        rng=rng.random,
    )
    svc = cfg.service_for(b"reviews")
    assert svc is not None
    route = svc.match(b"GET", b"/", None)
    assert route is not None
    counts = collections.Counter(route.pick_pool().version for _ in range(20_000))
    # binomial sd at n=20000, p=0.1 is ~42; allow ~5 sd
    assert abs(counts["v2"] - 2000) < 220
    assert counts["v1"] + counts["v2"] == 20_000


def test_zero_weight_backend_gets_nothing() -> None:
    cfg = _compile(
        [
            _svc(
                [
                    {
                        "name": "r",
                        "backends": [
                            {"version": "v1", "weight": 0},
                            {"version": "v2", "weight": 5},
                        ],
                    }
                ]
            )
        ]
    )
    svc = cfg.service_for(b"reviews")
    assert svc is not None
    route = svc.match(b"GET", b"/", None)
    assert route is not None
    assert {route.pick_pool().version for _ in range(500)} == {"v2"}


def test_no_routes_spreads_over_all_endpoints_by_version_size() -> None:
    rng = random.Random(5)
    cfg = _compile([_svc([])], rng=rng.random)
    svc = cfg.service_for(b"reviews")
    assert svc is not None
    route = svc.match(b"POST", b"/anything", None)
    assert route is not None
    counts = collections.Counter(route.pick_pool().version for _ in range(9000))
    assert abs(counts["v1"] - 6000) < 300  # two of three endpoints are v1


def test_host_lookup_accepts_short_long_and_port_forms() -> None:
    cfg = _compile([{**_svc([]), "namespace": "shop"}])
    for host in [
        b"reviews",
        b"reviews:9080",
        b"REVIEWS",
        b"reviews.shop",
        b"reviews.shop.svc.cluster.local",
        b"reviews.shop.svc.cluster.local:80",
    ]:
        svc = cfg.service_for(host)
        assert svc is not None and svc.name == "reviews", host
    assert cfg.service_for(b"ratings") is None
    assert cfg.service_for(b"reviews.other") is None


def test_endpoints_are_shared_between_config_versions() -> None:
    reg = EndpointRegistry()
    one = validate_config({"services": [_svc([])]})
    two = validate_config({"services": [_svc([], load_balancer="round_robin")]})
    a = compile_config(one.config, one.version, reg)
    b = compile_config(two.config, two.version, reg)
    assert a.version != b.version
    assert a.endpoints == b.endpoints  # same Endpoint objects: health and pools carry over


def test_limiter_state_survives_a_swap_when_its_policy_is_unchanged() -> None:
    reg = EndpointRegistry()
    limit = {"requests_per_second": 0.001, "burst": 1}
    one = validate_config({"services": [_svc([], rate_limit=limit)]})
    two = validate_config({"services": [_svc([], rate_limit=limit, timeout_ms=5)]})
    three = validate_config({"services": [_svc([], rate_limit={**limit, "burst": 2})]})
    a = compile_config(one.config, one.version, reg)
    svc_a = a.service_for(b"reviews")
    assert svc_a is not None and svc_a.rate_limit is not None
    assert svc_a.rate_limit.try_acquire()
    b = compile_config(two.config, two.version, reg, previous=a)
    svc_b = b.service_for(b"reviews")
    assert svc_b is not None and svc_b.rate_limit is not None
    assert not svc_b.rate_limit.try_acquire()  # the push did not refill the bucket
    c = compile_config(three.config, three.version, reg, previous=b)
    svc_c = c.service_for(b"reviews")
    assert svc_c is not None and svc_c.rate_limit is not None
    assert svc_c.rate_limit.try_acquire()  # a new policy starts a new bucket


def test_route_timeout_inherits_and_zero_disables() -> None:
    backends = [{"version": "v1", "weight": 1}]
    compiled = _compile(
        [
            _svc(
                [
                    {"name": "inherits", "match": {"path": {"prefix": "/a"}}, "backends": backends},
                    {
                        "name": "own",
                        "match": {"path": {"prefix": "/b"}},
                        "backends": backends,
                        "timeout_ms": 250,
                    },
                    {
                        "name": "stream",
                        "match": {"path": {"prefix": "/c"}},
                        "backends": backends,
                        "timeout_ms": 0,
                    },
                ],
                timeout_ms=2000,
            )
        ]
    )
    svc = compiled.service_for(b"reviews")
    assert svc is not None
    timeouts = {route.name: route.timeout_s for route in svc.routes}
    assert timeouts["inherits"] == 2.0
    assert timeouts["own"] == 0.25
    # 0 is "no timeout", not "inherit" (0 is falsy; an `or` would have turned it into 2.0).
    assert timeouts["stream"] == float("inf")  # the proxy arms no timer for it


def test_negative_timeout_is_rejected() -> None:
    import pytest

    from mesh_agent.config import ConfigError

    with pytest.raises(ConfigError, match="timeout_ms"):
        validate_config({"services": [_svc([], timeout_ms=-1)]})
