"""Compiled route tables.

A validated :class:`~mesh_agent.schema.MeshConfig` is compiled once per config version into
plain objects the hot path can use without further parsing: byte strings to compare, regexes
compiled once, cumulative weights for the version split, balancers over shared endpoints.
A compiled config is never mutated; a new version compiles a new one.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Final

from mesh_agent import schema
from mesh_agent.balancer import (
    DEFAULT_PANIC_PERCENT,
    Balancer,
    Endpoint,
    EndpointRegistry,
    make_balancer,
)
from mesh_agent.resilience import (
    FaultInjector,
    OutlierDetector,
    RetryBudget,
    RetryRules,
    TokenBucket,
)

__all__ = [
    "CompiledConfig",
    "CompiledRoute",
    "CompiledService",
    "HeaderLookup",
    "Inbound",
    "VersionPool",
    "compile_config",
    "timeout_seconds",
]

HeaderLookup = Mapping[bytes, bytes]

# "No timeout" is an infinite deadline: the hot path keeps one code path (float arithmetic on
# deadlines) and the proxy arms no timer at all for it (``loop.call_at`` is never given inf).
NO_TIMEOUT_S: Final = math.inf


def timeout_seconds(timeout_ms: int) -> float:
    """Milliseconds from the config to seconds; 0 means no timeout."""
    return timeout_ms / 1000.0 if timeout_ms else NO_TIMEOUT_S


class VersionPool:
    """The endpoints of one version of a service and the balancer over them."""

    __slots__ = ("balancer", "endpoints", "version")

    def __init__(
        self,
        version: str,
        endpoints: tuple[Endpoint, ...],
        lb: str,
        panic_percent: float = DEFAULT_PANIC_PERCENT,
    ) -> None:
        self.version = version
        self.endpoints = endpoints
        self.balancer: Balancer = make_balancer(lb, endpoints, panic_percent)


class _HeaderMatcher:
    __slots__ = ("exact", "invert", "name", "prefix", "present", "regex")

    def __init__(self, m: schema.HeaderMatch) -> None:
        self.name = m.name.encode("latin-1")
        self.exact = m.exact.encode("latin-1") if m.exact is not None else None
        self.prefix = m.prefix.encode("latin-1") if m.prefix is not None else None
        self.regex = schema.compile_regex(m.regex) if m.regex is not None else None
        self.present = m.present
        self.invert = m.invert

    def matches(self, headers: HeaderLookup) -> bool:
        value = headers.get(self.name)
        if self.present is not None:
            ok = (value is not None) == self.present
        elif value is None:
            ok = False
        elif self.exact is not None:
            ok = value == self.exact
        elif self.prefix is not None:
            ok = value.startswith(self.prefix)
        else:
            assert self.regex is not None
            ok = self.regex.fullmatch(value) is not None
        return ok != self.invert


class CompiledRoute:
    __slots__ = (
        "_cumulative",
        "_rng",
        "_total",
        "fault",
        "headers",
        "methods",
        "mirror",
        "mirror_percent",
        "name",
        "path_exact",
        "path_prefix",
        "path_regex",
        "pools",
        "retry",
        "timeout_s",
    )

    def __init__(
        self,
        route: schema.Route,
        service: schema.ServiceConfig,
        pools: Mapping[str, VersionPool],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = route.name
        path = route.match.path
        self.path_exact = path.exact.encode() if path and path.exact is not None else None
        self.path_prefix = path.prefix.encode() if path and path.prefix is not None else None
        self.path_regex = (
            schema.compile_regex(path.regex) if path and path.regex is not None else None
        )
        self.methods = (
            frozenset(m.encode() for m in route.match.methods) if route.match.methods else None
        )
        self.headers = tuple(_HeaderMatcher(h) for h in route.match.headers)
        backends = [b for b in route.backends if b.weight > 0]
        self.pools = tuple(pools[b.version] for b in backends)
        cumulative: list[int] = []
        total = 0
        for b in backends:
            total += b.weight
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total
        self._rng = rng
        timeout_ms = route.timeout_ms if route.timeout_ms is not None else service.timeout_ms
        self.timeout_s = timeout_seconds(timeout_ms)
        self.retry = RetryRules(route.retries or service.retries)
        self.fault = FaultInjector(route.fault) if route.fault else None
        self.mirror = pools[route.mirror.version] if route.mirror else None
        self.mirror_percent = route.mirror.percent if route.mirror else 0.0

    def matches(self, method: bytes, path: bytes, headers: HeaderLookup | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.headers:
            if headers is None:
                return False
            for h in self.headers:
                if not h.matches(headers):
                    return False
        return True

    def pick_pool(self) -> VersionPool:
        """The weighted version split."""
        pools = self.pools
        if len(pools) == 1:
            return pools[0]
        i = bisect.bisect_right(self._cumulative, self._rng() * self._total)
        return pools[min(i, len(pools) - 1)]


class CompiledService:
    __slots__ = (
        "budget",
        "budget_policy",
        "connect_timeout_s",
        "health_check",
        "max_connections",
        "max_pending",
        "name",
        "namespace",
        "needs_headers",
        "outlier",
        "pools",
        "rate_limit",
        "rate_policy",
        "routes",
    )

    def __init__(
        self,
        svc: schema.ServiceConfig,
        registry: EndpointRegistry,
        clock: Callable[[], float],
        rng: Callable[[], float],
        previous: CompiledService | None = None,
    ) -> None:
        self.name = svc.name
        self.health_check = svc.health_check
        self.namespace = svc.namespace
        pools: dict[str, VersionPool] = {}
        for version, vc in svc.versions.items():
            if vc.endpoints:
                eps = tuple(registry.get(*schema.parse_address(a)) for a in vc.endpoints)
                pools[version] = VersionPool(
                    version, eps, svc.load_balancer, svc.panic_threshold_percent
                )
        self.pools = pools
        routes = svc.routes
        if not routes:
            # No policy yet: spread over all endpoints, each version weighted by its size.
            routes = (
                schema.Route(
                    name="default",
                    backends=tuple(
                        schema.Backend(version=v, weight=len(p.endpoints)) for v, p in pools.items()
                    ),
                ),
            )
        self.routes = tuple(CompiledRoute(r, svc, pools, rng) for r in routes)
        self.needs_headers = any(r.headers for r in self.routes)
        self.outlier = OutlierDetector(svc.outlier_detection, clock)
        # Counters carry over from the previous config when their policy is unchanged, so a
        # config push does not refill a rate limit or forget the retries already spent.
        self.budget_policy = svc.retry_budget
        self.budget: RetryBudget
        if previous is not None and previous.budget_policy == svc.retry_budget:
            self.budget = previous.budget
        else:
            self.budget = RetryBudget(
                svc.retry_budget.percent,
                svc.retry_budget.min_retries_per_second,
                svc.retry_budget.window_s,
                clock,
            )
        self.rate_policy = svc.rate_limit
        self.rate_limit: TokenBucket | None
        if previous is not None and previous.rate_policy == svc.rate_limit:
            self.rate_limit = previous.rate_limit
        else:
            self.rate_limit = _bucket(svc.rate_limit, clock)
        limits = svc.connection_limits
        self.max_connections = limits.max_connections
        self.max_pending = limits.max_pending_requests
        self.connect_timeout_s = limits.connect_timeout_ms / 1000.0

    def match(
        self, method: bytes, path: bytes, headers: HeaderLookup | None
    ) -> CompiledRoute | None:
        """First matching route wins. ``path`` must not include the query string."""
        for r in self.routes:
            if r.matches(method, path, headers):
                return r
        return None


def _bucket(policy: schema.RateLimit | None, clock: Callable[[], float]) -> TokenBucket | None:
    if policy is None:
        return None
    return TokenBucket(policy.requests_per_second, policy.burst, clock)


class Inbound:
    __slots__ = (
        "connect_timeout_s",
        "max_connections",
        "max_pending",
        "rate_limit",
        "rate_policy",
        "timeout_s",
    )

    def __init__(
        self,
        policy: schema.InboundPolicy,
        clock: Callable[[], float],
        previous: Inbound | None = None,
    ) -> None:
        self.timeout_s = timeout_seconds(policy.timeout_ms)
        self.rate_policy = policy.rate_limit
        self.rate_limit: TokenBucket | None
        if previous is not None and previous.rate_policy == policy.rate_limit:
            self.rate_limit = previous.rate_limit
        else:
            self.rate_limit = _bucket(policy.rate_limit, clock)
        limits = policy.connection_limits
        self.max_connections = limits.max_connections
        self.max_pending = limits.max_pending_requests
        self.connect_timeout_s = limits.connect_timeout_ms / 1000.0


class CompiledConfig:
    """Everything the proxy needs for one config version. Immutable once built: a request
    keeps the object it started with, so a swap never changes a request mid-flight."""

    __slots__ = ("by_host", "config", "endpoints", "inbound", "services", "version")

    def __init__(
        self,
        config: schema.MeshConfig,
        version: str,
        registry: EndpointRegistry,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        previous: CompiledConfig | None = None,
    ) -> None:
        self.config = config
        self.version = version
        before = {(s.namespace, s.name): s for s in previous.services} if previous else {}
        self.services: tuple[CompiledService, ...] = tuple(
            CompiledService(s, registry, clock, rng, before.get((s.namespace, s.name)))
            for s in config.services
        )
        by_host: dict[bytes, CompiledService] = {}
        for s in self.services:
            # Callers may use the short name or any of the Kubernetes-style long forms.
            for host in (
                f"{s.name}.{s.namespace}.svc.cluster.local",
                f"{s.name}.{s.namespace}.svc",
                f"{s.name}.{s.namespace}",
            ):
                by_host[host.encode()] = s
        for s in self.services:
            # The short name resolves to the service of that name in the first namespace listed.
            by_host.setdefault(s.name.encode(), s)
        self.by_host = by_host
        self.inbound: Inbound = Inbound(
            config.inbound, clock, previous.inbound if previous else None
        )
        self.endpoints = frozenset(
            e for s in self.services for p in s.pools.values() for e in p.endpoints
        )

    def service_for(self, host: bytes) -> CompiledService | None:
        """Look up a destination by the host a caller used (port and case ignored)."""
        s = self.by_host.get(host)
        if s is not None:
            return s
        if host.startswith(b"["):
            return None
        name = (
            host.rsplit(b":", 1)[0] if host.find(b":") >= 0 else host
        )  # not "in": docs/agent.md, Speed
        return self.by_host.get(name.lower().rstrip(b"."))


def compile_config(
    config: schema.MeshConfig,
    version: str,
    registry: EndpointRegistry,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
    previous: CompiledConfig | None = None,
) -> CompiledConfig:
    """Compile ``config``; stateful limiters are taken over from ``previous`` where unchanged."""
    return CompiledConfig(config, version, registry, clock, rng, previous)
