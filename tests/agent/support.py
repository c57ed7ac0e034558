"""Helpers for the agent tests: a scriptable HTTP backend, a fake telemetry sink, the real agent
(``mesh_agent.agent.Agent``) in-process on real sockets, and a runner that drives a whole
scenario on uvloop."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httptools
import uvloop

from mesh_agent.agent import Agent as CoreAgent
from mesh_agent.config import validate_config
from mesh_agent.proxy import Limits, Proxy

# ---------------------------------------------------------------------------------------------
# Running scenarios


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run one async scenario on uvloop (the agent's production loop) with a hard timeout."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll ``predicate``: for state that offers no notification hook to wait on."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Backend


@dataclass
class BackendRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    body_size: int
    body_sha256: str
    chunked: bool


@dataclass
class Response:
    status: int = 200
    body: bytes | AsyncIterator[bytes] = b"ok"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False  # send the body with Transfer-Encoding: chunked
    close: bool = False


Handler = Callable[[BackendRequest], Awaitable[Response]]

_KEEP_BODY = 1 << 20


class _ParseState:
    def __init__(self) -> None:
        self.done: collections.deque[BackendRequest] = collections.deque()
        self.parser: Any = None
        self.method = ""
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.size = 0
        self.sha = hashlib.sha256()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method().decode()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        self.sha.update(body)
        if len(self.body) < _KEEP_BODY:
            self.body += body

    def on_message_complete(self) -> None:
        hdrs = {n.decode().lower(): v.decode() for n, v in self.headers}
        self.done.append(
            BackendRequest(
                method=self.method,
                path=self.url.decode(),
                headers=hdrs,
                raw_headers=self.headers,
                body=bytes(self.body),
                body_size=self.size,
                body_sha256=self.sha.hexdigest(),
                chunked="chunked" in hdrs.get("transfer-encoding", ""),
            )
        )
        self._reset()


async def _default_handler(req: BackendRequest) -> Response:
    return Response(body=b"ok")


class Backend:
    """An HTTP/1.1 server on 127.0.0.1:<free port> whose answers a test scripts."""

    def __init__(self, handler: Handler = _default_handler, name: str = "backend") -> None:
        self.handler = handler
        self.name = name
        self.connections = 0
        self.requests: list[BackendRequest] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self._writers):
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        state = _ParseState()
        parser = httptools.HttpRequestParser(state)
        state.parser = parser
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed_data(data)
                while state.done:
                    req = state.done.popleft()
                    self.requests.append(req)
                    resp = await self.handler(req)
                    await self._write(writer, req, resp)
                    if resp.close:
                        writer.close()
                        return
        except (ConnectionError, httptools.HttpParserError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _write(
        self, writer: asyncio.StreamWriter, req: BackendRequest, resp: Response
    ) -> None:
        head = [f"HTTP/1.1 {resp.status} X\r\n".encode()]
        for n, v in resp.headers:
            head.append(f"{n}: {v}\r\n".encode())
        if resp.close:
            head.append(b"connection: close\r\n")
        if isinstance(resp.body, bytes):
            if resp.chunked:
                head.append(b"transfer-encoding: chunked\r\n\r\n")
                if resp.body:
                    head.append(b"%x\r\n%b\r\n" % (len(resp.body), resp.body))
                head.append(b"0\r\n\r\n")
            else:
                head.append(b"content-length: %d\r\n\r\n" % len(resp.body))
                if req.method != "HEAD" and resp.status not in (204, 304):
                    head.append(resp.body)
            writer.write(b"".join(head))
            await writer.drain()
            return
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"".join(head))
        async for chunk in resp.body:
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


RawScript = Callable[[int, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawApp:
    """An app whose every answer is scripted byte for byte: ``script(conn_no, req_no, reader,
    writer)`` answers one request (whose head has been read) and returns False to stop."""

    def __init__(self, script: RawScript) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawApp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_no = self.connections
        self.connections += 1
        req_no = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer.set()
                    return
                self.heads.append(head)
                if not await self.script(conn_no, req_no, reader, writer):
                    return
                req_no += 1
        except ConnectionError:
            self.closed_by_peer.set()
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------
# Telemetry fake


class FakeSpan:
    def __init__(self, incoming: bytes | None) -> None:
        self.incoming = incoming
        self.status: int | str | None = "open"
        self.name = ""
        self.attributes: dict[str, str] = {}

    def traceparent(self) -> bytes:
        return b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def describe(self, name: str, attributes: dict[str, str]) -> None:
        self.name = name
        self.attributes = attributes

    def end(self, status: int | None) -> None:
        self.status = status


class FakeTelemetry:
    def __init__(self, sample: bool = False) -> None:
        self.sample = sample
        self.records: list[dict[str, Any]] = []
        self.spans: list[FakeSpan] = []

    def record(
        self,
        source: str,
        destination: str,
        destination_version: str,
        status: int | None,
        duration_s: float,
    ) -> None:
        self.records.append(
            {
                "source": source,
                "destination": destination,
                "destination_version": destination_version,
                "status": status,
                "duration_s": duration_s,
            }
        )

    def begin(self, kind: str, traceparent: bytes | None) -> tuple[FakeSpan | None, bytes | None]:
        if not self.sample:
            return None, traceparent
        span = FakeSpan(traceparent)
        self.spans.append(span)
        return span, span.traceparent()

    def prometheus_text(self) -> bytes:
        return b"# fake\n"


# ---------------------------------------------------------------------------------------------
# In-process agent


def service(name: str, versions: dict[str, list[str]], **policy: Any) -> dict[str, Any]:
    """A service entry for a config dict."""
    return {
        "name": name,
        "versions": {v: {"endpoints": eps} for v, eps in versions.items()},
        **policy,
    }


class Agent:
    """The production :class:`mesh_agent.agent.Agent` on free loopback ports (inbound only with
    an app, no admin listener), with a fake telemetry sink unless given a real one."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        app: str | None = None,
        limits: Limits | None = None,
        telemetry: Any = None,
        state_dir: str | None = None,
        service: str = "web",
    ) -> None:
        self.initial = config
        self.telemetry = telemetry if telemetry is not None else FakeTelemetry()
        address = None
        if app is not None:
            host, port = app.rsplit(":", 1)
            address = (host, int(port))
        self.core = CoreAgent(
            service=service,
            version="v1",
            app=address,
            telemetry=self.telemetry,
            limits=limits or Limits(drain_timeout_s=0.5),
            state_dir=state_dir,
        )
        self.store = self.core.store
        self.registry = self.core.registry
        self.outbound_port = 0
        self.inbound_port = 0

    @property
    def proxy(self) -> Proxy | None:
        return self.core.proxy

    def apply(self, config: dict[str, Any]) -> str:
        loaded = validate_config(config, "test")
        self.store.offer(loaded)
        return loaded.version

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.inbound_port}"

    async def __aenter__(self) -> Agent:
        if self.initial is not None:
            self.apply(self.initial)
        listeners = await self.core.start(
            outbound=("127.0.0.1", 0), inbound=("127.0.0.1", 0) if self.core.app else None
        )
        self.outbound_port = int(listeners["outbound"].rsplit(":", 1)[1])
        if "inbound" in listeners:
            self.inbound_port = int(listeners["inbound"].rsplit(":", 1)[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.core.close()

    def pooled_connections(self) -> list[Any]:
        """The idle upstream connections of every pool (app first, then config endpoints)."""
        assert self.proxy is not None
        return self.proxy.idle_upstreams()


# ---------------------------------------------------------------------------------------------
# Raw HTTP client for what httpx will not send


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        if read_until_close:
            while chunk := await reader.read(65536):
                out += chunk
        else:
            out = await reader.read(65536)
    finally:
        writer.close()
    return out


class FastPathCount:
    """How many requests the agents made during a test relayed on one side's fast path:
    ``count[0]``, summed over every ``Proxy`` made meanwhile (read from the sides' counters, so
    it works the same whether the proxy is compiled or interpreted)."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.proxies: list[Proxy] = []

    def __getitem__(self, index: int) -> int:
        assert index == 0
        attr = f"{self.side}_side"
        return sum(getattr(p, attr).fast_requests for p in self.proxies)


def count_fast_path(monkeypatch: Any, side: str) -> FastPathCount:
    """Record the proxies ``mesh_agent.agent.Agent`` makes (monkeypatch: pytest's fixture)."""
    import mesh_agent.agent as agent_module

    count = FastPathCount(side)
    original = agent_module.Proxy

    def recording(*args: Any, **kwargs: Any) -> Proxy:
        proxy = original(*args, **kwargs)
        count.proxies.append(proxy)
        return proxy

    monkeypatch.setattr(agent_module, "Proxy", recording)
    return count
