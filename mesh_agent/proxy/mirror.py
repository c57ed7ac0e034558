"""Mirroring: a copy of a route's request to another version, its response discarded. A mirror
never delays or fails the caller; past ``MAX_MIRRORS_IN_FLIGHT`` copies are shed."""

from __future__ import annotations

import logging
from typing import Final

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import Failure
from mesh_agent.proxy.exchange import Forwarder
from mesh_agent.proxy.http1 import Request
from mesh_agent.routing import CompiledRoute, CompiledService

__all__ = ["MAX_MIRRORS_IN_FLIGHT", "Mirror"]

log = logging.getLogger("mesh_agent.proxy")

MAX_MIRRORS_IN_FLIGHT: Final = 64


class Mirror:
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.loop = forwarder.loop
        self.in_flight = 0

    def maybe_send(
        self,
        route: CompiledRoute,
        svc: CompiledService,
        req: Request,
        path: bytes,
        authority: bytes,
        body: bytes,
        traceparent: bytes | None,
        request_id: bytes,
        conn: Downstream,
    ) -> None:
        if self.in_flight >= MAX_MIRRORS_IN_FLIGHT:
            return  # shed mirrors rather than let them queue behind real traffic
        target = route.mirror
        assert target is not None
        # As in Envoy, the shadow copy's Host says it is one, so the receiver can tell.
        fwd = self.forwarder
        head = fwd.build_head(
            conn, req, path, authority + b"-shadow", body, traceparent, request_id, outbound=True
        )
        ep = target.balancer.pick(self.loop.time())
        self.in_flight += 1
        fwd.run_in_background(self._send(ep, req, head, body, svc, route.timeout_s))

    async def _send(
        self,
        ep: Endpoint,
        req: Request,
        head: bytes,
        body: bytes,
        svc: CompiledService,
        timeout_s: float,
    ) -> None:
        deadline = self.loop.time() + timeout_s
        try:
            up = await self.forwarder.exchange(
                ep, req, head, body, deadline, svc.max_connections, 0, svc.connect_timeout_s
            )
            up.discard = True
            up.body_parts = []
            if not up.complete:
                await up.wait_done()  # the connection's timer aborts it at the deadline
            self.forwarder.release(up)
        except Failure:
            pass
        except Exception:
            log.exception("mirror request failed")
        finally:
            self.in_flight -= 1
