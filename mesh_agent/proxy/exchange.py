"""One request forwarded and its response relayed: what the inbound and outbound sides share.

``exchange`` sends a request on a pooled (or new) connection and returns at the response head;
``relay`` sends that response on to the caller. Small request bodies (up to
``RETRY_BUFFER_BYTES``) are buffered so that a retry or a mirror can resend them; larger ones are
streamed with back-pressure (``pump_body``) and never retried.

The callback-only fast path of both sides shares its setup here too: ``idle_connections`` finds a
connection that can take the request at once, ``Forwarder.begin_hop`` starts the span and builds
the head, ``send_fast`` hands the connection to a :class:`FastRelay` and writes the head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from mesh_agent.balancer import Endpoint
from mesh_agent.ids import new_request_id
from mesh_agent.proxy.contracts import SpanLike, TelemetryLike
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import ClientGone, Failure
from mesh_agent.proxy.flow import PEER
from mesh_agent.proxy.http1 import Request, response_head
from mesh_agent.proxy.upstream import Upstream, pool_of

__all__ = ["RETRY_BUFFER_BYTES", "FastRelay", "Forwarder", "idle_connections", "send_fast"]

log = logging.getLogger("mesh_agent.proxy")

RETRY_BUFFER_BYTES: Final = 64 * 1024


def idle_connections(ep: Endpoint) -> list[Upstream] | None:
    """The endpoint's idle pooled connections, the closed ones on top dropped, or None when
    none is left. The fast path takes one with ``pop()`` only once nothing can fail any more,
    so that no connection is ever left out of the pool."""
    pool = ep.pool
    if pool is None:
        return None
    # Not typing.cast: that is a Python-level call, on every request.
    idle: list[Upstream] = pool.idle  # type: ignore[attr-defined]
    while idle and idle[-1].closed:
        idle.pop()
    return idle or None


def send_fast(
    up: Upstream, req: Request, relay: FastRelay, head: bytes, body_deadline: float | None = None
) -> None:
    """Hand ``up`` to ``relay`` (its parser callbacks drive it from now on) and send the head."""
    up.begin_fast(req.method == b"HEAD", relay, body_deadline)
    send = up.send
    assert send is not None
    send(head)


class Forwarder:
    """The exchange machinery of one agent, shared by its inbound and outbound sides (and
    mirroring): it owns the tasks that outlive a request (body pumps, mirrors)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, telemetry: TelemetryLike, service: str
    ) -> None:
        self.loop = loop
        self.clock: Callable[[], float] = loop.time  # bound once: called on every request
        self.telemetry = telemetry
        self.source_header = b"x-mesh-source: " + service.encode() + b"\r\n"
        self.background: set[asyncio.Task[None]] = set()

    def run_in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def cancel_background(self) -> None:
        for t in list(self.background):
            t.cancel()

    async def exchange(
        self,
        ep: Endpoint,
        req: Request,
        head: bytes,
        body: bytes | None,
        deadline: float,
        max_conns: int,
        max_pending: int,
        connect_timeout: float,
        *,
        body_deadline: float | None = None,
        fresh: bool = False,
    ) -> Upstream:
        """Send one request to ``ep`` and return once its response head has arrived.

        The head must arrive by ``deadline``, the rest of the response by ``body_deadline``
        (default: ``deadline``), else the connection is aborted and waiting on it fails with
        ``Failure("timeout")``. ``body`` None means stream ``req.body`` (never retried). A
        reused keep-alive connection that the upstream closed just as we sent on it is retried
        once on a fresh connection: the upstream never saw that request. ``fresh``: that
        retry, after the fast path found its pooled connection closed.
        """
        loop = self.loop
        if body_deadline is None:
            body_deadline = deadline
        for _ in range(2):
            up, reused = await pool_of(ep, loop).acquire(
                max_conns, max_pending, connect_timeout, deadline, fresh=fresh
            )
            waiter = up.begin(req.method == b"HEAD", deadline, body_deadline)
            transport = up.transport
            assert transport is not None
            pump: asyncio.Task[None] | None = None
            if body is not None:
                transport.write(head + body if len(body) < 16384 else head)
                if len(body) >= 16384:
                    transport.write(body)
            else:
                transport.write(head)
                pump = loop.create_task(self.pump_body(req, up))
            try:
                await waiter
            except Failure as f:
                if pump is not None:
                    pump.cancel()
                up.abort()
                if f.kind == "reset" and reused and not up.got_bytes and body is not None:
                    continue
                raise
            if pump is not None and not pump.done():
                # The upstream answered before taking the whole body: let the pump finish in
                # the background; if it cannot, the connection will not be reused.
                self.background.add(pump)
                pump.add_done_callback(self.background.discard)
            return up
        raise Failure("reset")

    async def pump_body(self, req: Request, up: Upstream) -> None:
        body = req.body
        assert body is not None
        transport = up.transport
        assert transport is not None
        chunked = req.content_length is None
        up.pumping = True
        try:
            while True:
                chunk = await body.next_chunk()
                if chunk is None:
                    break
                if up.closed:
                    return
                if chunked:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                if up.write_paused:
                    await up.drain()
            if chunked and not up.closed:
                transport.write(b"0\r\n\r\n")
            up.pumping = False
        except (ClientGone, Failure):
            up.abort()
        except asyncio.CancelledError:
            up.abort()
            raise

    def begin_hop(
        self,
        conn: Downstream,
        req: Request,
        path: bytes,
        authority: bytes | None,
        body: bytes | None,
        kind: str,
        outbound: bool,
    ) -> tuple[SpanLike | None, bytes | None, bytes]:
        """This hop's span (None when not sampled; the caller describes it), the traceparent
        sent upstream and the whole head to send, with the trace context, request id and
        forwarding headers of this hop. A request that came without an id gets one
        (``req.request_id``), kept for its copies."""
        span, tp = self.telemetry.begin(kind, req.traceparent)
        request_id = req.request_id
        if request_id is None:
            request_id = req.request_id = new_request_id()
        return span, tp, self.build_head(conn, req, path, authority, body, tp, request_id, outbound)

    def build_head(
        self,
        conn: Downstream,
        req: Request,
        path: bytes,
        host: bytes | None,
        body: bytes | None,
        traceparent: bytes | None,
        request_id: bytes,
        outbound: bool,
    ) -> bytes:
        """The whole request head for the upstream: the caller's headers without the hop-by-hop
        ones, this hop's request id, trace context and forwarding headers, and the framing
        of the body as it will be sent. Built with ``%b`` formatting, which compiled code
        turns into one allocation of the right size (a list and a join cost more)."""
        headers = req.headers
        forwarded = b"".join([b"%b: %b\r\n" % (n, v) for n, v in headers]) if headers else b""
        if body is not None:
            if body or req.body is not None or req.method in (b"POST", b"PUT", b"PATCH"):
                framing = b"content-length: %d\r\n" % len(body)
            else:
                framing = b""
        elif req.content_length is not None:
            framing = b"content-length: %d\r\n" % req.content_length
        else:
            framing = b"transfer-encoding: chunked\r\n"
        xff = conn.peer if req.xff is None else req.xff + b", " + conn.peer
        return b"%b %b HTTP/1.1\r\n%b%bx-request-id: %b\r\n%b%b%bx-forwarded-for: %b\r\n\r\n" % (
            req.method,
            path,
            b"" if host is None else b"host: %b\r\n" % host,
            forwarded,
            request_id,
            b"" if traceparent is None else b"traceparent: %b\r\n" % traceparent,
            self.source_header if outbound else b"",
            framing,
            xff,
        )

    @staticmethod
    async def read_body(req: Request) -> bytes | None:
        """The request body if small enough to keep for retries and mirroring, else None."""
        b = req.body
        if b is None:
            return b""
        if req.content_length is not None and req.content_length > RETRY_BUFFER_BYTES:
            return None
        return await b.read_upto(RETRY_BUFFER_BYTES)

    async def relay(self, conn: Downstream, req: Request, up: Upstream) -> bool:
        """Send the chosen response to the caller. Returns whether the caller connection may be
        kept open. The connection's timer enforces the route deadline on the body meanwhile: if
        it passes, ``up.failure`` is "timeout" when this returns."""
        parts, keep, chunked, no_body = response_head(req, up.status, up, conn.closed)
        if up.body_parts and not no_body:
            buffered = b"".join(up.body_parts)
            up.body_parts = []
            if chunked:
                parts.append(b"%x\r\n%b\r\n" % (len(buffered), buffered))
            else:
                parts.append(buffered)
        conn.responded = True
        conn.write(b"".join(parts))
        if not up.complete and not no_body:
            up.sink = conn
            up.sink_chunked = chunked
            conn.relaying = up
            if conn.write_paused:
                up.flow.hold(PEER)
            try:
                await up.wait_done()
            except Failure:
                # The upstream broke off mid-body or the route deadline passed: all we can do
                # is break off too, so that the caller sees a truncated response rather than a
                # silently short one.
                conn.relaying = None
                conn.close()
                return False
            conn.relaying = None
            up.flow.release(PEER)
            if chunked:
                conn.write(b"0\r\n\r\n")
        if conn.write_paused:
            await conn.drain()
        return keep

    def release(self, up: Upstream) -> None:
        if up.complete and not up.closed:
            up.pool.release(up, self.clock())
        else:
            up.abort()

    def record(
        self, req: Request, source: str, destination: str, version: str, status: int
    ) -> None:
        """Metrics for a request the agent answered itself."""
        self.telemetry.record(source, destination, version, status, self.clock() - req.started)


class FastRelay:
    """One request relayed from callbacks, the part both sides share: the upstream's parser
    callbacks write the response head and body to the caller, the end releases the connection,
    ends the span, counts the request (:meth:`record`, per side) and tells the caller's
    connection it may go on. Subclasses decide what a failure (:meth:`fail`) means."""

    __slots__ = (
        "chunked",
        "conn",
        "deadline",
        "ep",
        "forwarder",
        "head_bytes",
        "headed",
        "keep",
        "req",
        "span",
        "up",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        conn: Downstream,
        req: Request,
        up: Upstream,
        ep: Endpoint,
        head_bytes: bytes,
        span: SpanLike | None,
        deadline: float,
    ) -> None:
        self.forwarder = forwarder
        self.conn = conn
        self.req = req
        self.up = up
        self.ep = ep
        self.head_bytes = head_bytes
        self.span = span
        self.deadline = deadline
        self.headed = False
        self.keep = False
        self.chunked = False

    def head(self) -> None:
        """The response head arrived (called from the upstream parser)."""
        try:
            self.relay_head()
        except Exception:
            self.internal_error()

    def relay_head(self) -> None:
        """Send the response head on to the caller; the body follows from the parser."""
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
            if conn.flow.write_paused:
                up.flow.hold(PEER)

    def done(self) -> None:
        """The whole response went to the caller (called once the parser returned)."""
        try:
            up = self.up
            conn = self.conn
            conn.relaying = None
            if self.chunked:
                conn.write(b"0\r\n\r\n")
            up.flow.release(PEER)
            self.forwarder.release(up)
        except Exception:
            self.internal_error()
            return
        self.finish(up.status, self.keep)

    def fail(self, kind: str) -> None:
        raise NotImplementedError

    def break_off(self, kind: str) -> None:
        """Broken off mid-body or past the deadline: break off too, so the caller sees a
        truncated response; a timeout counts as no response at all."""
        conn = self.conn
        conn.relaying = None
        conn.close()
        self.finish(None if kind == "timeout" else self.up.status, False)

    def internal_error(self) -> None:
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
        self.finish(status, False)

    def record(self, status: int | None) -> None:
        raise NotImplementedError

    def finish(self, status: int | None, keep: bool) -> None:
        self.ep.active_requests -= 1
        if self.span is not None:
            self.span.end(status)
        self.record(status)
        self.conn.fast_done(keep)
