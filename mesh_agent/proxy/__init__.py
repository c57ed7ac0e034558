"""The hot path: inbound and outbound HTTP/1.1 listeners on asyncio protocols and httptools.

The package follows the seams a request crosses, in the order it meets them:

* ``http1``: HTTP/1.1 without sockets (hop-by-hop headers, target splitting and normalisation,
  the head of a relayed response), pure functions on bytes.
* ``flow``: back-pressure, one class for both sides of a relay.
* ``downstream``: the listener and the caller's connections; one coroutine per connection
  serves its requests in order, a bodiless request may take the inbound fast path instead.
* ``upstream``: connections to endpoints and their per-endpoint pools, each connection with one
  lazily re-armed deadline timer.
* ``exchange``: one request forwarded and its response relayed, shared by both sides.
* ``inbound``: callers → the local app, with the callback-only fast path.
* ``outbound``: the app → other services, with routing, retries and faults.
* ``mirror``: shadow copies that never touch the caller.

Each request reads ``ConfigHolder.current`` once at its start and uses that immutable object to
its end: a config swap never changes a request in flight.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import cast

from mesh_agent.balancer import Endpoint, EndpointRegistry
from mesh_agent.proxy.contracts import ConfigHolder, Limits, SpanLike, TelemetryLike
from mesh_agent.proxy.downstream import Listener
from mesh_agent.proxy.exchange import RETRY_BUFFER_BYTES, Forwarder
from mesh_agent.proxy.http1 import MAX_HEADER_BYTES, normalize_path, normalize_target
from mesh_agent.proxy.inbound import InboundSide
from mesh_agent.proxy.mirror import Mirror
from mesh_agent.proxy.outbound import OutboundSide
from mesh_agent.proxy.upstream import Pool, Upstream

__all__ = [
    "MAX_HEADER_BYTES",
    "RETRY_BUFFER_BYTES",
    "ConfigHolder",
    "Limits",
    "Proxy",
    "SpanLike",
    "TelemetryLike",
    "normalize_path",
    "normalize_target",
]


class Proxy:
    """Both listeners of one agent and the state they share (endpoints, pools, mirrors)."""

    def __init__(
        self,
        *,
        holder: ConfigHolder,
        telemetry: TelemetryLike,
        registry: EndpointRegistry,
        service: str,
        version: str,
        namespace: str = "default",
        app: tuple[str, int] | None = None,
        limits: Limits | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.holder = holder
        self.telemetry = telemetry
        self.registry = registry
        self.service = service
        self.version = version
        self.namespace = namespace
        self.limits = limits or Limits()
        self.app = Endpoint(*app) if app else None
        self.forwarder = forwarder = Forwarder(loop, telemetry, service)
        self.mirror = Mirror(forwarder)
        self.inbound_side = InboundSide(forwarder, holder, telemetry, service, version, self.app)
        self.outbound_side = OutboundSide(
            forwarder, holder, telemetry, service, self.mirror, rng=rng
        )
        self.inbound = Listener(
            loop,
            self.inbound_side.handle,
            self.limits,
            fast=self.inbound_side.fast,
            holder=holder,
        )
        self.outbound = Listener(
            loop,
            self.outbound_side.handle,
            self.limits,
            fast=self.outbound_side.fast,
            holder=holder,
        )
        self._sweeper: asyncio.TimerHandle | None = loop.call_later(1.0, self._sweep)

    def _pools(self) -> list[Pool]:
        """Every connection pool, the app's first."""
        eps = [*([self.app] if self.app else []), *self.registry.all()]
        return [cast(Pool, ep.pool) for ep in eps if ep.pool is not None]

    def _sweep(self) -> None:
        now = self.loop.time()
        self.inbound.sweep(now)
        self.outbound.sweep(now)
        older = now - self.limits.upstream_idle_s
        for pool in self._pools():
            pool.close_idle(older)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def prune_endpoints(self, keep: frozenset[Endpoint]) -> None:
        """Close idle connections to endpoints no config references any more."""
        for ep in self.registry.retain(keep):
            if ep.pool is not None:
                pool = cast(Pool, ep.pool)
                pool.retired = True
                pool.close_idle(float("inf"))

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (up to ``limits.drain_timeout_s``),
        then close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        drain = self.limits.drain_timeout_s
        await asyncio.gather(self.inbound.close(drain), self.outbound.close(drain))
        for pool in self._pools():
            pool.close_idle(float("inf"))
        self.forwarder.cancel_background()

    def idle_upstreams(self) -> list[Upstream]:
        """Pooled idle upstream connections, the app's first (for tests and diagnostics)."""
        return [conn for pool in self._pools() for conn in pool.idle]

    def connection_count(self) -> int:
        return len(self.inbound.conns) + len(self.outbound.conns)
