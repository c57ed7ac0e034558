"""The upstream side: connections to endpoints (an ``asyncio.Protocol`` fed into an httptools
response parser) and the per-endpoint pool that keeps them alive between requests.

Once a response is chosen for the caller, its body bytes are written to the caller straight from
the parser callback (``sink``), with back-pressure both ways. Each connection keeps one lazily
re-armed deadline timer instead of a timer per request. Before the response head, reaching the
deadline is a 504; after it, while the body is relayed, the connection is aborted and the caller's
connection closed, so a stalled body cannot hang the caller. An infinite deadline
(``timeout_ms: 0``) arms no timer at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.errors import Failure
from mesh_agent.proxy.flow import FlowControl
from mesh_agent.proxy.http1 import (
    PLAIN_CONNECTION,
    R_CHUNKED,
    R_CONNECTION,
    R_FORWARD,
    R_LENGTH,
    connection_tokens,
    content_length_value,
    response_header_kind,
)

if TYPE_CHECKING:
    # Only for the types (each of these imports this module); compiled code still calls
    # their methods and reads their fields directly.
    from mesh_agent.proxy.downstream import Downstream
    from mesh_agent.proxy.exchange import FastRelay

__all__ = ["Pool", "Upstream", "pool_of"]

log = logging.getLogger("mesh_agent.proxy")


class Pool:
    """Idle connections to one endpoint plus the connection limit bookkeeping."""

    __slots__ = ("endpoint", "idle", "loop", "open", "retired", "waiters")

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.loop = loop
        # Set when no config references the endpoint any more: connections still busy with
        # requests from the old config are closed when done instead of idling unswept.
        self.retired = False
        self.idle: list[Upstream] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[Upstream | None]] = collections.deque()

    def connection_gone(self, conn: Upstream) -> None:
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self.wake_one(None)

    def wake_one(self, conn: Upstream | None) -> bool:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return True
        return False

    def release(self, conn: Upstream, now: float) -> None:
        if conn.reusable() and not self.retired:
            if not self.waiters or not self.wake_one(conn):
                conn.idle_since = now
                self.idle.append(conn)
        else:
            conn.abort()

    def close_idle(self, older_than: float) -> None:
        for c in [c for c in self.idle if c.idle_since < older_than]:
            c.abort()

    async def acquire(
        self,
        max_conns: int,
        max_pending: int,
        connect_timeout: float,
        deadline: float,
        *,
        fresh: bool = False,
    ) -> tuple[Upstream, bool]:
        """A connection to the endpoint and whether it was reused (``fresh``: never reuse).
        Waits for a free one at ``max_conns``; fails with "overflow" past ``max_pending``
        waiting, "timeout" at ``deadline``, "connect-failure" if none can be opened."""
        idle = self.idle
        while idle and not fresh:
            c = idle.pop()
            if not c.closed:
                return c, True
        loop = self.loop
        while self.open >= max_conns:
            if len(self.waiters) >= max_pending:
                raise Failure("overflow")
            fut: asyncio.Future[Upstream | None] = loop.create_future()
            self.waiters.append(fut)
            timer = loop.call_at(deadline, expire_future, fut) if deadline < math.inf else None
            try:
                got = await fut
            finally:
                if timer is not None:
                    timer.cancel()
            if got is not None:
                if not got.closed:
                    return got, True
                continue
        self.open += 1
        timeout = min(connect_timeout, deadline - loop.time())
        ep = self.endpoint
        try:
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                made = await loop.create_connection(
                    lambda: cast(asyncio.BaseProtocol, Upstream(self, loop)), ep.host, ep.port
                )
            proto = cast(Upstream, made[1])
        except (OSError, TimeoutError) as exc:
            self.open -= 1
            self.wake_one(None)
            raise Failure("timeout" if deadline <= loop.time() else "connect-failure") from exc
        return proto, False


class Upstream:
    """One connection to an endpoint: an asyncio protocol by shape, not by base class (see
    ``Downstream``)."""

    __slots__ = (
        "_informational",
        "_keep_alive",
        "_parse",
        "_parser_dirty",
        "_status",
        "body_deadline",
        "body_parts",
        "chunked",
        "closed",
        "complete",
        "content_length",
        "deadline",
        "discard",
        "done_waiter",
        "extra_hop",
        "failure",
        "fast",
        "flow",
        "forwarded",
        "got_bytes",
        "head_request",
        "head_waiter",
        "idle_since",
        "keep_alive",
        "loop",
        "out",
        "parser",
        "pool",
        "pumping",
        "send",
        "sink",
        "sink_chunked",
        "status",
        "timer",
        "timer_at",
        "transport",
        "until_close",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.send: Callable[[bytes], object] | None = None  # transport.write, once connected
        self._new_parser()
        self.closed = False
        self.idle_since = 0.0
        self.flow = FlowControl(loop)
        self.pumping = False
        # Bytes for the caller collected while the parser runs, written once it returns.
        self.out: list[bytes] = []
        self.fast: FastRelay | None = None
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

    def _new_parser(self) -> None:
        self.parser = parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False
        # Called on every response, bound once (docs/agent.md, "Speed").
        self._parse: Callable[[bytes], None] = parser.feed_data
        self._status: Callable[[], int] = parser.get_status_code
        self._keep_alive: Callable[[], bool] = parser.should_keep_alive

    def _reset_exchange(self, head_request: bool) -> None:
        self.head_request = head_request
        self.status = 0
        self.forwarded: list[bytes] = []
        self.extra_hop: set[bytes] | None = None
        self.body_parts: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.until_close = False
        self.complete = False
        # Why the exchange ended without a complete response (a Failure kind), if it did.
        self.failure: str | None = None
        self.keep_alive = False
        self.got_bytes = False
        self.discard = False
        self._informational = False
        self.sink: Downstream | None = None
        self.sink_chunked = False
        self.head_waiter: asyncio.Future[None] | None = None
        self.done_waiter: asyncio.Future[None] | None = None

    def begin(
        self, head_request: bool, deadline: float, body_deadline: float
    ) -> asyncio.Future[None]:
        """An exchange awaited by a coroutine: the future resolves with the response head, or
        fails with ``Failure("timeout")`` at ``deadline``. After the head, the body must be
        complete by ``body_deadline`` (>= ``deadline``) or the connection is aborted."""
        if self._parser_dirty:
            self._new_parser()
        self._reset_exchange(head_request)
        fut = self.head_waiter = self.loop.create_future()
        self._arm(deadline, body_deadline)
        return fut

    def begin_fast(
        self, head_request: bool, fast: FastRelay, body_deadline: float | None = None
    ) -> None:
        """An exchange driven by callbacks: ``fast`` hears of the head, the end and failures;
        ``fast.deadline`` is when it times out before the head (504), ``body_deadline``
        (default: the same) when it times out during the body."""
        if self._parser_dirty:
            self._new_parser()
        self._reset_exchange(head_request)
        self.fast = fast
        self._arm(fast.deadline, fast.deadline if body_deadline is None else body_deadline)

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

    # -- the asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)
        self.send = self.transport.write

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.complete:
            # Bytes after the response ended (on an idle pooled connection, say): the
            # connection is out of sync with us and cannot be trusted again.
            self.abort()
            return
        try:
            self._parse(data)
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

    def eof_received(self) -> bool | None:
        return None  # connection_lost follows and decides what the end means

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
        self.flow.lost()

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    @property
    def write_paused(self) -> bool:
        return self.flow.write_paused

    async def drain(self) -> None:
        await self.flow.drain()
        if self.closed and not self.complete:
            raise Failure("reset")

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # The caller's head is collected here, as the headers are parsed (response_head).
        kind = response_header_kind(name)
        if kind == R_FORWARD:
            self.forwarded.append(b"%b: %b\r\n" % (name, value))
        elif kind == R_LENGTH:
            self.content_length = content_length_value(value)
        elif kind == R_CHUNKED:
            self.chunked = True
        elif (
            kind == R_CONNECTION
            and value != b"keep-alive"  # what nearly every response says, compared as is
            and value != b"close"
            and value.lower() not in PLAIN_CONNECTION
        ):
            tokens = connection_tokens(value) - PLAIN_CONNECTION
            if tokens:
                # every Connection header counts, not only the last one
                extra = self.extra_hop
                self.extra_hop = tokens if extra is None else extra | tokens

    def on_headers_complete(self) -> None:
        status = self._status()
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) are not relayed.
            self._informational = True
            self.forwarded = []
            self.extra_hop = None
            self.content_length = None
            self.chunked = False
            return
        self.status = status
        self.deadline = self.body_deadline
        self.keep_alive = self._keep_alive()
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
                    w.set_exception(Failure(kind))

    def expire(self) -> None:
        """Per-try or route deadline reached before the response head (``Forwarder.exchange`` then
        aborts the connection)."""
        w = self.head_waiter
        if w is not None and not w.done():
            self.head_waiter = None
            w.set_exception(Failure("timeout"))

    def wait_done(self) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if self.complete:
            fut.set_result(None)
        elif self.failure is not None or self.closed:
            fut.set_exception(Failure(self.failure or "reset"))
        else:
            self.done_waiter = fut
        return fut

    def abort(self, kind: str = "reset") -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.abort()
        if not self.complete:
            self._fail(kind)


def expire_future(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(Failure("timeout"))


def pool_of(ep: Endpoint, loop: asyncio.AbstractEventLoop) -> Pool:
    """The endpoint's connection pool, made on first use (endpoints outlive config versions)."""
    pool = ep.pool
    if pool is None:
        pool = ep.pool = Pool(ep, loop)
    return cast(Pool, pool)
