"""The inbound side: requests from other services' agents to the local app.

Fast path: a bodiless request with nothing queued ahead of it and an idle pooled connection to
the app needs no coroutine at all. It is forwarded from the caller's parser callback
(:meth:`InboundSide.fast`) and relayed by :class:`FastExchange` from the app connection's parser
callbacks. Anything unusual (no idle connection, a rate limit, a body, pipelined requests behind
it, a pooled connection found closed) goes to :meth:`InboundSide.handle`, a coroutine, which
remains the reference behaviour.
"""

from __future__ import annotations

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.contracts import ConfigHolder, SpanLike, TelemetryLike
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import FAILURE_REASON, Failure
from mesh_agent.proxy.exchange import FastRelay, Forwarder, idle_connections, send_fast
from mesh_agent.proxy.http1 import Request, split_target
from mesh_agent.proxy.upstream import Upstream
from mesh_agent.routing import Inbound

__all__ = ["FastExchange", "InboundSide"]


class InboundSide:
    """Callers → this agent → the local app (``app``), with the inbound policy in force."""

    def __init__(
        self,
        forwarder: Forwarder,
        holder: ConfigHolder,
        telemetry: TelemetryLike,
        service: str,
        version: str,
        app: Endpoint | None,
    ) -> None:
        self.forwarder = forwarder
        self.loop = forwarder.loop
        self.holder = holder
        self.telemetry = telemetry
        self.service = service
        self.version = version
        self.app = app
        self.span_name = f"{service} inbound"
        # Requests answered without a coroutine (admin /metrics; tests check the path taken).
        self.fast_requests = 0

    def fast(self, conn: Downstream, req: Request) -> bool:
        """Forward a bodiless request to the app over a pooled connection without a coroutine:
        ``FastExchange`` relays the answer from the upstream's parser callbacks. False leaves
        the request to ``handle`` (no app, a rate limit, no idle connection, a request
        target that is not a plain path)."""
        ep = self.app
        if ep is None or req.url[:1] != b"/":
            return False
        inbound = self.holder.current.inbound
        if inbound.rate_limit is not None:
            return False
        idle = idle_connections(ep)
        if idle is None:
            return False
        source = req.source.decode("latin-1") if req.source else "unknown"
        span, _, head = self.begin_hop(conn, req, req.url, b"", source)
        up = idle.pop()  # only now: nothing above may leave a connection out of the pool
        ep.active_requests += 1
        fx = FastExchange(
            self, conn, req, up, ep, inbound, head, span, source, req.started + inbound.timeout_s
        )
        send_fast(up, req, fx, head)
        self.fast_requests += 1
        return True

    def begin_hop(
        self, conn: Downstream, req: Request, path: bytes, body: bytes | None, source: str
    ) -> tuple[SpanLike | None, bytes | None, bytes]:
        hop = self.forwarder.begin_hop(conn, req, path, req.host, body, "server", False)
        span = hop[0]
        if span is not None:
            method = req.method.decode("latin-1")
            span.describe(self.span_name, {"http.request.method": method, "mesh.source": source})
        return hop

    async def handle(self, conn: Downstream, req: Request) -> bool:
        cfg = self.holder.current
        inbound = cfg.inbound
        source = req.source.decode("latin-1") if req.source else "unknown"
        if self.app is None:
            keep = conn.send_error(req, 503, "no-app")
            self.forwarder.record(req, source, self.service, self.version, 503)
            return keep
        if inbound.rate_limit is not None and not inbound.rate_limit.try_acquire():
            keep = conn.send_error(req, 429, "rate-limited")
            self.forwarder.record(req, source, self.service, self.version, 429)
            return keep
        _, path = split_target(req.url, req.host)
        if not path:
            return conn.send_error(req, 400, "malformed-request")
        # The body first: a caller that goes away meanwhile leaves no span unended.
        body = await self.forwarder.read_body(req)
        span, _, head = self.begin_hop(conn, req, path, body, source)
        ep = self.app
        ep.active_requests += 1
        return await self.exchange(conn, req, inbound, head, body, span, source)

    async def exchange(
        self,
        conn: Downstream,
        req: Request,
        inbound: Inbound,
        head: bytes,
        body: bytes | None,
        span: SpanLike | None,
        source: str,
        *,
        fresh: bool = False,
    ) -> bool:
        """Forward to the app and relay its answer; ``ep.active_requests`` is already counted
        and is given back here, as are the span and the metrics."""
        ep = self.app
        assert ep is not None
        tel = self.telemetry
        deadline = req.started + inbound.timeout_s
        status: int | None = None
        try:
            try:
                up = await self.forwarder.exchange(
                    ep,
                    req,
                    head,
                    body,
                    deadline,
                    inbound.max_connections,
                    inbound.max_pending,
                    inbound.connect_timeout_s,
                    fresh=fresh,
                )
            except Failure as f:
                status = 504 if f.kind == "timeout" else 503
                return conn.send_error(req, status, FAILURE_REASON[f.kind])
            status = up.status
            try:
                return await self.forwarder.relay(conn, req, up)
            finally:
                if up.failure == "timeout":
                    status = None  # cut off mid-body: no complete response
                self.forwarder.release(up)
        finally:
            ep.active_requests -= 1
            if span is not None:
                span.end(status)
            tel.record(source, self.service, self.version, status, self.loop.time() - req.started)


class FastExchange(FastRelay):
    """One inbound request relayed from callbacks (see :class:`FastRelay`). Behaves like
    ``InboundSide.exchange`` in every outcome."""

    __slots__ = ("inbound", "side", "source")

    def __init__(
        self,
        side: InboundSide,
        conn: Downstream,
        req: Request,
        up: Upstream,
        ep: Endpoint,
        inbound: Inbound,
        head_bytes: bytes,
        span: SpanLike | None,
        source: str,
        deadline: float,
    ) -> None:
        super().__init__(side.forwarder, conn, req, up, ep, head_bytes, span, deadline)
        self.side = side
        self.inbound = inbound
        self.source = source

    def fail(self, kind: str) -> None:
        """No complete response: like a failed ``Forwarder.exchange`` or a relay broken off."""
        try:
            up = self.up
            conn = self.conn
            up.abort()
            if self.headed:
                self.break_off(kind)
                return
            if kind == "reset" and not up.got_bytes:
                # The pooled connection was closed as we reused it: the upstream never saw the
                # request, so send it once more on a fresh connection, as Forwarder.exchange does.
                side = self.side
                conn.run_fast_fallback(
                    self.req,
                    side.exchange(
                        conn,
                        self.req,
                        self.inbound,
                        self.head_bytes,
                        b"",
                        self.span,
                        self.source,
                        fresh=True,
                    ),
                )
                return
            status = 504 if kind == "timeout" else 503
            keep = conn.send_error(self.req, status, FAILURE_REASON[kind])
        except Exception:
            self.internal_error()
            return
        self.finish(status, keep)

    def record(self, status: int | None) -> None:
        side = self.side
        side.telemetry.record(
            self.source,
            side.service,
            side.version,
            status,
            side.forwarder.clock() - self.req.started,
        )
