"""The route timeout (and the inbound ``timeout_ms``) covers the whole response, as Envoy's does:
an upstream that sends its head and then stalls mid-body is cut off at the deadline instead of
hanging the caller. On real sockets, through the inbound agent (fast path and general path) and
the outbound agent.

No assertion here is about elapsed time: each exchange is only bounded (``asyncio.timeout`` and
the scenario's hard timeout), so a slow machine cannot make these tests flaky."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from mesh_agent.telemetry import Telemetry

from .support import (
    Agent,
    FakeTelemetry,
    FastPathCount,
    RawApp,
    count_fast_path,
    run,
    service,
)

pytestmark = pytest.mark.e2e

BOUND_S = 10.0  # far above any timeout configured below: only there so a hang fails the test
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> FastPathCount:
    """How many requests took the inbound fast path."""
    return count_fast_path(monkeypatch, "inbound")


STALL_HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10,
    "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 10,
}


class StallingApp(RawApp):
    """``/stall``: the head and part of the body in the given framing, then nothing until the
    agent drops the connection (``cut`` is set then). ``/stream``: a chunked body in 5 pieces,
    0.1 s apart. Anything else: a plain ``ok``."""

    def __init__(self, framing: str = "content-length") -> None:
        super().__init__(self._answer)
        self.framing = framing
        self.cut = asyncio.Event()

    async def _answer(
        self, conn_no: int, req_no: int, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        path = self.heads[-1].split(b" ", 2)[1]
        if path == b"/stall":
            w.write(STALL_HEADS[self.framing])
            await w.drain()
            with contextlib.suppress(ConnectionError):
                await r.read()  # returns at EOF: the agent dropped the connection
            self.cut.set()
            return False
        if path == b"/stream":
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(5):
                await asyncio.sleep(0.1)
                w.write(b"3\r\n%03d\r\n" % i)
                await w.drain()
            w.write(b"0\r\n\r\n")
            return True
        w.write(OK)
        return True


async def _get_until_close(port: int, path: str, host: str = "a") -> tuple[bytes, bytes]:
    """One request on its own connection, read until the agent closes it: (head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read()  # b"" ... until EOF: the agent must close, not hang
    finally:
        writer.close()
    return head, body


def _assert_truncated(head: bytes, body: bytes) -> None:
    """The caller can tell the response is incomplete from its own framing."""
    assert head.startswith(b"HTTP/1.1 200")
    lower = head.lower()
    if b"content-length: " in lower:
        assert b"content-length: 1000" in lower
        assert 0 < len(body) < 1000  # short
    else:
        assert b"transfer-encoding: chunked" in lower
        assert body and not body.endswith(b"0\r\n\r\n")  # no terminating chunk


def test_inbound_fast_path_cuts_a_stalled_body_and_drops_the_app_connection(
    fast: FastPathCount,
) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry(sample=True)
        cfg = {"inbound": {"timeout_ms": 300}}
        async with StallingApp() as app, Agent(cfg, app=app.address, telemetry=tel) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound, timeout=BOUND_S) as c:
                assert (await c.get("/warm")).status_code == 200  # pools connection 0
            head, body = await _get_until_close(agent.inbound_port, "/stall")
            _assert_truncated(head, body)
            assert body == b"x" * 10
            assert fast[0] == 1  # the stalled request really took the fast path
            async with asyncio.timeout(BOUND_S):
                await app.cut.wait()  # the agent aborted the app connection
            async with httpx.AsyncClient(base_url=agent.inbound, timeout=BOUND_S) as c:
                r = await c.get("/next")
                assert (r.status_code, r.text) == (200, "ok")
            assert app.connections == 2  # the cut connection was not reused
            assert [r["status"] for r in tel.records] == [200, None, 200]
            assert [s.status for s in tel.spans] == [200, None, 200]

    run(scenario(), timeout=30)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_inbound_general_path_cuts_a_stalled_body(fast: FastPathCount, framing: str) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()
        cfg = {"inbound": {"timeout_ms": 300}}
        async with (
            StallingApp(framing) as app,
            Agent(cfg, app=app.address, telemetry=tel) as agent,
        ):
            # Nothing pooled yet: the request goes the coroutine path.
            head, body = await _get_until_close(agent.inbound_port, "/stall")
            _assert_truncated(head, body)
            assert fast[0] == 0
            async with asyncio.timeout(BOUND_S):
                await app.cut.wait()
            async with httpx.AsyncClient(base_url=agent.inbound, timeout=BOUND_S) as c:
                r = await c.get("/next")
                assert (r.status_code, r.text) == (200, "ok")
            assert app.connections == 2
            assert [r["status"] for r in tel.records] == [None, 200]

    run(scenario(), timeout=30)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-delimited"])
def test_outbound_cuts_a_stalled_body_and_counts_a_failure(framing: str) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()
        async with StallingApp(framing) as app:
            # A per-try timeout longer than the route's: the route deadline is what cuts.
            retries = {"attempts": 2, "per_try_timeout_ms": 5000}
            svc = service("reviews", {"v1": [app.address]}, timeout_ms=300, retries=retries)
            cfg = {"services": [svc]}
            async with Agent(cfg, telemetry=tel) as agent:
                port = agent.outbound_port
                async with httpx.AsyncClient(base_url=agent.outbound, timeout=BOUND_S) as c:
                    r = await c.get("/warm", headers={"host": "reviews"})
                    assert r.status_code == 200  # pools connection 0
                head, body = await _get_until_close(port, "/stall", host="reviews")
                _assert_truncated(head, body)
                async with asyncio.timeout(BOUND_S):
                    await app.cut.wait()
                async with httpx.AsyncClient(base_url=agent.outbound, timeout=BOUND_S) as c:
                    r = await c.get("/next", headers={"host": "reviews"})
                    assert (r.status_code, r.text) == (200, "ok")
            # the stalled request was neither retried nor sent on a reused connection again
            paths = [h.split(b" ", 2)[1] for h in app.heads]
            assert paths == [b"/warm", b"/stall", b"/next"]
            assert app.connections == 2
            assert [r["status"] for r in tel.records] == [200, None, 200]
            # ... which the RED metrics count as a failure (status class "none")
            metrics = Telemetry(
                service="web", version="v1", namespace="n", sampling_ratio=0.0, otlp_endpoint=None
            )
            for rec in tel.records:
                metrics.record(**rec)
            text = metrics.prometheus_text().decode()
            assert 'status_class="none"} 1' in text
            failures = [ln for ln in text.splitlines() if ln.startswith("mesh_request_failures")]
            assert len(failures) == 1 and failures[0].endswith(" 1")

    run(scenario(), timeout=30)


def test_slow_but_steady_streams_within_the_timeout_are_not_cut(fast: FastPathCount) -> None:
    """A 0.5 s stream under a 3 s route timeout, on every path; on the outbound one the per-try
    timeout (0.2 s) is shorter than the stream: it only bounds the wait for the head."""

    async def scenario() -> None:
        tel = FakeTelemetry()
        expected = b"".join(b"%03d" % i for i in range(5))
        async with StallingApp() as app:
            retries = {"attempts": 1, "per_try_timeout_ms": 200}
            svc = service("reviews", {"v1": [app.address]}, timeout_ms=3000, retries=retries)
            cfg = {"inbound": {"timeout_ms": 3000}, "services": [svc]}
            async with Agent(cfg, app=app.address, telemetry=tel) as agent:
                async with httpx.AsyncClient(base_url=agent.inbound, timeout=BOUND_S) as c:
                    for _ in range(2):  # the general path, then the fast path
                        r = await c.get("/stream")
                        assert (r.status_code, r.content) == (200, expected)
                async with httpx.AsyncClient(base_url=agent.outbound, timeout=BOUND_S) as c:
                    for _ in range(2):
                        r = await c.get("/stream", headers={"host": "reviews"})
                        assert (r.status_code, r.content) == (200, expected)
            assert fast[0] == 1
            # one connection from each listener, each kept and reused
            assert app.connections == 2 and len(app.heads) == 4
            assert [r["status"] for r in tel.records] == [200] * 4

    run(scenario(), timeout=30)


def test_timeout_zero_arms_no_timer_at_all(fast: FastPathCount) -> None:
    """``timeout_ms: 0`` is "no timeout": no timer is armed for such a request (not a far-off
    one), and a timer left by an earlier request with a timeout on the same pooled connection
    is cancelled."""

    async def scenario() -> None:
        async with StallingApp() as app:
            svc = service("reviews", {"v1": [app.address]}, timeout_ms=0, retries={"attempts": 0})
            cfg = {"inbound": {"timeout_ms": 0}, "services": [svc]}
            async with Agent(cfg, app=app.address) as agent:
                async with httpx.AsyncClient(base_url=agent.inbound, timeout=BOUND_S) as c:
                    for _ in range(2):  # the general path, then the fast path
                        assert (await c.get("/")).status_code == 200
                async with httpx.AsyncClient(base_url=agent.outbound, timeout=BOUND_S) as c:
                    assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
                    # the same pooled connection, first with a timeout, then without one
                    with_timeout = {**svc, "timeout_ms": 60_000}
                    agent.apply({**cfg, "services": [with_timeout]})
                    assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
                    agent.apply(cfg)
                    assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
                assert agent.proxy is not None
                pooled = agent.pooled_connections()
                assert len(pooled) == 2  # one to the app (inbound), one to reviews (outbound)
                assert [conn.timer for conn in pooled] == [None, None]
            assert fast[0] == 1

    run(scenario(), timeout=30)
