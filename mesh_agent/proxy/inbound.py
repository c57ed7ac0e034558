"""The inbound side: requests from other services' agents to the local app.

Fast path: a bodiless request with nothing queued ahead of it and an idle pooled connection to
the app needs no coroutine at all. It is forwarded from the caller's parser callback
(:meth:`InboundSide.fast`) and relayed by :class:`FastExchange` from the app connection's parser
callbacks. Anything unusual (no idle connection, a rate limit, a body, pipelined requests behind
it, a pooled connection found closed) goes to :meth:`InboundSide.handle`, a coroutine, which
remains the reference behaviour.
"""

from __future__ import annotations

import logging
from typing import cast

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.contracts import ConfigHolder, SpanLike, TelemetryLike
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import FAILURE_REASON, Failure
from mesh_agent.proxy.exchange import Forwarder
from mesh_agent.proxy.flow import PEER
from mesh_agent.proxy.http1 import Request, new_request_id, response_head, split_target
from mesh_agent.proxy.upstream import Pool, Upstream
from mesh_agent.routing import Inbound

__all__ = ["FastExchange", "InboundSide"]

log = logging.getLogger("mesh_agent.proxy")


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

    def fast(self, conn: Downstream, req: Request) -> bool:
        """Forward a bodiless request to the app over a pooled connection without a coroutine:
        ``FastExchange`` relays the answer from the upstream's parser callbacks. False leaves
        the request to ``handle`` (no app, a rate limit, no idle connection, a request
        target that is not a plain path)."""
        ep = self.app
        if ep is None or req.url[:1] != b"/":
            return False
        pool = ep.pool
        inbound = self.holder.current.inbound
        if pool is None or inbound.rate_limit is not None:
            return False
        idle = cast(Pool, pool).idle
        while idle and idle[-1].closed:
            idle.pop()
        if not idle:
            return False
        source = req.source.decode("latin-1") if req.source else "unknown"
        tel = self.telemetry
        span = tel.start_span(
            name=self.span_name,
            kind="server",
            traceparent=req.traceparent,
            attributes={"http.request.method": req.method.decode("latin-1"), "mesh.source": source},
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        request_id = req.request_id or new_request_id()
        fwd = self.forwarder
        head = fwd.finish_head(
            fwd.build_head(req, req.url, req.host, b"", tp, request_id, outbound=False), conn, req
        )
        up = idle.pop()  # only now: nothing above may leave a connection out of the pool
        ep.active_requests += 1
        fx = FastExchange(
            self, conn, req, up, ep, inbound, head, span, source, req.started + inbound.timeout_s
        )
        up.begin_fast(req.method == b"HEAD", fx)
        transport = up.transport
        assert transport is not None
        transport.write(head)
        return True

    async def handle(self, conn: Downstream, req: Request) -> bool:
        cfg = self.holder.current
        inbound = cfg.inbound
        source = req.source.decode("latin-1") if req.source else "unknown"
        tel = self.telemetry
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
        span = tel.start_span(
            name=self.span_name,
            kind="server",
            traceparent=req.traceparent,
            attributes={"http.request.method": req.method.decode("latin-1"), "mesh.source": source},
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        body = await self.forwarder.read_body(req)
        request_id = req.request_id or new_request_id()
        fwd = self.forwarder
        head = fwd.finish_head(
            fwd.build_head(req, path, req.host, body, tp, request_id, outbound=False), conn, req
        )
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
            tel.record(
                source=source,
                destination=self.service,
                destination_version=self.version,
                status=status,
                duration_s=self.loop.time() - req.started,
            )


class FastExchange:
    """One inbound request relayed from callbacks: the upstream's parser callbacks write the
    response head and body to the caller, the end releases the connection and counts the
    request. Behaves like ``InboundSide.exchange`` in every outcome."""

    __slots__ = (
        "chunked",
        "conn",
        "deadline",
        "ep",
        "head_bytes",
        "headed",
        "inbound",
        "keep",
        "req",
        "side",
        "source",
        "span",
        "up",
    )

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
        self.side = side
        self.conn = conn
        self.req = req
        self.up = up
        self.ep = ep
        self.inbound = inbound
        self.head_bytes = head_bytes
        self.span = span
        self.source = source
        self.deadline = deadline
        self.headed = False
        self.keep = False
        self.chunked = False

    def head(self) -> None:
        """The response head arrived (called from the upstream parser)."""
        try:
            up = self.up
            conn = self.conn
            parts, self.keep, self.chunked, no_body = response_head(
                self.req, up.status, up, conn.closed
            )
            self.headed = True
            conn.responded = True
            up.out += parts
            up.sink = conn
            up.sink_chunked = self.chunked
            if no_body:
                up.discard = True
            else:
                conn.relaying = up
                if conn.write_paused:
                    up.flow.hold(PEER)
        except Exception:
            self._internal_error()

    def done(self) -> None:
        """The whole response went to the caller (called once the parser returned)."""
        try:
            up = self.up
            conn = self.conn
            conn.relaying = None
            if self.chunked:
                conn.write(b"0\r\n\r\n")
            up.flow.release(PEER)
            self.side.forwarder.release(up)
        except Exception:
            self._internal_error()
            return
        self._finish(up.status, self.keep)

    def fail(self, kind: str) -> None:
        """No complete response: like a failed ``Forwarder.exchange`` or a relay broken off."""
        try:
            up = self.up
            conn = self.conn
            up.abort()
            if self.headed:
                # Broken off mid-body or past the deadline: break off too, so the caller sees
                # a truncated response; a timeout counts as no response at all.
                conn.relaying = None
                conn.close()
                self._finish(None if kind == "timeout" else up.status, False)
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
            self._internal_error()
            return
        self._finish(status, keep)

    def _internal_error(self) -> None:
        log.exception("internal error while proxying %r", self.req.url[:200])
        up = self.up
        up.fast = None
        up.abort()
        conn = self.conn
        conn.relaying = None
        status = None
        if not conn.responded:
            status = 500
            conn.send_error(self.req, 500, "internal", close=True)
        conn.close()
        self._finish(status, False)

    def _finish(self, status: int | None, keep: bool) -> None:
        self.ep.active_requests -= 1
        side = self.side
        if self.span is not None:
            self.span.end(status)
        side.telemetry.record(
            source=self.source,
            destination=side.service,
            destination_version=side.version,
            status=status,
            duration_s=side.loop.time() - self.req.started,
        )
        self.conn.fast_done(keep)
