"""The hot path: inbound and outbound HTTP/1.1 listeners on asyncio protocols and httptools.

Design, in the order a request meets it:

* ``_Downstream`` is a bare ``asyncio.Protocol`` fed into an httptools parser. Parser callbacks
  only collect bytes; one long-lived coroutine per connection serves its requests in order
  (keep-alive and pipelining), so a request costs a few futures, not a task.
* Small request bodies (up to ``RETRY_BUFFER_BYTES``) are buffered so that a retry or a mirror
  can resend them; larger ones are streamed with back-pressure and never retried.
* Upstream connections (``_Upstream``) live in a per-endpoint pool and are reused while the
  upstream keeps them alive. Once a response is chosen for the caller, its body bytes are written
  to the downstream transport straight from the parser callback, with back-pressure both ways.
* Fast path: a bodiless inbound request with nothing queued ahead of it and an idle pooled
  connection to the app needs no coroutine at all. It is forwarded from the downstream parser
  callback and relayed by ``_FastExchange`` from the upstream parser callbacks. Anything
  unusual (no idle connection, a rate limit, a body, pipelined requests behind it, a pooled
  connection found closed) goes to the coroutine path, which remains the reference behaviour.
* Deadlines: each upstream connection keeps one lazily re-armed timer (``_Upstream.timer``)
  instead of a timer per request, on both paths. Before the response head, reaching the
  deadline is a 504; after it, while the body is relayed, the upstream connection is aborted and
  the caller's connection closed, so a stalled body cannot hang the caller.
* Each request reads ``ConfigHolder.current`` once at its start and uses that immutable object
  to its end: a config swap never changes a request in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools

from mesh_agent.balancer import Endpoint, EndpointRegistry
from mesh_agent.resilience import RetryRules, percent_chance
from mesh_agent.routing import (
    CompiledConfig,
    CompiledRoute,
    CompiledService,
    Inbound,
    VersionPool,
)

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

log = logging.getLogger("mesh_agent.proxy")

MAX_HEADER_BYTES = 64 * 1024
RETRY_BUFFER_BYTES = 64 * 1024
_HIGH_WATER = 256 * 1024  # request body bytes buffered before we stop reading the client
_MAX_MIRRORS_IN_FLIGHT = 64


class Limits:
    """Slow-client and idle timeouts in seconds and the caps on what a client may make the
    agent hold (bootstrap settings, not pushed config).

    Memory a listener can be made to hold for request heads is bounded by ``max_connections``
    x (``MAX_HEADER_BYTES`` + ``max_headers`` x the cost of one parsed header): with the
    defaults, about 1024 x 100 KiB = 100 MiB per listener, and nothing past the header timeout.
    """

    __slots__ = (
        "body_timeout_s",
        "drain_timeout_s",
        "header_timeout_s",
        "idle_timeout_s",
        "max_connections",
        "max_headers",
        "upstream_idle_s",
    )

    def __init__(
        self,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        upstream_idle_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        max_connections: int = 1024,
        max_headers: int = 100,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.upstream_idle_s = upstream_idle_s
        self.drain_timeout_s = drain_timeout_s
        # Per listener: a connection past it is closed as soon as it is accepted.
        self.max_connections = max_connections
        # Per request head (Envoy's default too): many tiny headers cost far more memory once
        # parsed than their bytes on the wire.
        self.max_headers = max_headers


class SpanLike(Protocol):
    def traceparent(self) -> bytes: ...
    def end(self, status: int | None) -> None: ...


class TelemetryLike(Protocol):
    """What the proxy needs from ``mesh_agent.telemetry.Telemetry``."""

    def record(
        self,
        *,
        source: str,
        destination: str,
        destination_version: str,
        status: int | None,
        duration_s: float,
    ) -> None: ...

    def start_span(
        self, *, name: str, kind: str, traceparent: bytes | None, attributes: dict[str, str]
    ) -> SpanLike | None: ...

    def outgoing_traceparent(self, incoming: bytes | None) -> bytes | None: ...


class ConfigHolder:
    """The config in force. Swapping is one attribute assignment, atomic for every reader."""

    __slots__ = ("current",)

    def __init__(self, current: CompiledConfig) -> None:
        self.current = current


# --------------------------------------------------------------------------------------------
# Header tables

# RFC 9110 section 7.6.1 (plus the de-facto Proxy-Connection and Keep-Alive): never forwarded.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the agent rewrites itself; codes tell on_header where to put them.
_H_HOST, _H_XFF, _H_RID, _H_TP, _H_SRC, _H_EXPECT, _H_CONN, _H_DROP = range(8)
_REQUEST_SPECIAL: dict[bytes, int] = {
    b"host": _H_HOST,
    b"x-forwarded-for": _H_XFF,
    b"x-request-id": _H_RID,
    b"traceparent": _H_TP,
    b"x-mesh-source": _H_SRC,
    b"expect": _H_EXPECT,
    b"connection": _H_CONN,
    b"content-length": _H_DROP,  # framing is re-decided for the upstream side
}
for _name in _HOP_BY_HOP - {b"connection"}:
    _REQUEST_SPECIAL[_name] = _H_DROP
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length"}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

_getrandbits = random.getrandbits

_STATUS_LINE: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINE.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)  # RFC 3986 section 2.3: decoding these never changes what a path means
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
_SLASHES = (0x2F, 0x5C)  # "/" and "\\"
_MULTI_SLASH = re.compile(rb"//+")


def normalize_path(path: bytes, escaped_slashes: str = "reject") -> bytes | None:
    """An origin-form path (no query) normalised as Envoy does before route matching, so that
    ``/public/../admin``, ``/public/%2e%2e/admin`` and ``//admin`` cannot slip past a prefix
    route: percent-encoded unreserved characters decoded (other escapes kept, upper-cased),
    repeated slashes merged, ``.`` and ``..`` segments removed (RFC 3986 section 5.2.4).
    Encoded slashes (``%2F``, ``%5C``) follow ``escaped_slashes``: "reject", "keep" or
    "unescape". None: the path is to be refused (a bad escape, or a rejected encoded slash)."""
    if b"%" in path:
        out = bytearray()
        i = 0
        n = len(path)
        while i < n:
            c = path[i]
            if c != 0x25:
                out.append(c)
                i += 1
                continue
            hi = path[i + 1 : i + 3]
            if len(hi) != 2 or hi[0] not in _HEXDIGITS or hi[1] not in _HEXDIGITS:
                return None
            value = int(hi, 16)
            if value in _UNRESERVED:
                out.append(value)
            elif value in _SLASHES and escaped_slashes != "keep":
                if escaped_slashes == "reject":
                    return None
                out.append(value)
            else:
                out += b"%" + hi.upper()
            i += 3
        path = bytes(out)
    if b"//" in path:
        path = _MULTI_SLASH.sub(b"/", path)
    if b"/." in path:
        segments = path.split(b"/")
        kept: list[bytes] = []
        for seg in segments[1:]:
            if seg == b"..":
                if kept:
                    kept.pop()
            elif seg != b".":
                kept.append(seg)
        if segments[-1] in (b".", b".."):
            kept.append(b"")  # "/a/b/.." is "/a/": the result names a directory
        path = b"/" + b"/".join(kept)
    return path


def normalize_target(url: bytes, escaped_slashes: str) -> bytes | None:
    """The request target with its path normalised (origin or absolute form) and any
    ``#fragment`` dropped (a client must not send one; RFC 9112 section 3.2). None: refuse."""
    hash_at = url.find(b"#")
    if hash_at >= 0:
        url = url[:hash_at]
    if url[:1] == b"/":
        start = 0
    elif url[:7].lower() == b"http://":
        start = url.find(b"/", 7)
        if start < 0:
            return url
    else:
        return url  # "*", authority form: nothing to normalise
    q = url.find(b"?", start)
    path = url[start:] if q < 0 else url[start:q]
    if b"%" not in path and b"//" not in path and b"/." not in path:
        return url  # the common case costs three scans and no copy
    normal = normalize_path(path, escaped_slashes)
    if normal is None:
        return None
    return url[:start] + normal + (b"" if q < 0 else url[q:])


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


class _Failure(Exception):
    """An attempt that produced no usable response. ``kind``: connect-failure, reset, timeout,
    overflow."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _ClientGone(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Downstream side


class _Body:
    """A request body on its way from the client, with back-pressure on the client socket."""

    __slots__ = ("buffered", "chunks", "complete", "conn", "failed", "waiter")

    def __init__(self, conn: _Downstream) -> None:
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
        if self.buffered > _HIGH_WATER:
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
            raise _ClientGone
        fut = self.conn.loop.create_future()
        self.waiter = fut
        await fut
        if self.failed:
            raise _ClientGone

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
        if self.buffered < _HIGH_WATER // 2:
            self.conn.resume_reading(body=True)
        return data


class _Request:
    __slots__ = (
        "body",
        "chunked",
        "content_length",
        "expect_continue",
        "extra_hop",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "method",
        "request_id",
        "source",
        "started",
        "traceparent",
        "url",
        "xff",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.request_id: bytes | None = None
        self.traceparent: bytes | None = None
        self.source: bytes | None = None
        self.expect_continue = False
        self.extra_hop: set[bytes] | None = None
        self.keep_alive = True
        self.http11 = True
        self.content_length: int | None = None
        self.chunked = False
        self.body: _Body | None = None

    def lookup(self) -> dict[bytes, bytes]:
        """Lower-cased header map for header-based routing (built only when a route needs it)."""
        d = {n.lower(): v for n, v in self.headers}
        if self.host is not None:
            d[b"host"] = self.host
        return d


# Connection phases, for the timeout sweeper.
_IDLE, _HEADERS, _BODY, _WAITING = range(4)


class _Downstream(asyncio.Protocol):
    __slots__ = (
        "_body_paused",
        "_busy",
        "_fast",
        "_fast_next",
        "_header_bytes",
        "_header_count",
        "_parse_error",
        "_pipeline_paused",
        "_req",
        "_task",
        "_wake",
        "closed",
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
        "write_paused",
        "write_waiter",
    )

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self.queue: collections.deque[_Request] = collections.deque()
        self._req: _Request | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._parse_error: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._busy = False
        # A request answered by the callback fast path is in flight (``_busy`` is set too);
        # the serving coroutine must not take queued requests until it is done.
        self._fast = False
        self._fast_next: _Request | None = None
        self._body_paused = False
        self._pipeline_paused = False
        self.closed = False
        self.phase = _IDLE
        self.phase_since = self.loop.time()
        self.relaying: _Upstream | None = None
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.responded = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
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
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_parse(501, "unsupported")
        except httptools.HttpParserError:
            status, reason = self._parse_error or (400, "malformed-request")
            self._fail_parse(status, reason)

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
        w = self.write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.relaying
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.relaying
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()
        w = self.write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._req = _Request(self.loop.time())
        self._header_bytes = 0
        self._header_count = 0
        self.phase = _HEADERS
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
        code = _REQUEST_SPECIAL.get(name.lower())
        if code is None:
            req.headers.append((name, value))
        elif code == _H_HOST:
            if req.host is not None:
                # Two hosts: one hop may route on the first, the next on the second.
                self._parse_error = (400, "duplicate-host")
                raise ValueError("duplicate Host")
            req.host = value
        elif code == _H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif code == _H_RID:
            req.request_id = value
        elif code == _H_TP:
            req.traceparent = value
        elif code == _H_SRC:
            req.source = value
        elif code == _H_EXPECT:
            req.expect_continue = value.lower() == b"100-continue"
        elif code == _H_CONN:
            tokens = _connection_tokens(value) - {b"close", b"keep-alive"}
            if tokens:
                req.extra_hop = (req.extra_hop or set()) | tokens
        else:  # _H_DROP
            lname = name.lower()
            if lname == b"content-length":
                req.content_length = int(value) if value.strip().isdigit() else None
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
        parser = self.parser
        if parser.should_upgrade():
            # CONNECT tunnels and protocol upgrades (WebSocket) are not proxied (yet); the
            # parser raises HttpParserUpgrade right after this and data_received answers 501.
            return
        req.method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        req.http11 = parser.get_http_version() == "1.1"
        if req.host is None and req.http11:
            self._parse_error = (400, "missing-host")  # RFC 9112 section 3.2
            raise ValueError("missing Host")
        url = normalize_target(req.url, self.listener.escaped_slashes())
        if url is None:
            self._parse_error = (400, "invalid-path")
            raise ValueError("path refused by normalisation")
        req.url = url
        if req.extra_hop:
            # Headers named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
            extra = req.extra_hop
            req.headers = [(n, v) for n, v in req.headers if n.lower() not in extra]
        if req.chunked or req.content_length:
            req.body = _Body(self)
            if req.chunked:
                req.content_length = None
            self.phase = _BODY
        else:
            self.phase = _WAITING
            if not self._busy and not self.queue and self.listener.fast is not None:
                # No body and nothing ahead of it: a candidate for the fast path, decided in
                # on_message_complete (which follows at once) when the parser is done with it.
                self.phase_since = req.started
                self._fast_next = req
                return
        self.phase_since = self.loop.time()
        self._dispatch(req)

    def _dispatch(self, req: _Request) -> None:
        """Queue a request for the serving coroutine."""
        self.queue.append(req)
        if self._busy or len(self.queue) > 1:
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
            self.phase_since = self.loop.time()

    def on_message_complete(self) -> None:
        req = self._req
        if req is not None:
            if req.body is not None:
                req.body.finish()
            if self.phase == _BODY:
                self.phase = _WAITING
            self._req = None
            if self._fast_next is req:
                self._fast_next = None
                self._start_fast(req)

    def _start_fast(self, req: _Request) -> None:
        fast = self.listener.fast
        assert fast is not None
        self._busy = self._fast = True
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
            self._busy = self._fast = False
            self._dispatch(req)

    def fast_done(self, keep: bool) -> None:
        """The fast path has answered its request: what ``_serve`` does after each request."""
        if keep and self.write_paused and not self.closed:
            # Let the client take the response before reading its next request.
            _spawn(self.loop, self._drain_then_done())
            return
        self._fast = False
        self._busy = False
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
            self.phase = _IDLE
        self.phase_since = self.loop.time()
        self.resume_reading(body=False)

    async def _drain_then_done(self) -> None:
        await self.drain()
        self.fast_done(not self.closed)

    def run_fast_fallback(self, req: _Request, handler: Awaitable[bool]) -> None:
        """Finish a fast-path request in a coroutine (a retry on a fresh connection)."""
        _spawn(self.loop, self._fallback(req, handler))

    async def _fallback(self, req: _Request, handler: Awaitable[bool]) -> None:
        try:
            keep = await handler
        except _ClientGone:
            keep = False
        except Exception:
            log.exception("internal error while proxying %r", req.url[:200])
            keep = False
            if not self.responded:
                self.send_error(req, 500, "internal", close=True)
        self.fast_done(keep)

    # -- flow control

    def pause_reading(self, *, body: bool) -> None:
        if body:
            self._body_paused = True
        else:
            self._pipeline_paused = True
        t = self.transport
        if t is not None and not self.closed:
            t.pause_reading()

    def resume_reading(self, *, body: bool) -> None:
        if body:
            if not self._body_paused:
                return
            self._body_paused = False
        else:
            if not self._pipeline_paused:
                return
            self._pipeline_paused = False
        t = self.transport
        if t is not None and not self.closed and not (self._body_paused or self._pipeline_paused):
            t.resume_reading()

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            fut = self.loop.create_future()
            self.write_waiter = fut
            await fut

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
                self._busy = True
                self.responded = False
                try:
                    if req.expect_continue and req.body is not None and not req.body.complete:
                        # We answer 100-continue ourselves: the body must reach us before we
                        # can pick an upstream for it (and buffer it for retries).
                        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    keep = await handle(self, req)
                except _ClientGone:
                    keep = False
                except Exception:
                    log.exception("internal error while proxying %r", req.url[:200])
                    keep = False
                    if not self.responded:
                        self.send_error(req, 500, "internal", close=True)
                self._busy = False
                body = req.body
                if not keep or (body is not None and not body.complete) or self.closed:
                    self.close()
                    return
                if not queue:
                    self.phase = _IDLE if self._req is None else self.phase
                    self.phase_since = self.loop.time()
                    self.resume_reading(body=False)
        finally:
            self._task = None

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.write(data)

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        self.closed = True

    def send_error(
        self, req: _Request | None, status: int, reason: str, *, close: bool = False
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
                    _status_line(status),
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

    def _fail_parse(self, status: int, reason: str) -> None:
        if self.closed:
            return
        if self._busy or self.queue:
            # Cannot answer out of order on a pipelined connection: just close.
            self.close()
            return
        self.send_error(self._req, status, reason, close=True)
        self.close()


# --------------------------------------------------------------------------------------------
# Upstream side


class _Pool:
    """Idle connections to one endpoint plus the connection limit bookkeeping."""

    __slots__ = ("endpoint", "idle", "open", "retired", "waiters")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        # Set when no config references the endpoint any more: connections still busy with
        # requests from the old config are closed when done instead of idling unswept.
        self.retired = False
        self.idle: list[_Upstream] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[_Upstream | None]] = collections.deque()

    def connection_gone(self, conn: _Upstream) -> None:
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake_one(None)

    def _wake_one(self, conn: _Upstream | None) -> bool:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return True
        return False

    def release(self, conn: _Upstream, now: float) -> None:
        if conn.reusable() and not self.retired:
            if not self._wake_one(conn):
                conn.idle_since = now
                self.idle.append(conn)
        else:
            conn.abort()

    def close_idle(self, older_than: float) -> None:
        for c in [c for c in self.idle if c.idle_since < older_than]:
            c.abort()


class _Upstream(asyncio.Protocol):
    __slots__ = (
        "_informational",
        "_parser_dirty",
        "body_deadline",
        "body_parts",
        "chunked",
        "closed",
        "complete",
        "content_length",
        "deadline",
        "discard",
        "done_waiter",
        "failure",
        "fast",
        "got_bytes",
        "head_request",
        "head_waiter",
        "headers",
        "idle_since",
        "keep_alive",
        "loop",
        "out",
        "parser",
        "pool",
        "pumping",
        "sink",
        "sink_chunked",
        "status",
        "timer",
        "timer_at",
        "transport",
        "until_close",
        "write_paused",
        "write_waiter",
    )

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False
        self.closed = False
        self.idle_since = 0.0
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.pumping = False
        # Bytes for the caller collected while the parser runs, written once it returns.
        self.out: list[bytes] = []
        self.fast: _FastExchange | None = None
        # One lazily re-armed deadline timer per connection (a timer per request costs more
        # than the rest of the exchange's bookkeeping): it fires at ``timer_at``, which is never
        # later than the exchange's ``deadline``, and re-arms itself if the deadline moved on.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        # The exchange times out at ``deadline``; once the head has arrived that becomes
        # ``body_deadline`` (the route deadline, never earlier), which the body must meet.
        self.deadline = 0.0
        self.body_deadline = 0.0
        self._reset_exchange(False)

    def _reset_exchange(self, head_request: bool) -> None:
        self.head_request = head_request
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_parts: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.until_close = False
        self.complete = False
        # Why the exchange ended without a complete response (a _Failure kind), if it did.
        self.failure: str | None = None
        self.keep_alive = False
        self.got_bytes = False
        self.discard = False
        self._informational = False
        self.sink: _Downstream | None = None
        self.sink_chunked = False
        self.head_waiter: asyncio.Future[None] | None = None
        self.done_waiter: asyncio.Future[None] | None = None

    def begin(
        self, head_request: bool, deadline: float, body_deadline: float
    ) -> asyncio.Future[None]:
        """An exchange awaited by a coroutine: the future resolves with the response head, or
        fails with ``_Failure("timeout")`` at ``deadline``. After the head, the body must be
        complete by ``body_deadline`` (>= ``deadline``) or the connection is aborted."""
        if self._parser_dirty:
            self.parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self._reset_exchange(head_request)
        fut = self.head_waiter = self.loop.create_future()
        self._arm(deadline, body_deadline)
        return fut

    def begin_fast(self, head_request: bool, fast: _FastExchange) -> None:
        """An exchange driven by callbacks: ``fast`` hears of the head, the end and failures;
        ``fast.deadline`` is when it times out, before the head (504) or during the body."""
        if self._parser_dirty:
            self.parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self._reset_exchange(head_request)
        self.fast = fast
        self._arm(fast.deadline, fast.deadline)

    def _arm(self, deadline: float, body_deadline: float) -> None:
        self.deadline = deadline
        self.body_deadline = body_deadline
        timer = self.timer
        if timer is not None:
            if self.timer_at <= deadline < math.inf:
                return  # fires first; _on_timer re-arms for this deadline
            timer.cancel()
            self.timer = None
        if deadline == math.inf:
            return  # timeout_ms 0: no timer at all
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.complete or self.closed or self.failure is not None:
            return  # no exchange in flight; the next one arms the timer again
        deadline = self.deadline
        if deadline == math.inf:
            return  # the exchange now in flight has no timeout
        if self.loop.time() < deadline:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        if not self.status:
            # No response head yet: the exchange fails and the caller gets a 504.
            fast = self.fast
            if fast is not None:
                self.fast = None
                fast.fail("timeout")
            else:
                self.expire()
            return
        # The head went to the caller but the body is not complete by the route deadline: the
        # connection is out of sync and is aborted; the caller's connection is broken off.
        log.debug(
            "route timeout during the response body from %s:%s (status %d): aborting",
            self.pool.endpoint.host,
            self.pool.endpoint.port,
            self.status,
        )
        self.abort("timeout")

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and not self.until_close
            # still sending a request body the upstream did not wait for
            and not self.pumping
        )

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.complete:
            # Bytes after the response ended (on an idle pooled connection, say): the
            # connection is out of sync with us and cannot be trusted again.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._flush()
            self._fail("reset")
            self.abort()
            return
        if self.out:
            self._flush()
        fast = self.fast
        if fast is not None and self.complete:
            self.fast = None
            fast.done()

    def _flush(self) -> None:
        out = self.out
        sink = self.sink
        if sink is not None and out:
            sink.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        self.pool.connection_gone(self)
        if not self.complete:
            if self.until_close and self.status and self.failure is None:
                # A response delimited by the end of the connection is now complete.
                self._finish()
                fast = self.fast
                if fast is not None:
                    self.fast = None
                    fast.done()
            else:
                self._fail("reset")
        w = self.write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            fut = self.loop.create_future()
            self.write_waiter = fut
            await fut
        if self.closed and not self.complete:
            raise _Failure("reset")

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        n = name.lower()
        if n == b"content-length":
            v = value.strip()
            self.content_length = int(v) if v.isdigit() else None
        elif n == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) are not relayed.
            self._informational = True
            self.headers = []
            self.content_length = None
            self.chunked = False
            return
        self.status = status
        self.deadline = self.body_deadline
        self.keep_alive = parser.should_keep_alive()
        chunked = self.chunked
        no_body = self.head_request or status in (204, 304)
        self.until_close = not no_body and not chunked and self.content_length is None
        fast = self.fast
        if fast is not None:
            fast.head()
        else:
            w = self.head_waiter
            if w is not None:
                self.head_waiter = None
                if not w.done():
                    w.set_result(None)
        if self.head_request:
            # httptools cannot be told that a HEAD response has no body; the message is
            # complete now and the parser is replaced before the next exchange.
            self._parser_dirty = True
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.discard or self.complete:
            return
        if self.sink is not None:
            if self.sink_chunked:
                self.out.append(b"%x\r\n%b\r\n" % (len(body), body))
            else:
                self.out.append(body)
        else:
            self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self.complete:
            self._finish()

    # -- exchange helpers

    def _finish(self) -> None:
        self.complete = True
        w = self.done_waiter
        if w is not None:
            self.done_waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, kind: str) -> None:
        if self.failure is None:
            self.failure = kind
        fast = self.fast
        if fast is not None:
            self.fast = None
            fast.fail(kind)
        for attr in ("head_waiter", "done_waiter"):
            w = getattr(self, attr)
            if w is not None:
                setattr(self, attr, None)
                if not w.done():
                    w.set_exception(_Failure(kind))

    def expire(self) -> None:
        """Per-try or route deadline reached before the response head (``_exchange`` then
        aborts the connection)."""
        w = self.head_waiter
        if w is not None and not w.done():
            self.head_waiter = None
            w.set_exception(_Failure("timeout"))

    def wait_done(self) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if self.complete:
            fut.set_result(None)
        elif self.failure is not None or self.closed:
            fut.set_exception(_Failure(self.failure or "reset"))
        else:
            self.done_waiter = fut
        return fut

    def abort(self, kind: str = "reset") -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.abort()
        if not self.complete:
            self._fail(kind)


# --------------------------------------------------------------------------------------------
# The proxy


def _split_target(url: bytes, host: bytes | None) -> tuple[bytes | None, bytes]:
    """(authority, origin-form path) from a request target in origin or absolute form."""
    if url[:1] == b"/":
        return host, url
    if url[:7].lower() == b"http://":
        rest = url[7:]
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority = rest[:end]
        at = authority.rfind(b"@")
        if at >= 0:
            authority = authority[at + 1 :]
        path = rest[end:]
        if not path:
            path = b"/"
        elif path[:1] == b"?":
            path = b"/" + path
        return authority or None, path
    if url == b"*":
        return host, url
    return None, b""


def _request_id() -> bytes:
    """A random (version 4 layout) UUID; not for secrets, so the fast PRNG will do."""
    h = b"%032x" % _getrandbits(128)
    return b"%b-%b-4%b-%b-%b" % (h[:8], h[8:12], h[13:16], h[16:20], h[20:])


class _Listener:
    """One listening socket and its connections."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: Callable[[_Downstream, _Request], Any],
        limits: Limits,
        fast: Callable[[_Downstream, _Request], bool] | None = None,
        holder: ConfigHolder | None = None,
    ) -> None:
        self.loop = loop
        self.handle = handle
        self.holder = holder
        # Tries to answer a bodiless request from callbacks alone; False: use ``handle``.
        self.fast = fast
        self.limits = limits
        self.conns: set[_Downstream] = set()
        self.overflowed = 0  # connections closed at once: over limits.max_connections
        self.server: asyncio.AbstractServer | None = None

    def escaped_slashes(self) -> str:
        holder = self.holder
        if holder is None:
            return "reject"
        return holder.current.config.path_normalization.escaped_slashes

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await self.loop.create_server(
            lambda: _Downstream(self), host, port, reuse_address=True, backlog=1024
        )
        sock = self.server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def sweep(self, now: float) -> None:
        lim = self.limits
        for c in list(self.conns):
            age = now - c.phase_since
            if c.phase == _IDLE and not c._busy:
                if age > lim.idle_timeout_s:
                    c.close()
            elif c.phase == _HEADERS and age > lim.header_timeout_s:
                c._fail_parse(408, "request-timeout")
                c.close()
            elif c.phase == _BODY and age > lim.body_timeout_s:
                req = c._req
                if req is not None and req.body is not None:
                    req.body.fail()
                c.close()

    async def close(self, drain_s: float) -> None:
        if self.server is not None:
            self.server.close()
        deadline = self.loop.time() + drain_s
        while self.loop.time() < deadline:
            for c in list(self.conns):
                if not c._busy and not c.queue:
                    c.close()
            if not self.conns:
                break
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.close()


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
        self.loop = asyncio.get_running_loop()
        self.holder = holder
        self.telemetry = telemetry
        self.registry = registry
        self.service = service
        self.version = version
        self.namespace = namespace
        self.limits = limits or Limits()
        self._rng = rng
        self._source_header = b"x-mesh-source: " + service.encode() + b"\r\n"
        self._inbound_span = f"{service} inbound"
        self._app = Endpoint(*app) if app else None
        self._mirrors_in_flight = 0
        self._background: set[asyncio.Task[None]] = set()
        self.inbound = _Listener(
            self.loop, self._handle_inbound, self.limits, fast=self._fast_inbound, holder=holder
        )
        self.outbound = _Listener(self.loop, self._handle_outbound, self.limits, holder=holder)
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(1.0, self._sweep)

    # -- lifecycle

    def _sweep(self) -> None:
        now = self.loop.time()
        self.inbound.sweep(now)
        self.outbound.sweep(now)
        older = now - self.limits.upstream_idle_s
        for ep in [*self.registry.all(), *([self._app] if self._app else [])]:
            pool = ep.pool
            if pool is not None:
                cast(_Pool, pool).close_idle(older)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def prune_endpoints(self, keep: frozenset[Endpoint]) -> None:
        """Close idle connections to endpoints no config references any more."""
        for ep in self.registry.retain(keep):
            if ep.pool is not None:
                pool = cast(_Pool, ep.pool)
                pool.retired = True
                pool.close_idle(float("inf"))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        drain = self.limits.drain_timeout_s
        await asyncio.gather(self.inbound.close(drain), self.outbound.close(drain))
        for ep in [*self.registry.all(), *([self._app] if self._app else [])]:
            if ep.pool is not None:
                cast(_Pool, ep.pool).close_idle(float("inf"))
        for t in list(self._background):
            t.cancel()

    def idle_upstreams(self) -> list[_Upstream]:
        """Pooled idle upstream connections, the app's first (for tests and diagnostics)."""
        out: list[_Upstream] = []
        for ep in [*([self._app] if self._app else []), *self.registry.all()]:
            if ep.pool is not None:
                out += cast(_Pool, ep.pool).idle
        return out

    def connection_count(self) -> int:
        return len(self.inbound.conns) + len(self.outbound.conns)

    # -- shared helpers

    def _pool(self, ep: Endpoint) -> _Pool:
        pool = ep.pool
        if pool is None:
            pool = ep.pool = _Pool(ep)
        return cast(_Pool, pool)

    async def _connect(
        self,
        ep: Endpoint,
        max_conns: int,
        max_pending: int,
        connect_timeout: float,
        deadline: float,
        *,
        fresh: bool = False,
    ) -> tuple[_Upstream, bool]:
        """A connection to ``ep`` and whether it was reused from the pool (``fresh``: never)."""
        pool = self._pool(ep)
        idle = pool.idle
        while idle and not fresh:
            c = idle.pop()
            if not c.closed:
                return c, True
        loop = self.loop
        while pool.open >= max_conns:
            if len(pool.waiters) >= max_pending:
                raise _Failure("overflow")
            fut: asyncio.Future[_Upstream | None] = loop.create_future()
            pool.waiters.append(fut)
            timer = loop.call_at(deadline, _expire_future, fut) if deadline < math.inf else None
            try:
                got = await fut
            finally:
                if timer is not None:
                    timer.cancel()
            if got is not None:
                if not got.closed:
                    return got, True
                continue
        pool.open += 1
        timeout = min(connect_timeout, deadline - loop.time())
        try:
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: _Upstream(pool, loop), ep.host, ep.port
                )
        except (OSError, TimeoutError) as exc:
            pool.open -= 1
            pool._wake_one(None)
            raise _Failure("timeout" if deadline <= loop.time() else "connect-failure") from exc
        return proto, False

    async def _exchange(
        self,
        ep: Endpoint,
        req: _Request,
        head: bytes,
        body: bytes | None,
        deadline: float,
        max_conns: int,
        max_pending: int,
        connect_timeout: float,
        *,
        body_deadline: float | None = None,
        fresh: bool = False,
    ) -> _Upstream:
        """Send one request to ``ep`` and return once its response head has arrived.

        The head must arrive by ``deadline``, the rest of the response by ``body_deadline``
        (default: ``deadline``), else the connection is aborted and waiting on it fails with
        ``_Failure("timeout")``. ``body`` None means stream ``req.body`` (never retried). A
        reused keep-alive connection that the upstream closed just as we sent on it is retried
        once on a fresh connection: the upstream never saw that request. ``fresh``: that
        retry, after the fast path found its pooled connection closed.
        """
        loop = self.loop
        if body_deadline is None:
            body_deadline = deadline
        for _ in range(2):
            up, reused = await self._connect(
                ep, max_conns, max_pending, connect_timeout, deadline, fresh=fresh
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
                pump = loop.create_task(self._pump_body(req, up))
            try:
                await waiter
            except _Failure as f:
                if pump is not None:
                    pump.cancel()
                up.abort()
                if f.kind == "reset" and reused and not up.got_bytes and body is not None:
                    continue
                raise
            if pump is not None and not pump.done():
                # The upstream answered before taking the whole body: let the pump finish in
                # the background; if it cannot, the connection will not be reused.
                self._background.add(pump)
                pump.add_done_callback(self._background.discard)
            return up
        raise _Failure("reset")

    async def _pump_body(self, req: _Request, up: _Upstream) -> None:
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
        except (_ClientGone, _Failure):
            up.abort()
        except asyncio.CancelledError:
            up.abort()
            raise

    def _build_head(
        self,
        req: _Request,
        path: bytes,
        host: bytes | None,
        body: bytes | None,
        traceparent: bytes | None,
        request_id: bytes,
        outbound: bool,
    ) -> bytes:
        parts = [req.method, b" ", path, b" HTTP/1.1\r\n"]
        if host is not None:
            parts += (b"host: ", host, b"\r\n")
        for name, value in req.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"x-request-id: ", request_id, b"\r\n")
        if traceparent is not None:
            parts += (b"traceparent: ", traceparent, b"\r\n")
        if outbound:
            parts.append(self._source_header)
        if body is not None:
            if body or req.body is not None or req.method in (b"POST", b"PUT", b"PATCH"):
                parts.append(b"content-length: %d\r\n" % len(body))
        elif req.content_length is not None:
            parts.append(b"content-length: %d\r\n" % req.content_length)
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
        return b"".join(parts)

    def _finish_head(self, head: bytes, conn: _Downstream, req: _Request) -> bytes:
        peer = conn.peer
        xff = peer if req.xff is None else req.xff + b", " + peer
        return head + b"x-forwarded-for: " + xff + b"\r\n\r\n"

    async def _read_body(self, req: _Request) -> bytes | None:
        """The request body if small enough to keep for retries and mirroring, else None."""
        b = req.body
        if b is None:
            return b""
        if req.content_length is not None and req.content_length > RETRY_BUFFER_BYTES:
            return None
        return await b.read_upto(RETRY_BUFFER_BYTES)

    async def _relay(self, conn: _Downstream, req: _Request, up: _Upstream) -> bool:
        """Send the chosen response to the caller. Returns whether the caller connection may be
        kept open. The connection's timer enforces the route deadline on the body meanwhile: if
        it passes, ``up.failure`` is "timeout" when this returns."""
        parts, keep, chunked, no_body = _response_head(conn, req, up)
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
            if conn.write_paused and up.transport is not None:
                up.transport.pause_reading()
            try:
                await up.wait_done()
            except _Failure:
                # The upstream broke off mid-body or the route deadline passed: all we can do
                # is break off too, so that the caller sees a truncated response rather than a
                # silently short one.
                conn.relaying = None
                conn.close()
                return False
            conn.relaying = None
            if up.transport is not None and not up.closed:
                up.transport.resume_reading()
            if chunked:
                conn.write(b"0\r\n\r\n")
        if conn.write_paused:
            await conn.drain()
        return keep

    def _release(self, up: _Upstream) -> None:
        if up.complete and not up.closed:
            up.pool.release(up, self.loop.time())
        else:
            up.abort()

    def _record(
        self, req: _Request, source: str, destination: str, version: str, status: int
    ) -> None:
        """Metrics for a request the agent answered itself."""
        self.telemetry.record(
            source=source,
            destination=destination,
            destination_version=version,
            status=status,
            duration_s=self.loop.time() - req.started,
        )

    # -- inbound

    def _fast_inbound(self, conn: _Downstream, req: _Request) -> bool:
        """Forward a bodiless request to the app over a pooled connection without a coroutine:
        ``_FastExchange`` relays the answer from the upstream's parser callbacks. False leaves
        the request to ``_handle_inbound`` (no app, a rate limit, no idle connection, a request
        target that is not a plain path)."""
        ep = self._app
        if ep is None or req.url[:1] != b"/":
            return False
        pool = ep.pool
        inbound = self.holder.current.inbound
        if pool is None or inbound.rate_limit is not None:
            return False
        idle = cast(_Pool, pool).idle
        while idle and idle[-1].closed:
            idle.pop()
        if not idle:
            return False
        source = req.source.decode("latin-1") if req.source else "unknown"
        tel = self.telemetry
        span = tel.start_span(
            name=self._inbound_span,
            kind="server",
            traceparent=req.traceparent,
            attributes={"http.request.method": req.method.decode("latin-1"), "mesh.source": source},
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        request_id = req.request_id or _request_id()
        head = self._finish_head(
            self._build_head(req, req.url, req.host, b"", tp, request_id, outbound=False), conn, req
        )
        up = idle.pop()  # only now: nothing above may leave a connection out of the pool
        ep.active_requests += 1
        fx = _FastExchange(
            self, conn, req, up, ep, inbound, head, span, source, req.started + inbound.timeout_s
        )
        up.begin_fast(req.method == b"HEAD", fx)
        transport = up.transport
        assert transport is not None
        transport.write(head)
        return True

    async def _handle_inbound(self, conn: _Downstream, req: _Request) -> bool:
        cfg = self.holder.current
        inbound = cfg.inbound
        source = req.source.decode("latin-1") if req.source else "unknown"
        tel = self.telemetry
        if self._app is None:
            keep = conn.send_error(req, 503, "no-app")
            self._record(req, source, self.service, self.version, 503)
            return keep
        if inbound.rate_limit is not None and not inbound.rate_limit.try_acquire():
            keep = conn.send_error(req, 429, "rate-limited")
            self._record(req, source, self.service, self.version, 429)
            return keep
        _, path = _split_target(req.url, req.host)
        if not path:
            return conn.send_error(req, 400, "malformed-request")
        span = tel.start_span(
            name=self._inbound_span,
            kind="server",
            traceparent=req.traceparent,
            attributes={"http.request.method": req.method.decode("latin-1"), "mesh.source": source},
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        body = await self._read_body(req)
        request_id = req.request_id or _request_id()
        head = self._finish_head(
            self._build_head(req, path, req.host, body, tp, request_id, outbound=False), conn, req
        )
        ep = self._app
        ep.active_requests += 1
        return await self._inbound_exchange(conn, req, inbound, head, body, span, source)

    async def _inbound_exchange(
        self,
        conn: _Downstream,
        req: _Request,
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
        ep = self._app
        assert ep is not None
        tel = self.telemetry
        deadline = req.started + inbound.timeout_s
        status: int | None = None
        try:
            try:
                up = await self._exchange(
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
            except _Failure as f:
                status = 504 if f.kind == "timeout" else 503
                return conn.send_error(req, status, _FAILURE_REASON[f.kind])
            status = up.status
            try:
                return await self._relay(conn, req, up)
            finally:
                if up.failure == "timeout":
                    status = None  # cut off mid-body: no complete response
                self._release(up)
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

    # -- outbound

    async def _handle_outbound(self, conn: _Downstream, req: _Request) -> bool:
        cfg = self.holder.current
        tel = self.telemetry
        loop = self.loop
        authority, path = _split_target(req.url, req.host)
        if authority is None or not path:
            reason = "unsupported" if req.url[:8].lower() == b"https://" else "malformed-request"
            return conn.send_error(req, 501 if reason == "unsupported" else 400, reason)
        svc = cfg.service_for(authority)
        if svc is None:
            self._record(req, self.service, "unknown", "unknown", 404)
            return conn.send_error(req, 404, "unknown-service")
        if svc.rate_limit is not None and not svc.rate_limit.try_acquire():
            self._record(req, self.service, svc.name, "unknown", 429)
            return conn.send_error(req, 429, "rate-limited")
        q = path.find(b"?")
        route = svc.match(
            req.method, path if q < 0 else path[:q], req.lookup() if svc.needs_headers else None
        )
        if route is None:
            self._record(req, self.service, svc.name, "unknown", 404)
            return conn.send_error(req, 404, "no-route")
        pool = route.pick_pool()
        if route.fault is not None:
            delay = route.fault.delay()
            if delay > 0:
                await asyncio.sleep(delay)
            abort = route.fault.abort()
            if abort is not None:
                self._record(req, self.service, svc.name, pool.version, abort)
                return conn.send_error(req, abort, "fault-abort")
        body = await self._read_body(req)
        span = tel.start_span(
            name=f"{svc.name} outbound",
            kind="client",
            traceparent=req.traceparent,
            attributes={
                "http.request.method": req.method.decode("latin-1"),
                "mesh.destination": svc.name,
                "mesh.route": route.name,
            },
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        request_id = req.request_id or _request_id()
        base_head = self._build_head(req, path, authority, body, tp, request_id, outbound=True)
        head = self._finish_head(base_head, conn, req)
        if (
            body is not None
            and route.mirror is not None
            and percent_chance(route.mirror_percent, self._rng)
        ):
            self._mirror(route, svc, req, path, authority, body, tp, request_id, conn)
        status: int | None = None
        try:
            status, keep = await self._forward(conn, req, svc, route, pool, head, body)
            return keep
        finally:
            if span is not None:
                span.end(status)
            tel.record(
                source=self.service,
                destination=svc.name,
                destination_version=pool.version,
                status=status,
                duration_s=loop.time() - req.started,
            )

    async def _forward(
        self,
        conn: _Downstream,
        req: _Request,
        svc: CompiledService,
        route: CompiledRoute,
        pool: VersionPool,
        head: bytes,
        body: bytes | None,
    ) -> tuple[int | None, bool]:
        loop = self.loop
        rules = route.retry
        # The route timeout covers the upstream side (all tries), not the client's upload.
        route_deadline = loop.time() + route.timeout_s
        svc.budget.record_request()
        retryable = body is not None and rules.attempts > 0 and rules.method_allowed(req.method)
        attempt = 0
        avoid: Endpoint | None = None
        while True:
            now = loop.time()
            ep = pool.balancer.pick(now, avoid)
            deadline = route_deadline
            if rules.per_try_timeout_s is not None:
                deadline = min(deadline, now + rules.per_try_timeout_s)
            ep.active_requests += 1
            try:
                try:
                    up = await self._exchange(
                        ep,
                        req,
                        head,
                        body,
                        deadline,
                        svc.max_connections,
                        svc.max_pending,
                        svc.connect_timeout_s,
                        body_deadline=route_deadline,
                    )
                except _Failure as f:
                    if f.kind != "overflow":
                        svc.outlier.report(ep, True, pool.endpoints)
                    if (
                        retryable
                        and f.kind != "overflow"
                        and attempt < rules.attempts
                        and rules.failure_retryable(f.kind)
                        and await self._backoff(rules, attempt + 1, route_deadline, svc)
                    ):
                        attempt += 1
                        avoid = ep
                        continue
                    status = 504 if f.kind == "timeout" else 503
                    return status, conn.send_error(req, status, _FAILURE_REASON[f.kind])
                status = up.status
                failed = status >= 500
                svc.outlier.report(ep, failed, pool.endpoints)
                if (
                    failed
                    and retryable
                    and attempt < rules.attempts
                    and rules.status_retryable(status)
                    and await self._backoff(rules, attempt + 1, route_deadline, svc)
                ):
                    self._release(up)  # a retried 5xx: keep the connection if clean
                    attempt += 1
                    avoid = ep
                    continue
                try:
                    keep = await self._relay(conn, req, up)
                finally:
                    self._release(up)
                if up.failure == "timeout":
                    return None, keep  # cut off mid-body: no complete response
                return status, keep
            finally:
                ep.active_requests -= 1

    async def _backoff(
        self, rules: RetryRules, retry_number: int, deadline: float, svc: CompiledService
    ) -> bool:
        """Wait before a retry; False when the deadline or the retry budget forbids it."""
        delay = rules.backoff(retry_number, self._rng)
        if self.loop.time() + delay >= deadline:
            return False
        if not svc.budget.try_retry():
            return False
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    # -- mirroring

    def _mirror(
        self,
        route: CompiledRoute,
        svc: CompiledService,
        req: _Request,
        path: bytes,
        authority: bytes,
        body: bytes,
        traceparent: bytes | None,
        request_id: bytes,
        conn: _Downstream,
    ) -> None:
        if self._mirrors_in_flight >= _MAX_MIRRORS_IN_FLIGHT:
            return  # shed mirrors rather than let them queue behind real traffic
        target = route.mirror
        assert target is not None
        # As in Envoy, the shadow copy's Host says it is one, so the receiver can tell.
        head = self._finish_head(
            self._build_head(
                req, path, authority + b"-shadow", body, traceparent, request_id, outbound=True
            ),
            conn,
            req,
        )
        ep = target.balancer.pick(self.loop.time())
        self._mirrors_in_flight += 1
        task = self.loop.create_task(self._send_mirror(ep, req, head, body, svc, route.timeout_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_mirror(
        self,
        ep: Endpoint,
        req: _Request,
        head: bytes,
        body: bytes,
        svc: CompiledService,
        timeout_s: float,
    ) -> None:
        deadline = self.loop.time() + timeout_s
        try:
            up = await self._exchange(
                ep, req, head, body, deadline, svc.max_connections, 0, svc.connect_timeout_s
            )
            up.discard = True
            up.body_parts = []
            if not up.complete:
                await up.wait_done()  # the connection's timer aborts it at the deadline
            self._release(up)
        except _Failure:
            pass
        except Exception:
            log.exception("mirror request failed")
        finally:
            self._mirrors_in_flight -= 1


class _FastExchange:
    """One inbound request relayed from callbacks: the upstream's parser callbacks write the
    response head and body to the caller, the end releases the connection and counts the
    request. Behaves like ``Proxy._inbound_exchange`` in every outcome."""

    __slots__ = (
        "chunked",
        "conn",
        "deadline",
        "ep",
        "head_bytes",
        "headed",
        "inbound",
        "keep",
        "proxy",
        "req",
        "source",
        "span",
        "up",
    )

    def __init__(
        self,
        proxy: Proxy,
        conn: _Downstream,
        req: _Request,
        up: _Upstream,
        ep: Endpoint,
        inbound: Inbound,
        head_bytes: bytes,
        span: SpanLike | None,
        source: str,
        deadline: float,
    ) -> None:
        self.proxy = proxy
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
            parts, self.keep, self.chunked, no_body = _response_head(conn, self.req, up)
            self.headed = True
            conn.responded = True
            up.out += parts
            up.sink = conn
            up.sink_chunked = self.chunked
            if no_body:
                up.discard = True
            else:
                conn.relaying = up
                if conn.write_paused and up.transport is not None:
                    up.transport.pause_reading()
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
            if up.transport is not None and not up.closed:
                up.transport.resume_reading()
            self.proxy._release(up)
        except Exception:
            self._internal_error()
            return
        self._finish(up.status, self.keep)

    def fail(self, kind: str) -> None:
        """No complete response: like a failed ``_exchange`` or a relay broken off."""
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
                # request, so send it once more on a fresh connection, as _exchange does.
                proxy = self.proxy
                conn.run_fast_fallback(
                    self.req,
                    proxy._inbound_exchange(
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
            keep = conn.send_error(self.req, status, _FAILURE_REASON[kind])
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
        proxy = self.proxy
        if self.span is not None:
            self.span.end(status)
        proxy.telemetry.record(
            source=self.source,
            destination=proxy.service,
            destination_version=proxy.version,
            status=status,
            duration_s=proxy.loop.time() - self.req.started,
        )
        self.conn.fast_done(keep)


def _response_head(
    conn: _Downstream, req: _Request, up: _Upstream
) -> tuple[list[bytes], bool, bool, bool]:
    """The response head for the caller: (parts, keep-alive, chunked, no body)."""
    status = up.status
    parts = [_status_line(status)]
    extra: set[bytes] | None = None
    for name, value in up.headers:
        n = name.lower()
        if n in _RESPONSE_DROP:
            if n == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                tokens = _connection_tokens(value) - {b"close", b"keep-alive"}
                if tokens:
                    # every Connection header counts, not only the last one
                    extra = tokens if extra is None else extra | tokens
            continue
        parts += (name, b": ", value, b"\r\n")
    if extra:
        parts = [parts[0]] + [p for p in _header_triples(up.headers, extra | _RESPONSE_DROP)]
    no_body = req.method == b"HEAD" or status in (204, 304)
    keep = req.keep_alive and not conn.closed
    chunked = False
    if no_body:
        if up.content_length is not None and status != 204:
            parts.append(b"content-length: %d\r\n" % up.content_length)
    elif up.content_length is not None:
        parts.append(b"content-length: %d\r\n" % up.content_length)
    elif up.complete:
        parts.append(b"content-length: %d\r\n" % sum(len(p) for p in up.body_parts))
    elif req.http11:
        chunked = True
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        keep = False  # HTTP/1.0 caller, unknown length: the end of the body is the close
    if not keep:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return parts, keep, chunked, no_body


def _header_triples(
    headers: list[tuple[bytes, bytes]], drop: set[bytes] | frozenset[bytes]
) -> list[bytes]:
    out: list[bytes] = []
    for name, value in headers:
        if name.lower() not in drop:
            out += (name, b": ", value, b"\r\n")
    return out


_TASKS: set[asyncio.Task[None]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """A fire-and-forget task that is not garbage-collected while it runs."""
    task = loop.create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


def _expire_future(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_Failure("timeout"))


_FAILURE_REASON = {
    "connect-failure": "connect-failure",
    "reset": "upstream-reset",
    "timeout": "upstream-timeout",
    "overflow": "overflow",
}
