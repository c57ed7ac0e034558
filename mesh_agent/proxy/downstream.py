"""The caller's side: a listener, its client connections (an ``asyncio.Protocol`` fed into an
httptools parser) and the request body on its way in.

Parser callbacks only collect bytes; one long-lived coroutine per connection serves its requests
in order (keep-alive and pipelining), so a request costs a few futures, not a task. A bodiless
request with nothing queued ahead of it may be answered by the listener's ``fast`` callable
instead, without any coroutine (see ``inbound.FastExchange``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from mesh_agent.proxy.contracts import ConfigHolder, Limits
from mesh_agent.proxy.errors import ClientGone
from mesh_agent.proxy.flow import BODY as HOLD_BODY
from mesh_agent.proxy.flow import PEER, PIPELINE, FlowControl
from mesh_agent.proxy.http1 import (
    H_CONN,
    H_EXPECT,
    H_HOST,
    H_RID,
    H_SRC,
    H_TP,
    H_XFF,
    MAX_HEADER_BYTES,
    PLAIN_CONNECTION,
    Request,
    connection_tokens,
    content_length_value,
    normalize_target,
    request_header_code,
    status_line,
)

if TYPE_CHECKING:
    from mesh_agent.proxy.upstream import Upstream

__all__ = ["HIGH_WATER", "Body", "Downstream", "Listener", "spawn"]

log = logging.getLogger("mesh_agent.proxy")

HIGH_WATER: Final = 256 * 1024  # request body bytes buffered before we stop reading the client


class Body:
    """A request body on its way from the client, with back-pressure on the client socket."""

    __slots__ = ("buffered", "chunks", "complete", "conn", "failed", "waiter")

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.failed = False
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self.conn.pause_reading(body=True)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self) -> None:
        self.failed = True
        self._wake()

    async def _wait(self) -> None:
        if self.failed:
            raise ClientGone
        fut = self.conn.loop.create_future()
        self.waiter = fut
        await fut
        if self.failed:
            raise ClientGone

    async def read_upto(self, limit: int) -> bytes | None:
        """The whole body if it fits in ``limit`` bytes, else None (chunks stay for streaming)."""
        while not self.complete and self.buffered <= limit:
            await self._wait()
        if self.buffered > limit:
            return None
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return data

    async def next_chunk(self) -> bytes | None:
        while not self.chunks:
            if self.complete:
                return None
            await self._wait()
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self.buffered < HIGH_WATER // 2:
            self.conn.resume_reading(body=True)
        return data


_PERCENT: Final = 0x25  # b"%"
_HASH: Final = 0x23  # b"#"
_DOT: Final = 0x2E  # b"."

# Connection phases, for the timeout sweeper.
IDLE: Final = 0
HEADERS: Final = 1
BODY: Final = 2
WAITING: Final = 3


class Downstream:
    """One caller's connection: an asyncio protocol by shape, not by base class (a Python base
    class would keep mypyc from compiling this as a native class; see ``mesh_agent.native``)."""

    __slots__ = (
        "_clock",
        "_fast",
        "_fast_next",
        "_header_bytes",
        "_header_count",
        "_keep_alive",
        "_method",
        "_parse",
        "_parse_error",
        "_req",
        "_send",
        "_task",
        "_upgrade",
        "_wake",
        "busy",
        "closed",
        "flow",
        "listener",
        "loop",
        "parser",
        "peer",
        "phase",
        "phase_since",
        "queue",
        "relaying",
        "responded",
        "transport",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl(self.loop)
        self.parser = parser = httptools.HttpRequestParser(self)
        # Methods called on every request, bound once: called by name, each call would look
        # the method up on its type first (docs/agent.md, "Speed").
        self._parse: Callable[[bytes], None] = parser.feed_data
        self._method: Callable[[], bytes] = parser.get_method
        self._keep_alive: Callable[[], bool] = parser.should_keep_alive
        self._upgrade: Callable[[], bool] = parser.should_upgrade
        self._clock: Callable[[], float] = self.loop.time
        self._send: Callable[[bytes], object] | None = None  # transport.write, once connected
        self.peer = b""
        self.queue: collections.deque[Request] = collections.deque()
        self._req: Request | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._parse_error: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self.busy = False
        # A request answered by the callback fast path is in flight (``_busy`` is set too);
        # the serving coroutine must not take queued requests until it is done.
        self._fast = False
        self._fast_next: Request | None = None
        self.closed = False
        self.phase = IDLE
        self.phase_since = self._clock()
        self.relaying: Upstream | None = None
        self.responded = False

    # -- the asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)
        self._send = self.transport.write
        listener = self.listener
        if len(listener.conns) >= listener.limits.max_connections:
            listener.overflowed += 1
            self.closed = True
            self.transport.abort()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
        listener.conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parse(data)
        except httptools.HttpParserUpgrade:
            self.fail_parse(501, "unsupported")
        except httptools.HttpParserError:
            status, reason = self._parse_error or (400, "malformed-request")
            self.fail_parse(status, reason)

    def eof_received(self) -> bool | None:
        return None  # the caller is done sending: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.conns.discard(self)
        req = self._req
        if req is not None and req.body is not None and not req.body.complete:
            req.body.fail()
        for r in self.queue:
            if r.body is not None and not r.body.complete:
                r.body.fail()
        up = self.relaying
        if up is not None:
            up.abort()
        self._wake_loop()
        self.flow.lost()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        up = self.relaying
        if up is not None:
            up.flow.hold(PEER)  # the caller cannot take more: stop reading the upstream

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        up = self.relaying
        if up is not None:
            up.flow.release(PEER)

    @property
    def write_paused(self) -> bool:
        return self.flow.write_paused

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._req = Request(self._clock())
        self._header_bytes = 0
        self._header_count = 0
        self.phase = HEADERS
        self.phase_since = self._req.started

    def on_url(self, url: bytes) -> None:
        req = self._req
        assert req is not None
        req.url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._parse_error = (414, "uri-too-long")
            raise ValueError("URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            self._parse_error = (431, "headers-too-large")
            raise ValueError("headers too large")
        self._header_count += 1
        if self._header_count > self.listener.limits.max_headers:
            self._parse_error = (431, "too-many-headers")
            raise ValueError("too many headers")
        code = request_header_code(name)
        if code < 0:
            req.headers.append((name, value))
        elif code == H_HOST:
            if req.host is not None:
                # Two hosts: one hop may route on the first, the next on the second.
                self._parse_error = (400, "duplicate-host")
                raise ValueError("duplicate Host")
            req.host = value
        elif code == H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif code == H_RID:
            req.request_id = value
        elif code == H_TP:
            req.traceparent = value
        elif code == H_SRC:
            req.source = value
        elif code == H_EXPECT:
            req.expect_continue = value.lower() == b"100-continue"
        elif code == H_CONN:
            tokens = connection_tokens(value)
            if b"keep-alive" in tokens:
                req.asked_keep_alive = True
            tokens -= PLAIN_CONNECTION
            if tokens:
                req.extra_hop = (req.extra_hop or set()) | tokens
        else:  # H_DROP
            lname = name.lower()
            if lname == b"content-length":
                req.content_length = content_length_value(value)
            elif lname == b"transfer-encoding":
                # Only plain "chunked" is understood; anything else ("gzip, chunked", two
                # Transfer-Encoding headers) would be re-framed wrongly, so it is refused.
                if req.chunked or value.strip().lower() != b"chunked":
                    self._parse_error = (501, "unsupported-transfer-coding")
                    raise ValueError("unsupported transfer coding")
                req.chunked = True

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        if self._upgrade():
            # CONNECT tunnels and protocol upgrades (WebSocket) are not proxied (yet); the
            # parser raises HttpParserUpgrade right after this and data_received answers 501.
            return
        req.method = self._method()
        req.keep_alive = keep_alive = self._keep_alive()
        # HTTP/1.0 keeps the connection only when asked to (Connection: keep-alive), 1.1 unless
        # told to close: a request kept alive without asking is 1.1. httptools formats a new
        # version string on every call, so it is asked only otherwise.
        req.http11 = (keep_alive and not req.asked_keep_alive) or (
            self.parser.get_http_version() == "1.1"
        )
        if req.host is None and req.http11:
            self._parse_error = (400, "missing-host")  # RFC 9112 section 3.2
            raise ValueError("missing Host")
        url = req.url
        if (
            _PERCENT in url
            or _HASH in url
            or url.find(b"//") >= 0
            or (_DOT in url and url.find(b"/.") >= 0)  # a path without a dot skips a find
        ):
            # Only then can normalisation change the target (an absolute-form target always
            # has "//"): the common origin-form path skips the call and the config lookup.
            # Not ``b"%" in url``: bytes.__contains__ first tries its argument as an int and
            # formats a TypeError to throw away, which cost more than the rest of this method.
            # A byte value (an int) or find() skips that.
            normal = normalize_target(url, self.listener.escaped_slashes())
            if normal is None:
                self._parse_error = (400, "invalid-path")
                raise ValueError("path refused by normalisation")
            req.url = normal
        if req.extra_hop:
            # Headers named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
            extra = req.extra_hop
            req.headers = [(n, v) for n, v in req.headers if n.lower() not in extra]
        if req.chunked or req.content_length:
            req.body = Body(self)
            if req.chunked:
                req.content_length = None
            self.phase = BODY
        else:
            self.phase = WAITING
            if not self.busy and not self.queue and self.listener.fast is not None:
                # No body and nothing ahead of it: a candidate for the fast path, decided in
                # on_message_complete (which follows at once) when the parser is done with it.
                self.phase_since = req.started
                self._fast_next = req
                return
        self.phase_since = self._clock()
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        """Queue a request for the serving coroutine."""
        self.queue.append(req)
        if self.busy or len(self.queue) > 1:
            # Pipelined request behind one in progress: stop reading until we catch up.
            self.pause_reading(body=False)
        if self._fast:
            return  # fast_done hands the queue to the coroutine
        if self._task is None:
            self._task = self.loop.create_task(self._serve())
        else:
            self._wake_loop()

    def on_body(self, body: bytes) -> None:
        req = self._req
        if req is not None and req.body is not None:
            req.body.feed(body)
            self.phase_since = self._clock()

    def on_message_complete(self) -> None:
        req = self._req
        if req is not None:
            if req.body is not None:
                req.body.finish()
            if self.phase == BODY:
                self.phase = WAITING
            self._req = None
            if self._fast_next is req:
                self._fast_next = None
                self._start_fast(req)

    def _start_fast(self, req: Request) -> None:
        fast = self.listener.fast
        assert fast is not None
        self.busy = self._fast = True
        self.responded = False
        try:
            taken = fast(self, req)
        except Exception:
            log.exception("internal error while proxying %r", req.url[:200])
            if not self.responded:
                self.send_error(req, 500, "internal", close=True)
            self.fast_done(False)
            return
        if not taken:
            self.busy = self._fast = False
            self._dispatch(req)

    def fast_done(self, keep: bool) -> None:
        """The fast path has answered its request: what ``_serve`` does after each request."""
        flow = self.flow
        if keep and flow.write_paused and not self.closed:
            # Let the client take the response before reading its next request.
            spawn(self.loop, self._drain_then_done())
            return
        self._fast = False
        self.busy = False
        if not keep or self.closed:
            self.close()
            return
        if self.queue:
            if self._task is None:
                self._task = self.loop.create_task(self._serve())
            else:
                self._wake_loop()
            return
        if self._req is None:
            self.phase = IDLE
        self.phase_since = self._clock()
        flow.release(PIPELINE)

    async def _drain_then_done(self) -> None:
        await self.drain()
        self.fast_done(not self.closed)

    def run_fast_fallback(self, req: Request, handler: Awaitable[bool]) -> None:
        """Finish a fast-path request in a coroutine (a retry on a fresh connection)."""
        spawn(self.loop, self._fallback(req, handler))

    async def _fallback(self, req: Request, handler: Awaitable[bool]) -> None:
        try:
            keep = await handler
        except ClientGone:
            keep = False
        except Exception:
            log.exception("internal error while proxying %r", req.url[:200])
            keep = False
            if not self.responded:
                self.send_error(req, 500, "internal", close=True)
        self.fast_done(keep)

    # -- flow control

    def pause_reading(self, *, body: bool) -> None:
        self.flow.hold(HOLD_BODY if body else PIPELINE)

    def resume_reading(self, *, body: bool) -> None:
        self.flow.release(HOLD_BODY if body else PIPELINE)

    async def drain(self) -> None:
        await self.flow.drain()

    # -- serving

    def _wake_loop(self) -> None:
        w = self._wake
        if w is not None:
            self._wake = None
            if not w.done():
                w.set_result(None)

    async def _serve(self) -> None:
        handle = self.listener.handle
        queue = self.queue
        try:
            while not self.closed:
                if not queue:
                    fut = self.loop.create_future()
                    self._wake = fut
                    await fut
                    continue
                req = queue.popleft()
                self.busy = True
                self.responded = False
                try:
                    if req.expect_continue and req.body is not None and not req.body.complete:
                        # We answer 100-continue ourselves: the body must reach us before we
                        # can pick an upstream for it (and buffer it for retries).
                        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    keep = await handle(self, req)
                except ClientGone:
                    keep = False
                except Exception:
                    log.exception("internal error while proxying %r", req.url[:200])
                    keep = False
                    if not self.responded:
                        self.send_error(req, 500, "internal", close=True)
                self.busy = False
                body = req.body
                if not keep or (body is not None and not body.complete) or self.closed:
                    self.close()
                    return
                if not queue:
                    self.phase = IDLE if self._req is None else self.phase
                    self.phase_since = self._clock()
                    self.resume_reading(body=False)
        finally:
            self._task = None

    def write(self, data: bytes) -> None:
        send = self._send
        if send is not None and not self.closed:
            send(data)

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        self.closed = True

    def send_error(
        self, req: Request | None, status: int, reason: str, *, close: bool = False
    ) -> bool:
        """An error made by the agent itself. Returns whether the connection stays open."""
        body = reason.encode() + b"\n"
        keep = (
            not close
            and req is not None
            and req.keep_alive
            # an unread request body would have to be drained first: closing is cheaper
            and (req.body is None or req.body.complete)
        )
        self.responded = True
        self.write(
            b"".join(
                (
                    status_line(status),
                    b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                    % len(body),
                    b"x-mesh-error: ",
                    reason.encode(),
                    b"\r\n",
                    b"" if keep else b"connection: close\r\n",
                    b"\r\n",
                    b"" if req is not None and req.method == b"HEAD" else body,
                )
            )
        )
        return keep

    def fail_parse(self, status: int, reason: str) -> None:
        if self.closed:
            return
        if self.busy or self.queue:
            # Cannot answer out of order on a pipelined connection: just close.
            self.close()
            return
        self.send_error(self._req, status, reason, close=True)
        self.close()

    def check_timeouts(self, now: float, limits: Limits) -> None:
        """Close this connection if it overstayed its phase (the listener sweeps each second)."""
        age = now - self.phase_since
        phase = self.phase
        if phase == IDLE and not self.busy:
            if age > limits.idle_timeout_s:
                self.close()
        elif phase == HEADERS and age > limits.header_timeout_s:
            self.fail_parse(408, "request-timeout")
            self.close()
        elif phase == BODY and age > limits.body_timeout_s:
            req = self._req
            if req is not None and req.body is not None:
                req.body.fail()
            self.close()

    @property
    def idle(self) -> bool:
        """Nothing in progress and nothing queued: safe to close when draining."""
        return not self.busy and not self.queue


class Listener:
    """One listening socket and its connections."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: Callable[[Downstream, Request], Any],
        limits: Limits,
        fast: Callable[[Downstream, Request], bool] | None = None,
        holder: ConfigHolder | None = None,
    ) -> None:
        self.loop = loop
        self.handle = handle
        self.holder = holder
        # Tries to answer a bodiless request from callbacks alone; False: use ``handle``.
        self.fast = fast
        self.limits = limits
        self.conns: set[Downstream] = set()
        self.overflowed = 0  # connections closed at once: over limits.max_connections
        self.server: asyncio.AbstractServer | None = None

    def escaped_slashes(self) -> str:
        holder = self.holder
        if holder is None:
            return "reject"
        return holder.current.config.path_normalization.escaped_slashes

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = server = await self.loop.create_server(
            lambda: cast(asyncio.BaseProtocol, Downstream(self)),
            host,
            port,
            reuse_address=True,
            backlog=1024,
        )
        # Any: uvloop's ``sockets`` is a list where the stubs say tuple, and compiled code
        # checks the stubs' type.
        untyped: Any = server
        sock = untyped.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def sweep(self, now: float) -> None:
        limits = self.limits
        for c in list(self.conns):
            c.check_timeouts(now, limits)

    async def close(self, drain_s: float) -> None:
        if self.server is not None:
            self.server.close()
        deadline = self.loop.time() + drain_s
        while self.loop.time() < deadline:
            for c in list(self.conns):
                if c.idle:
                    c.close()
            if not self.conns:
                break
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.close()


_TASKS: Final[set[asyncio.Task[None]]] = set()


def spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """A fire-and-forget task that is not garbage-collected while it runs."""
    task = loop.create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
