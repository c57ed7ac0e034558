"""The inbound fast path (a bodiless request on a pooled app connection, relayed from callbacks
without a coroutine) on real sockets. Each test warms the pool first and checks that the request
under test really took the fast path, so that a regression in it cannot hide behind the general
path."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from .support import (
    Agent,
    Backend,
    BackendRequest,
    FakeTelemetry,
    FastPathCount,
    RawApp,
    Response,
    count_fast_path,
    run,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> FastPathCount:
    """How many requests took the inbound fast path."""
    return count_fast_path(monkeypatch, "inbound")


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One content-length delimited response: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def test_keep_alive_requests_take_the_fast_path_with_headers_metrics_and_trace(
    fast: FastPathCount,
) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry(sample=True)

        async def echo(req: BackendRequest) -> Response:
            return Response(body=req.path.encode(), headers=[("x-app", "1")])

        async with Backend(echo) as app, Agent({}, app=app.address, telemetry=tel) as agent:
            incoming = "00-11111111111111111111111111111111-2222222222222222-01"
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                for i in range(20):
                    r = await c.get(
                        f"/r{i}?q=1",
                        headers={
                            "x-mesh-source": "frontend",
                            "traceparent": incoming,
                            "x-request-id": f"id-{i}",
                            "connection": "x-hop",
                            "x-hop": "dropped",
                        },
                    )
                    assert (r.status_code, r.text) == (200, f"/r{i}?q=1")
                    assert r.headers["x-app"] == "1"
                r = await c.head("/h")
                assert r.status_code == 200 and r.headers["content-length"] == "2"
                r = await c.get("/after-head")
                assert r.text == "/after-head"
            assert fast[0] == 21  # all but the first, made before a connection was pooled
            assert app.connections == 1
            assert len(app.requests) == 22
            for i, req in enumerate(app.requests[:20]):
                assert req.headers["x-request-id"] == f"id-{i}"
                assert req.headers["traceparent"] == tel.spans[i].traceparent().decode()
                assert req.headers["x-forwarded-for"] == "127.0.0.1"
                assert "x-mesh-source" not in req.headers
                assert "x-hop" not in req.headers and "connection" not in req.headers
                assert "content-length" not in req.headers
            assert all(s.incoming == incoming.encode() and s.status == 200 for s in tel.spans[:20])
            assert {s.name for s in tel.spans} == {"web inbound"}
            assert tel.spans[0].attributes == {
                "http.request.method": "GET",
                "mesh.source": "frontend",
            }
            assert len(tel.records) == 22
            assert [r["source"] for r in tel.records[:20]] == ["frontend"] * 20
            assert all(r["status"] == 200 and r["destination"] == "web" for r in tel.records)

    run(scenario())


def test_fast_path_streams_a_chunked_response(fast: FastPathCount) -> None:
    async def scenario() -> None:
        async def streamed(req: BackendRequest) -> Response:
            async def body() -> AsyncIterator[bytes]:
                for i in range(5):
                    await asyncio.sleep(0.005)
                    yield b"%d" % i * 1000

            return Response(body=body())

        async with Backend(streamed) as app, Agent({}, app=app.address) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                for _ in range(3):
                    r = await c.get("/")
                    assert r.status_code == 200
                    assert r.headers["transfer-encoding"] == "chunked"
                    assert r.content == b"".join(b"%d" % i * 1000 for i in range(5))
            assert fast[0] == 2 and app.connections == 1

    run(scenario())


def test_pipelined_requests_behind_a_fast_one_are_answered_in_order(fast: FastPathCount) -> None:
    async def scenario() -> None:
        async def slow_first(req: BackendRequest) -> Response:
            if req.path == "/p0":
                await asyncio.sleep(0.05)  # the rest arrive while /p0 is still in flight
            return Response(body=req.path.encode())

        async with Backend(slow_first) as app, Agent({}, app=app.address) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                assert (await c.get("/warm")).status_code == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.inbound_port)
            writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(4)))
            bodies = [(await _read_response(reader))[1] for _ in range(4)]
            assert bodies == [b"/p0", b"/p1", b"/p2", b"/p3"]
            # and the connection goes on serving, on the fast path again
            writer.write(b"GET /p4 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await _read_response(reader))[1] == b"/p4"
            writer.close()
            assert fast[0] == 2  # /p0 and /p4; /p1 .. /p3 were queued behind /p0

    run(scenario())


def test_upstream_closing_mid_response_truncates_and_counts(fast: FastPathCount) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()

        async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
            if conn_no == 0 and req_no == 1:
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
                await w.drain()
                return False  # closes with 90 bytes missing
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        async with RawApp(script) as app, Agent({}, app=app.address, telemetry=tel) as agent:
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.inbound_port)
            writer.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await _read_response(reader))[1] == b"ok"
            writer.write(b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")
            got = await reader.read()  # the agent closes the client connection too
            writer.close()
            assert got.startswith(b"HTTP/1.1 200") and b"content-length: 100" in got.lower()
            assert got.endswith(b"x" * 10)
            assert fast[0] == 1
            assert [r["status"] for r in tel.records] == [200, 200]
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                r = await c.get("/next")
                assert (r.status_code, r.text) == (200, "ok")
            assert app.connections == 2  # the broken connection was not reused

    run(scenario())


def test_client_closing_mid_response_aborts_the_upstream_connection(fast: FastPathCount) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()

        async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
            if conn_no == 0 and req_no == 1:
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1000)
                await w.drain()
                with contextlib.suppress(ConnectionError):
                    await r.read()  # returns at EOF: the agent dropped the connection
                app.closed_by_peer.set()
                return False
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        async with RawApp(script) as app, Agent({}, app=app.address, telemetry=tel) as agent:
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.inbound_port)
            writer.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await _read_response(reader))[1] == b"ok"
            writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(1000)
            writer.close()
            async with asyncio.timeout(5):
                await app.closed_by_peer.wait()  # the agent dropped the upstream connection
            assert fast[0] == 1
            async with asyncio.timeout(5):
                while len(tel.records) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert [r["status"] for r in tel.records] == [200, 200]
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                r = await c.get("/next")
                assert (r.status_code, r.text) == (200, "ok")
            assert app.connections == 2

    run(scenario())


def test_pooled_connection_closed_on_reuse_is_retried_on_a_fresh_one(fast: FastPathCount) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()

        async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
            if conn_no == 0 and req_no == 1:
                return False  # closes without a byte of answer
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        async with RawApp(script) as app, Agent({}, app=app.address, telemetry=tel) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                assert (await c.get("/warm")).status_code == 200
                r = await c.get("/again")
                assert (r.status_code, r.text) == (200, "ok")
                r = await c.get("/third")
                assert (r.status_code, r.text) == (200, "ok")
            assert fast[0] == 2
            assert app.connections == 2
            assert [h.split(b" ")[1] for h in app.heads] == [
                b"/warm",
                b"/again",
                b"/again",
                b"/third",
            ]
            assert [r["status"] for r in tel.records] == [200, 200, 200]

    run(scenario())


def test_fast_path_timeout_and_reset_before_the_head(fast: FastPathCount) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()

        async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
            if req_no == 1 and conn_no == 0:
                await asyncio.sleep(0.5)  # past the 200 ms inbound timeout
                return False
            if req_no == 1 and conn_no == 1:
                w.write(b"HTTP/1.1 200 OK\r\ncontent-")  # a partial head, then gone
                await w.drain()
                return False
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        cfg = {"inbound": {"timeout_ms": 200}}
        async with RawApp(script) as app, Agent(cfg, app=app.address, telemetry=tel) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                assert (await c.get("/warm")).status_code == 200
                r = await c.get("/slow")
                assert r.status_code == 504 and r.headers["x-mesh-error"] == "upstream-timeout"
                assert (await c.get("/warm2")).status_code == 200  # nothing pooled: not fast
                r = await c.get("/partial")
                assert r.status_code == 503 and r.headers["x-mesh-error"] == "upstream-reset"
            assert fast[0] == 2
            assert [r["status"] for r in tel.records] == [200, 504, 200, 503]

    run(scenario())


def test_fast_path_timeout_runs_from_each_request_not_from_the_connection_timer(
    fast: FastPathCount,
) -> None:
    """The per-connection timer armed by an earlier request is re-armed, not obeyed.

    The agent runs in this process on the same loop clock, so its 504 can be compared with the
    request's own deadline exactly: answering before it is the bug (the earlier request's
    timer firing). Only a lower bound is checked, which a loaded machine cannot break."""

    async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
        if req_no == 2:
            with contextlib.suppress(ConnectionError):
                await r.read()  # never answers; returns when the agent gives up on it
            return False
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    async def scenario() -> None:
        timeout_s = 0.6
        cfg = {"inbound": {"timeout_ms": int(timeout_s * 1000)}}
        async with RawApp(script) as app, Agent(cfg, app=app.address) as agent:
            loop = asyncio.get_running_loop()
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                assert (await c.get("/warm")).status_code == 200
                armed = loop.time()
                assert (await c.get("/arms-the-timer")).status_code == 200
                # Start the next request while that timer is still pending.
                await asyncio.sleep(timeout_s / 2)
                started = loop.time()
                r = await c.get("/hangs")
                answered = loop.time()
            assert r.status_code == 504 and r.headers["x-mesh-error"] == "upstream-timeout"
            if started < armed + timeout_s:  # else the machine was too slow to tell
                assert answered >= started + timeout_s - 0.005
            assert fast[0] == 2

    run(scenario())


# -- the outbound fast path -----------------------------------------------------------------------


@pytest.fixture
def fast_out(monkeypatch: pytest.MonkeyPatch) -> FastPathCount:
    """How many requests took the outbound fast path."""
    return count_fast_path(monkeypatch, "outbound")


def test_outbound_keep_alive_requests_take_the_fast_path(fast_out: FastPathCount) -> None:
    async def scenario() -> None:
        tel = FakeTelemetry(sample=True)

        async def echo(req: BackendRequest) -> Response:
            return Response(
                body=req.path.encode(), headers=[("connection", "x-hop"), ("x-hop", "1")]
            )

        async with Backend(echo) as be:
            cfg = {
                "services": [{"name": "reviews", "versions": {"v1": {"endpoints": [be.address]}}}]
            }
            async with (
                Agent(cfg, telemetry=tel) as agent,
                httpx.AsyncClient(proxy=agent.outbound) as c,
            ):
                for i in range(20):
                    r = await c.get(f"http://reviews/r{i}?q=1", headers={"x-mesh-source": "spoof"})
                    assert (r.status_code, r.text) == (200, f"/r{i}?q=1")
                    assert "x-hop" not in r.headers
            assert fast_out[0] == 19  # all but the first, made before a connection was pooled
            assert be.connections == 1
            for req in be.requests:
                assert req.headers["host"] == "reviews"
                assert req.headers["x-mesh-source"] == "web"
                assert req.headers["x-forwarded-for"] == "127.0.0.1"
                assert "content-length" not in req.headers
            assert [(r["destination"], r["status"]) for r in tel.records] == [("reviews", 200)] * 20
            assert all(s.status == 200 for s in tel.spans) and len(tel.spans) == 20
            assert {s.name for s in tel.spans} == {"reviews outbound"}
            described = tel.spans[0].attributes
            assert set(described) == {"http.request.method", "mesh.destination", "mesh.route"}
            assert described["http.request.method"] == "GET"
            assert described["mesh.destination"] == "reviews"

    run(scenario())


def test_outbound_fast_path_retries_a_5xx_on_another_endpoint(fast_out: FastPathCount) -> None:
    async def scenario() -> None:
        async def bad(req: BackendRequest) -> Response:
            return Response(status=500, body=b"bad")

        async def good(req: BackendRequest) -> Response:
            return Response(body=b"good")

        async with Backend(bad) as b1, Backend(good) as b2:
            svc = {
                "name": "reviews",
                "versions": {"v1": {"endpoints": [b1.address, b2.address]}},
                "load_balancer": "least_request",
                "retries": {"attempts": 1, "backoff_base_ms": 1, "backoff_max_ms": 1},
                "outlier_detection": {"enabled": False},
            }
            tel = FakeTelemetry()
            async with (
                Agent({"services": [svc]}, telemetry=tel) as agent,
                httpx.AsyncClient(base_url=agent.outbound) as c,
            ):
                replies = [(await c.get("/", headers={"host": "reviews"})) for _ in range(40)]
            assert [(r.status_code, r.text) for r in replies] == [(200, "good")] * 40
            assert len(b2.requests) == 40 and len(b1.requests) > 0
            assert fast_out[0] > 0  # some of them began on the fast path
            assert [r["status"] for r in tel.records] == [200] * 40  # one record per request

    run(scenario())


def test_outbound_fast_path_resends_on_a_pooled_connection_found_closed(
    fast_out: FastPathCount,
) -> None:
    async def scenario() -> None:
        async def script(conn_no: int, req_no: int, r: Any, w: asyncio.StreamWriter) -> bool:
            if conn_no == 0 and req_no == 1:
                return False  # closes without a byte of answer
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        async with RawApp(script) as app:
            svc = {
                "name": "reviews",
                "versions": {"v1": {"endpoints": [app.address]}},
                "retries": {"attempts": 0},
            }
            tel = FakeTelemetry()
            async with (
                Agent({"services": [svc]}, telemetry=tel) as agent,
                httpx.AsyncClient(base_url=agent.outbound) as c,
            ):
                for _ in range(3):
                    r = await c.get("/", headers={"host": "reviews"})
                    assert (r.status_code, r.text) == (200, "ok")
            assert fast_out[0] == 2
            assert app.connections == 2
            assert len(app.heads) == 4  # the lost request was sent again, once
            assert [r["status"] for r in tel.records] == [200, 200, 200]

    run(scenario())
