"""The admin listener: ``GET /ready``, ``/metrics`` (Prometheus text) and ``/config``.

Small on purpose: a few fixed paths, no body parsing, one response per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

__all__ = ["AdminServer", "MetricsSource"]

log = logging.getLogger("mesh_agent.admin")


class MetricsSource(Protocol):
    def prometheus_text(self) -> bytes: ...


class _ConfigView(Protocol):
    @property
    def ready(self) -> bool: ...

    def dump(self) -> dict[str, Any]: ...


_PROM_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _AdminConn(asyncio.Protocol):
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        if len(server.conns) >= server.max_connections:
            self.transport.abort()
            return
        server.conns.add(self)
        # A client that connects and says nothing holds a connection like a slow one.
        self._arm(server.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm(self, seconds: float) -> None:
        """One timer per connection: the header timeout while a request head is due, the idle
        timeout between requests. Either closes the connection when it fires."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(400, b"text/plain", b"malformed request\n", keep=False)
        except httptools.HttpParserUpgrade:
            self._respond(400, b"text/plain", b"upgrade not supported\n", keep=False)

    def on_message_begin(self) -> None:
        self.url = b""
        self._arm(self.server.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 8192:
            raise ValueError("URI too long")

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        path = self.url.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(405, b"text/plain", b"method not allowed\n", keep, head=False)
            return
        try:
            status, ctype, body = self.server.route(path)
        except Exception:
            log.exception("admin handler failed for %r", path)
            status, ctype, body = 500, b"text/plain", b"internal error\n"
        self._respond(status, ctype, body, keep, head=method == b"HEAD")
        self._arm(self.server.idle_timeout_s)

    def _respond(
        self, status: int, ctype: bytes, body: bytes, keep: bool, head: bool = False
    ) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        reason = _REASONS.get(status, b"Unknown")
        t.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s"
            % (
                status,
                reason,
                ctype,
                len(body),
                b"" if keep else b"connection: close\r\n",
                b"" if head else body,
            )
        )
        if not keep:
            t.close()


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class AdminServer:
    def __init__(
        self,
        *,
        config: _ConfigView,
        metrics: MetricsSource,
        bootstrap: dict[str, Any],
        extra_metrics: Callable[[], bytes] | None = None,
        header_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        max_connections: int = 64,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.bootstrap = bootstrap
        self.extra_metrics = extra_metrics
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        # Scrapers and operators need a handful; the cap keeps a flood from costing memory.
        self.max_connections = max_connections
        self.conns: set[_AdminConn] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _AdminConn(self), host, port, reuse_address=True
        )
        addr = self.server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()

    def route(self, path: bytes) -> tuple[int, bytes, bytes]:
        if path == b"/ready":
            if self.config.ready:
                version = self.config.dump()["version"]
                return 200, b"text/plain", f"ready {version}\n".encode()
            return 503, b"text/plain", b"not ready: no config loaded\n"
        if path == b"/metrics":
            body = self.metrics.prometheus_text()
            if self.extra_metrics is not None:
                body += self.extra_metrics()
            return 200, _PROM_TYPE, body
        if path in (b"/config", b"/config_dump"):
            doc = {"bootstrap": self.bootstrap, **self.config.dump()}
            return 200, b"application/json", json.dumps(doc, indent=2).encode() + b"\n"
        if path == b"/":
            return 200, b"text/plain", b"mesh-agent admin: /ready /metrics /config\n"
        return 404, b"text/plain", b"not found\n"
