"""Endpoints and the load balancers that choose among them.

An :class:`Endpoint` carries the state that must outlive a config swap (in-flight request count,
outlier-detection counters, the connection pool), so endpoints come from one
:class:`EndpointRegistry` per agent and compiled configs only hold references to them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol

__all__ = [
    "Balancer",
    "Endpoint",
    "EndpointRegistry",
    "LeastRequest",
    "RoundRobin",
    "make_balancer",
]


class Endpoint:
    __slots__ = (
        "active_requests",
        "address",
        "consecutive_failures",
        "ejected_until",
        "healthy",
        "host",
        "pool",
        "port",
        "times_ejected",
    )

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.active_requests = 0
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejected_until = 0.0
        # Set by the active health checker (mesh_agent.health); True when nothing checks it.
        self.healthy = True
        # Owned by the proxy (its connection pool); typed loosely so this module stays
        # independent of the transport.
        self.pool: object | None = None

    def available(self, now: float) -> bool:
        """Neither ejected by outlier detection nor failing its health check."""
        return self.ejected_until <= now and self.healthy

    def __repr__(self) -> str:
        return f"Endpoint({self.address})"


class EndpointRegistry:
    """One Endpoint object per address for the life of the agent."""

    def __init__(self) -> None:
        self._by_address: dict[tuple[str, int], Endpoint] = {}

    def get(self, host: str, port: int) -> Endpoint:
        key = (host, port)
        ep = self._by_address.get(key)
        if ep is None:
            ep = self._by_address[key] = Endpoint(host, port)
        return ep

    def retain(self, keep: Iterable[Endpoint]) -> list[Endpoint]:
        """Forget endpoints not in ``keep``; return the forgotten ones (to close their pools)."""
        keep_ids = {id(e) for e in keep}
        dropped = [e for e in self._by_address.values() if id(e) not in keep_ids]
        for e in dropped:
            del self._by_address[(e.host, e.port)]
        return dropped

    def all(self) -> list[Endpoint]:
        return list(self._by_address.values())


class Balancer(Protocol):
    endpoints: tuple[Endpoint, ...]

    def pick(self, now: float, avoid: Endpoint | None = None) -> Endpoint: ...


# Below this share of available endpoints, balance over all of them (Envoy's panic threshold):
# when most hosts look bad the checks are more likely wrong than the hosts, and concentrating
# all traffic on the few left would take them down too.
DEFAULT_PANIC_PERCENT: Final = 50.0


def _candidates(
    endpoints: Sequence[Endpoint], now: float, avoid: Endpoint | None, panic_percent: float
) -> list[Endpoint]:
    """Available endpoints (not ejected, not failing a health check), without ``avoid`` when
    others exist; all endpoints when fewer than ``panic_percent`` % are available (panic mode:
    a wrong guess beats a certain failure)."""
    ok = [e for e in endpoints if e.ejected_until <= now and e.healthy]
    if not ok or len(ok) * 100.0 < len(endpoints) * panic_percent:
        ok = list(endpoints)
    if avoid is not None and len(ok) > 1:
        ok = [e for e in ok if e is not avoid] or ok
    return ok


class RoundRobin:
    __slots__ = ("_next", "endpoints", "panic_percent")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        rng: Callable[[], float] = random.random,
        panic_percent: float = DEFAULT_PANIC_PERCENT,
    ) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.panic_percent = panic_percent
        # Start at a random place so that many agents do not all hit the first endpoint first.
        self._next = int(rng() * len(self.endpoints))

    def pick(self, now: float, avoid: Endpoint | None = None) -> Endpoint:
        eps = self.endpoints
        n = len(eps)
        ep = eps[self._next % n]
        self._next += 1
        if ep.ejected_until <= now and ep.healthy and (ep is not avoid or n == 1):
            return ep
        # Only when the next one in turn is unavailable or to be avoided.
        ok = _candidates(eps, now, avoid, self.panic_percent)
        if ep in ok and (ep is not avoid or n == 1):
            return ep  # panic mode: its turn even though it looks unavailable
        return ok[self._next % len(ok)]


class LeastRequest:
    """Power of two choices: of two random endpoints, the one with fewer requests in flight."""

    __slots__ = ("_rng", "endpoints", "panic_percent")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        rng: random.Random | None = None,
        panic_percent: float = DEFAULT_PANIC_PERCENT,
    ) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self._rng = rng or random.Random()
        self.panic_percent = panic_percent

    def pick(self, now: float, avoid: Endpoint | None = None) -> Endpoint:
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0]
        rng = self._rng
        a = eps[int(rng.random() * n)]
        b = eps[int(rng.random() * n)]
        if (
            a is b
            or a.ejected_until > now
            or b.ejected_until > now
            or not (a.healthy and b.healthy)
            or avoid in (a, b)
        ):
            # Slow path, only when the fast draw hit a duplicate or an unavailable endpoint.
            ok = _candidates(eps, now, avoid, self.panic_percent)
            if len(ok) == 1:
                return ok[0]
            a, b = rng.sample(ok, 2)
        return a if a.active_requests <= b.active_requests else b


def make_balancer(
    kind: str, endpoints: Sequence[Endpoint], panic_percent: float = DEFAULT_PANIC_PERCENT
) -> Balancer:
    if kind == "round_robin":
        return RoundRobin(endpoints, panic_percent=panic_percent)
    if kind == "least_request":
        return LeastRequest(endpoints, panic_percent=panic_percent)
    raise ValueError(f"unknown load balancer {kind!r}")
