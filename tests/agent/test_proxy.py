"""The proxy on real sockets: backends and clients on 127.0.0.1, the agent in-process on uvloop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from mesh_agent.proxy import Limits
from mesh_agent.proxy.mirror import MAX_MIRRORS_IN_FLIGHT

from .support import (
    Agent,
    Backend,
    BackendRequest,
    FakeTelemetry,
    Response,
    free_port,
    raw_exchange,
    run,
    service,
)

pytestmark = pytest.mark.e2e


def _client(agent: Agent, *, proxy: bool = False, **kw: object) -> httpx.AsyncClient:
    if proxy:
        return httpx.AsyncClient(proxy=agent.outbound, timeout=10, **kw)  # type: ignore[arg-type]
    return httpx.AsyncClient(base_url=agent.outbound, timeout=10, **kw)  # type: ignore[arg-type]


def test_outbound_by_proxy_form_and_host_header_with_header_hygiene() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            async with _client(agent, proxy=True) as c:
                r = await c.get(
                    "http://reviews/a/b?q=1",
                    headers={
                        "connection": "x-secret",
                        "x-secret": "hop",
                        "keep-alive": "timeout=5",
                        "proxy-authorization": "Basic Zm9v",
                        "te": "trailers",
                        "x-mesh-source": "spoofed",
                        "x-forwarded-for": "203.0.113.9",
                        "x-keep": "yes",
                    },
                )
                assert r.status_code == 200 and r.text == "ok"
            async with _client(agent) as c:
                r = await c.get("/c", headers={"host": "reviews.default.svc.cluster.local:80"})
                assert r.status_code == 200
            first, second = be.requests
            assert first.path == "/a/b?q=1"  # absolute form became origin form
            assert first.headers["host"] == "reviews"
            for hop in ("connection", "x-secret", "keep-alive", "proxy-authorization", "te"):
                assert hop not in first.headers, hop
            assert first.headers["x-keep"] == "yes"
            assert "content-length" not in first.headers  # a GET without body stays so
            assert first.headers["x-mesh-source"] == "web"  # the client's value was replaced
            assert first.headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
            assert len(first.headers["x-request-id"]) == 36
            assert second.path == "/c"
            assert second.headers["host"] == "reviews.default.svc.cluster.local:80"

    run(scenario())


def test_request_id_is_kept_and_trace_context_propagated() -> None:
    async def scenario() -> None:
        tel = FakeTelemetry(sample=True)
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}, telemetry=tel) as agent,
        ):
            async with _client(agent) as c:
                incoming = "00-11111111111111111111111111111111-2222222222222222-01"
                r = await c.get(
                    "/", headers={"host": "reviews", "x-request-id": "abc", "traceparent": incoming}
                )
                assert r.status_code == 200
            (req,) = be.requests
            assert req.headers["x-request-id"] == "abc"
            assert req.headers["traceparent"] == tel.spans[0].traceparent().decode()
            assert tel.spans[0].incoming == incoming.encode()
            assert tel.spans[0].status == 200
            assert tel.records == [
                {
                    "source": "web",
                    "destination": "reviews",
                    "destination_version": "v1",
                    "status": 200,
                    "duration_s": tel.records[0]["duration_s"],
                }
            ]

    run(scenario())


def test_keep_alive_reuses_one_upstream_connection() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            async with _client(agent) as c:
                for _ in range(25):
                    r = await c.get("/", headers={"host": "reviews"})
                    assert r.status_code == 200
            assert len(be.requests) == 25
            assert be.connections == 1

    run(scenario())


def test_pipelined_requests_are_answered_in_order() -> None:
    async def scenario() -> None:
        async def handler(req: BackendRequest) -> Response:
            return Response(body=req.path.encode())

        async with (
            Backend(handler) as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            data = b"".join(
                b"GET /p%d HTTP/1.1\r\nHost: reviews\r\n%s\r\n"
                % (i, b"Connection: close\r\n" if i == 2 else b"")
                for i in range(3)
            )
            out = await raw_exchange(agent.outbound_port, data)
            assert out.count(b"HTTP/1.1 200") == 3
            assert out.index(b"/p0") < out.index(b"/p1") < out.index(b"/p2")

    run(scenario())


def test_chunked_request_and_streamed_chunked_response() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def handler(req: BackendRequest) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield b"first:" + req.body
                await release.wait()  # the first chunk must reach the client before this
                yield b":last"

            return Response(body=body())

        async with (
            Backend(handler) as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):

            async def upload() -> AsyncIterator[bytes]:
                for part in (b"he", b"llo"):
                    yield part

            async with _client(agent) as c:
                req = c.build_request("POST", "/", headers={"host": "reviews"}, content=upload())
                resp = await c.send(req, stream=True)
                assert resp.headers["transfer-encoding"] == "chunked"
                chunks = resp.aiter_raw()
                got = b""
                while b"first:hello" not in got:
                    got += await chunks.__anext__()
                release.set()  # streaming proven: we have data while the backend still waits
                async for chunk in chunks:
                    got += chunk
                await resp.aclose()
                assert got == b"first:hello:last"
            assert be.requests[0].chunked is False  # small chunked upload was buffered and sized
            assert be.requests[0].headers["content-length"] == "5"

    run(scenario())


@pytest.mark.slow
def test_large_bodies_stream_both_ways() -> None:
    size = 20 * 1024 * 1024
    blob = os.urandom(1024 * 1024)

    async def scenario() -> None:
        async def handler(req: BackendRequest) -> Response:
            if req.method == "GET":

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(size // len(blob)):
                        yield blob

                return Response(body=body())
            return Response(body=req.body_sha256.encode())

        async with (
            Backend(handler) as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):

            async def upload() -> AsyncIterator[bytes]:
                for _ in range(size // len(blob)):
                    yield blob

            expected = hashlib.sha256(blob * (size // len(blob))).hexdigest()
            async with _client(agent) as c:
                r = await c.post("/up", headers={"host": "reviews"}, content=upload())
                assert r.status_code == 200 and r.text == expected
                assert be.requests[0].body_size == size
                assert be.requests[0].chunked  # streamed on, not buffered and re-sized
                h = hashlib.sha256()
                n = 0
                async with c.stream("GET", "/down", headers={"host": "reviews"}) as resp:
                    async for chunk in resp.aiter_bytes():
                        h.update(chunk)
                        n += len(chunk)
                assert n == size and h.hexdigest() == expected

    run(scenario())


def test_fixed_length_large_upload_keeps_content_length_and_is_not_retried() -> None:
    body = os.urandom(300_000)

    async def scenario() -> None:
        async def failing(req: BackendRequest) -> Response:
            return Response(status=503, body=str(req.body_size).encode())

        async with Backend(failing) as be:
            policy = {"attempts": 3, "retry_non_idempotent": True}
            cfg = {"services": [service("reviews", {"v1": [be.address]}, retries=policy)]}
            async with Agent(cfg) as agent, _client(agent) as c:
                r = await c.put("/", headers={"host": "reviews"}, content=body)
                assert r.status_code == 503 and r.text == "300000"
                r = await c.put("/", headers={"host": "reviews"}, content=b"small")
                assert r.status_code == 503
            # the large body went once (too big to keep for a retry), the small one 4 times
            assert [q.body_size for q in be.requests] == [300_000] + [5] * 4
            assert be.requests[0].headers["content-length"] == "300000"

    run(scenario())


def test_upstream_refusing_gives_503_and_timeout_gives_504() -> None:
    async def scenario() -> None:
        hang = asyncio.Event()

        async def slow(req: BackendRequest) -> Response:
            await hang.wait()
            return Response()

        dead = f"127.0.0.1:{free_port()}"
        async with Backend(slow) as be:
            cfg = {
                "services": [
                    service("dead", {"v1": [dead]}, retries={"attempts": 1}),
                    service("slow", {"v1": [be.address]}, timeout_ms=300),
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                r = await c.get("/", headers={"host": "dead"})
                assert r.status_code == 503
                assert r.headers["x-mesh-error"] == "connect-failure"
                assert r.text == "connect-failure\n"
                r = await c.get("/", headers={"host": "slow"})
                assert r.status_code == 504
                assert r.headers["x-mesh-error"] == "upstream-timeout"
            hang.set()

    run(scenario())


def test_retries_on_5xx_then_success_but_not_for_post() -> None:
    async def scenario() -> None:
        calls = {"n": 0}

        async def flaky(req: BackendRequest) -> Response:
            calls["n"] += 1
            return Response(status=503 if calls["n"] % 3 else 200, body=b"attempt %d" % calls["n"])

        async with Backend(flaky) as be:
            cfg = {"services": [service("reviews", {"v1": [be.address]}, retries={"attempts": 2})]}
            async with Agent(cfg) as agent, _client(agent) as c:
                r = await c.get("/", headers={"host": "reviews"})
                assert r.status_code == 200 and r.text == "attempt 3"
                r = await c.post("/", headers={"host": "reviews"}, content=b"x")
                assert r.status_code == 503 and r.text == "attempt 4"  # POST: no retry
                assert len(be.requests) == 4

    run(scenario())


def test_retry_goes_to_another_endpoint() -> None:
    async def scenario() -> None:
        async def bad(req: BackendRequest) -> Response:
            return Response(status=500, body=b"bad")

        async def good(req: BackendRequest) -> Response:
            return Response(body=b"good")

        async with Backend(bad) as b1, Backend(good) as b2:
            cfg = {
                "services": [
                    service(
                        "reviews",
                        {"v1": [b1.address, b2.address]},
                        load_balancer="least_request",
                        retries={"attempts": 1, "backoff_base_ms": 1, "backoff_max_ms": 1},
                        outlier_detection={"enabled": False},
                    )
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                replies = [(await c.get("/", headers={"host": "reviews"})) for _ in range(30)]
            # One retry is enough for every request: it never goes back to the endpoint that
            # just failed (least_request picks at random, so a retry on b1 would show up).
            assert [(r.status_code, r.text) for r in replies] == [(200, "good")] * 30
            assert len(b2.requests) == 30
            assert len(b1.requests) > 0  # some requests did start on b1 and were retried

    run(scenario())


def test_outlier_gets_ejected_after_five_consecutive_failures() -> None:
    async def scenario() -> None:
        async def bad(req: BackendRequest) -> Response:
            return Response(status=500, body=b"bad")

        async def good(req: BackendRequest) -> Response:
            return Response(body=b"good")

        async with Backend(bad) as b1, Backend(good) as b2:
            cfg = {
                "services": [
                    service(
                        "reviews",
                        {"v1": [b1.address, b2.address]},
                        load_balancer="round_robin",
                        retries={"attempts": 0},
                    )
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                statuses = [
                    (await c.get("/", headers={"host": "reviews"})).status_code for _ in range(40)
                ]
            assert statuses.count(500) == 5  # five consecutive failures, then ejected
            assert statuses[-20:] == [200] * 20
            assert len(b1.requests) == 5

    run(scenario())


def test_rate_limit_answers_429() -> None:
    async def scenario() -> None:
        async with Backend() as be:
            cfg = {
                "services": [
                    service(
                        "reviews",
                        {"v1": [be.address]},
                        rate_limit={"requests_per_second": 0.001, "burst": 2},
                    )
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                codes = [(await c.get("/", headers={"host": "reviews"})) for _ in range(3)]
                assert [r.status_code for r in codes] == [200, 200, 429]
                assert codes[2].headers["x-mesh-error"] == "rate-limited"
                assert len(be.requests) == 2

    run(scenario())


def test_fault_abort_and_unknown_destinations() -> None:
    async def scenario() -> None:
        async with Backend() as be:
            cfg = {
                "services": [
                    service(
                        "reviews",
                        {"v1": [be.address]},
                        routes=[
                            {
                                "name": "chaos",
                                "match": {"path": {"prefix": "/chaos"}},
                                "backends": [{"version": "v1"}],
                                "fault": {"abort": {"percent": 100, "status": 418}},
                            },
                            {
                                "name": "api",
                                "match": {"path": {"prefix": "/api"}},
                                "backends": [{"version": "v1"}],
                            },
                        ],
                    )
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                r = await c.get("/chaos", headers={"host": "reviews"})
                assert (r.status_code, r.headers["x-mesh-error"]) == (418, "fault-abort")
                r = await c.get("/other", headers={"host": "reviews"})
                assert (r.status_code, r.headers["x-mesh-error"]) == (404, "no-route")
                r = await c.get("/api", headers={"host": "nosuch"})
                assert (r.status_code, r.headers["x-mesh-error"]) == (404, "unknown-service")
                r = await c.get("/api", headers={"host": "reviews"})
                assert r.status_code == 200
            assert [q.path for q in be.requests] == ["/api"]

    run(scenario())


def test_mirror_copies_requests_without_touching_the_caller() -> None:
    async def scenario() -> None:
        stuck = asyncio.Event()
        all_mirrored = asyncio.Event()
        arrived = [0]

        async def shadow(req: BackendRequest) -> Response:
            arrived[0] += 1
            if arrived[0] == 5:
                all_mirrored.set()
            await stuck.wait()  # the mirror never answers: the caller must not notice
            return Response(status=500)

        async with Backend() as main, Backend(shadow) as mirror:
            cfg = {
                "services": [
                    service(
                        "reviews",
                        {"v1": [main.address], "v2": [mirror.address]},
                        routes=[
                            {
                                "name": "r",
                                "backends": [{"version": "v1"}],
                                "mirror": {"version": "v2", "percent": 100},
                            }
                        ],
                    )
                ]
            }
            async with Agent(cfg) as agent, _client(agent) as c:
                for i in range(5):
                    r = await c.post(f"/{i}", headers={"host": "reviews"}, content=b"payload")
                    assert r.status_code == 200 and r.text == "ok"
                async with asyncio.timeout(10):
                    await all_mirrored.wait()
            stuck.set()
            assert len(main.requests) == 5
            assert sorted(q.path for q in mirror.requests) == [f"/{i}" for i in range(5)]
            assert all(
                q.headers["host"] == "reviews-shadow" and q.body == b"payload"
                for q in mirror.requests
            )

    run(scenario())


def test_malformed_and_oversized_requests_get_agent_errors() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            out = await raw_exchange(agent.outbound_port, b"GARBAGE\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400 ") and b"x-mesh-error: malformed-request" in out
            big = b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
            out = await raw_exchange(agent.outbound_port, big)
            assert out.startswith(b"HTTP/1.1 431 ") and b"x-mesh-error: headers-too-large" in out
            out = await raw_exchange(
                agent.outbound_port, b"CONNECT reviews:443 HTTP/1.1\r\nHost: reviews\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 501 ")
            out = await raw_exchange(
                agent.outbound_port,
                b"GET https://reviews/ HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
            )
            assert out.startswith(b"HTTP/1.1 501 ")
            # still serving after all that
            async with _client(agent) as c:
                assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
            assert len(be.requests) == 1

    run(scenario())


def test_head_and_no_content_responses_keep_the_connection_usable() -> None:
    async def scenario() -> None:
        async def handler(req: BackendRequest) -> Response:
            if req.path == "/empty":
                return Response(status=204, body=b"")
            return Response(body=b"twelve bytes")

        async with (
            Backend(handler) as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
            _client(agent) as c,
        ):
            r = await c.head("/", headers={"host": "reviews"})
            assert r.status_code == 200 and r.headers["content-length"] == "12" and r.content == b""
            r = await c.get("/empty", headers={"host": "reviews"})
            assert r.status_code == 204
            r = await c.get("/", headers={"host": "reviews"})
            assert r.text == "twelve bytes"

    run(scenario())


@pytest.mark.slow
def test_slow_client_gets_408() -> None:
    async def scenario() -> None:
        async with Agent({"services": []}, limits=Limits(header_timeout_s=0.5)) as agent:
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.outbound_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: rev")  # ... and nothing more
            out = await reader.read()
            writer.close()
            assert out.startswith(b"HTTP/1.1 408 ") and b"request-timeout" in out

    run(scenario())


@pytest.mark.slow
def test_stalled_request_body_and_idle_keep_alive_connections_are_closed() -> None:
    async def scenario() -> None:
        limits = Limits(body_timeout_s=0.3, idle_timeout_s=0.3, drain_timeout_s=0.5)
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}, limits=limits) as agent,
        ):
            # a body that stops after 3 of 10 bytes
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.outbound_port)
            writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 10\r\n\r\nabc")
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # closed by the agent, not left hanging
            writer.close()
            # an answered request, then silence on the kept-alive connection
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.outbound_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head
                assert await reader.readexactly(2) == b"ok"
                assert await reader.read() == b""  # the idle connection was closed
            writer.close()

    run(scenario())


def test_inbound_forwards_to_app_and_reports_the_caller() -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()
        async with Backend() as app:
            cfg = {"inbound": {"rate_limit": {"requests_per_second": 0.001, "burst": 2}}}
            async with Agent(cfg, app=app.address, telemetry=tel) as agent:
                async with httpx.AsyncClient(base_url=agent.inbound) as c:
                    r1 = await c.get("/x", headers={"x-mesh-source": "frontend"})
                    r2 = await c.get("/y")
                    r3 = await c.get("/z")
                assert (r1.status_code, r2.status_code, r3.status_code) == (200, 200, 429)
            assert [q.path for q in app.requests] == ["/x", "/y"]
            assert "x-mesh-source" not in app.requests[0].headers
            assert [(r["source"], r["destination"], r["status"]) for r in tel.records] == [
                ("frontend", "web", 200),
                ("unknown", "web", 200),
                ("unknown", "web", 429),
            ]

    run(scenario())


def test_inbound_app_down_is_503_and_recorded_as_failure() -> None:
    async def scenario() -> None:
        tel = FakeTelemetry()
        async with Agent({}, app=f"127.0.0.1:{free_port()}", telemetry=tel) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                r = await c.get("/")
            assert r.status_code == 503 and r.headers["x-mesh-error"] == "connect-failure"
            assert tel.records[0]["status"] == 503

    run(scenario())


def test_two_hop_mesh_path() -> None:
    """app A -> outbound agent A -> inbound agent B -> app B, with the source carried across."""

    async def scenario() -> None:
        tel_b = FakeTelemetry()
        async with (
            Backend() as app_b,
            Agent({}, app=app_b.address, telemetry=tel_b, service="reviews") as agent_b,
        ):
            cfg = {"services": [service("reviews", {"v1": [f"127.0.0.1:{agent_b.inbound_port}"]})]}
            async with (
                Agent(cfg, service="productpage") as agent_a,
                _client(agent_a, proxy=True) as c,
            ):
                r = await c.get("http://reviews/hello")
                assert r.status_code == 200 and r.text == "ok"
            assert app_b.requests[0].path == "/hello"
            assert tel_b.records[0]["source"] == "productpage"

    run(scenario())


@pytest.mark.slow
def test_config_swap_under_load_loses_no_request() -> None:
    async def scenario() -> None:
        async def v1(req: BackendRequest) -> Response:
            return Response(body=b"v1")

        async def v2(req: BackendRequest) -> Response:
            return Response(body=b"v2")

        async with Backend(v1) as b1, Backend(v2) as b2:

            def cfg(w1: int, w2: int) -> dict[str, object]:
                return {
                    "services": [
                        service(
                            "reviews",
                            {"v1": [b1.address], "v2": [b2.address]},
                            routes=[
                                {
                                    "name": "split",
                                    "backends": [
                                        {"version": "v1", "weight": w1},
                                        {"version": "v2", "weight": w2},
                                    ],
                                }
                            ],
                            retries={"attempts": 0},
                        )
                    ]
                }

            async with Agent(cfg(100, 0)) as agent:
                stop = asyncio.Event()
                results: list[tuple[int, str]] = []

                async def load() -> None:
                    async with _client(agent) as c:
                        while not stop.is_set():
                            r = await c.get("/", headers={"host": "reviews"})
                            results.append((r.status_code, r.text))

                workers = [asyncio.create_task(load()) for _ in range(8)]
                async with _client(agent) as probe:
                    for i in range(40):
                        # All traffic to one version: the next request sees the swap at once.
                        only = "v2" if i % 2 else "v1"
                        agent.apply(cfg(0 if i % 2 else 100, 100 if i % 2 else 0))
                        r = await probe.get("/", headers={"host": "reviews"})
                        assert (r.status_code, r.text) == (200, only)
                        agent.apply(cfg(50, 50 + i))
                        await asyncio.sleep(0.01)
                stop.set()
                await asyncio.gather(*workers)
            assert len(results) > 40
            assert {s for s, _ in results} == {200}
            assert {t for _, t in results} == {"v1", "v2"}

    run(scenario())


def test_requests_in_flight_finish_on_the_config_they_started_with() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        arrived = asyncio.Event()

        async def slow_v1(req: BackendRequest) -> Response:
            arrived.set()
            await gate.wait()
            return Response(body=b"v1")

        async def v2(req: BackendRequest) -> Response:
            return Response(body=b"v2")

        async with Backend(slow_v1) as b1, Backend(v2) as b2:
            old = {"services": [service("reviews", {"v1": [b1.address]}, timeout_ms=600_000)]}
            new = {"services": [service("reviews", {"v2": [b2.address]})]}
            async with Agent(old) as agent, _client(agent) as c1, _client(agent) as c2:
                pending = asyncio.create_task(c1.get("/", headers={"host": "reviews"}))
                await arrived.wait()
                agent.apply(new)  # b1 is no longer in the config at all
                r_new = await c2.get("/", headers={"host": "reviews"})
                gate.set()
                r_old = await pending
            assert (r_old.status_code, r_old.text) == (200, "v1")
            assert (r_new.status_code, r_new.text) == (200, "v2")

    run(scenario())


def test_connection_limit_overflow_gives_503() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        arrived = asyncio.Event()

        async def slow(req: BackendRequest) -> Response:
            arrived.set()
            await gate.wait()
            return Response()

        async with Backend(slow) as be:
            limits = {"max_connections": 1, "max_pending_requests": 0}
            cfg = {"services": [service("reviews", {"v1": [be.address]}, connection_limits=limits)]}
            async with Agent(cfg) as agent, _client(agent) as c1, _client(agent) as c2:
                first = asyncio.create_task(c1.get("/", headers={"host": "reviews"}))
                await arrived.wait()
                r = await c2.get("/", headers={"host": "reviews"})
                assert (r.status_code, r.headers["x-mesh-error"]) == (503, "overflow")
                gate.set()
                assert (await first).status_code == 200
            assert be.connections == 1

    run(scenario())


def test_upstream_closing_keep_alive_connections_costs_no_request() -> None:
    async def scenario() -> None:
        async def closing(req: BackendRequest) -> Response:
            return Response(body=b"bye", close=True)

        async with Backend(closing) as be:
            cfg = {"services": [service("reviews", {"v1": [be.address]}, retries={"attempts": 0})]}
            async with Agent(cfg) as agent, _client(agent) as c:
                for _ in range(10):
                    r = await c.get("/", headers={"host": "reviews"})
                    assert (r.status_code, r.text) == (200, "bye")
            assert be.connections == 10

    run(scenario())


@pytest.mark.parametrize(
    "connection", [b"", b"Connection: keep-alive\r\n"], ids=["plain", "asks-keep-alive"]
)
@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_http10_client_gets_close_delimited_streamed_body(side: str, connection: bytes) -> None:
    # An HTTP/1.0 caller cannot read chunked framing, whether or not it asked to keep the
    # connection (the agent tells 1.0 from 1.1 by keep-alive where it can: see on_headers_complete).
    async def scenario() -> None:
        head_read = asyncio.Event()

        async def streamed(req: BackendRequest) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield b"a" * 10
                # The rest only once the caller has the head: the agent must frame a body
                # whose length it does not know yet.
                await head_read.wait()
                yield b"b" * 10

            return Response(body=body())

        async with Backend(streamed) as be:
            cfg = {"services": [service("reviews", {"v1": [be.address]})]}
            async with Agent(cfg, app=be.address) as agent:
                port = agent.outbound_port if side == "outbound" else agent.inbound_port
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.0\r\nHost: reviews\r\n" + connection + b"\r\n")
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                head_read.set()
                length = re.search(rb"\r\ncontent-length: *(\d+)", head)
                # Framed by a length (kept alive) or by the close; never chunked.
                body = await (reader.readexactly(int(length[1])) if length else reader.read())
                writer.close()
            assert head.startswith(b"http/1.1 200")
            assert b"transfer-encoding" not in head
            assert body == b"a" * 10 + b"b" * 10

    run(scenario())


@pytest.mark.slow
def test_garbage_input_never_takes_the_agent_down(caplog: pytest.LogCaptureFixture) -> None:
    import random

    rng = random.Random(1234)
    seeds = [
        b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET http://reviews/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    ]

    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            i = rng.randrange(len(b) + 1)
            if op < 0.4 and b:
                b[min(i, len(b) - 1)] = rng.randrange(256)
            elif op < 0.7:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
            else:
                del b[i : i + rng.randint(1, 5)]
        return bytes(b)

    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            for _ in range(300):
                payload = mutate(rng.choice(seeds))
                reader, writer = await asyncio.open_connection("127.0.0.1", agent.outbound_port)
                writer.write(payload)
                # The client is done sending: whatever the agent made of the bytes, it must
                # answer (or not) and close, never hang on a request that cannot complete.
                writer.write_eof()
                async with asyncio.timeout(10):
                    out = await reader.read()
                writer.close()
                assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
            async with _client(agent) as c:
                r = await c.get("/", headers={"host": "reviews"})
                assert r.status_code == 200

    run(scenario(), timeout=120)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("mesh")]
    assert errors == []


# -- what no test covered before ------------------------------------------------------------------


def test_uri_longer_than_the_header_limit_gets_414() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            long_target = b"/" + b"a" * 70_000
            out = await raw_exchange(
                agent.outbound_port, b"GET " + long_target + b" HTTP/1.1\r\nHost: reviews\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 414 ") and b"x-mesh-error: uri-too-long" in out
            assert be.requests == []

    run(scenario())


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async def scenario() -> None:
        async def echo(req: BackendRequest) -> Response:
            return Response(body=req.body)

        async with (
            Backend(echo) as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.outbound_port)
            writer.write(
                b"POST /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            async with asyncio.timeout(10):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            assert be.requests == []  # nothing forwarded before the body came
            writer.write(b"hello")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(5)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"
            assert "expect" not in be.requests[0].headers  # the agent answered it itself

    run(scenario())


def test_upgrade_requests_get_501_and_reach_no_upstream() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            out = await raw_exchange(
                agent.outbound_port,
                b"GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            assert out.startswith(b"HTTP/1.1 501 ") and b"x-mesh-error: unsupported" in out
            assert be.requests == []

    run(scenario())


def test_hop_by_hop_headers_are_stripped_from_responses() -> None:
    """Including the headers each Connection header names, with several Connection headers."""

    async def scenario() -> None:
        async def hoppy(req: BackendRequest) -> Response:
            return Response(
                body=b"ok",
                headers=[
                    ("Connection", "x-first-hop"),
                    ("Connection", "x-second-hop, keep-alive"),
                    ("x-first-hop", "1"),
                    ("x-second-hop", "2"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Upgrade", "h2c"),
                    ("Trailer", "x-checksum"),
                    ("x-end-to-end", "kept"),
                ],
            )

        async with Backend(hoppy) as be:
            cfg = {"services": [service("reviews", {"v1": [be.address]})]}
            async with Agent(cfg, app=be.address) as agent:
                heads = [
                    await raw_exchange(
                        agent.outbound_port,
                        b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
                    )
                ]
                async with httpx.AsyncClient(base_url=agent.inbound) as c:
                    for _ in range(2):  # the general path, then the fast path
                        r = await c.get("/")
                        assert r.status_code == 200
                heads += [
                    await raw_exchange(
                        agent.inbound_port,
                        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    )
                ]
                async with httpx.AsyncClient(base_url=agent.inbound) as c:
                    assert (await c.get("/")).status_code == 200
                    r = await c.get("/")  # a pooled connection: the fast path
                    assert r.headers["x-end-to-end"] == "kept"
                    for name in ("x-first-hop", "x-second-hop", "keep-alive", "upgrade"):
                        assert name not in r.headers, name
            for raw in heads:
                head = raw.partition(b"\r\n\r\n")[0].lower()
                assert b"x-end-to-end: kept" in head
                for name in (
                    b"x-first-hop",
                    b"x-second-hop",
                    b"keep-alive",
                    b"proxy-authenticate",
                    b"upgrade",
                    b"trailer",
                ):
                    assert name + b":" not in head, name
                assert head.count(b"connection:") == 1  # the agent's own "close"

    run(scenario())


def test_per_try_timeout_moves_on_to_the_next_try() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        calls = [0]

        async def first_hangs(req: BackendRequest) -> Response:
            calls[0] += 1
            if calls[0] == 1:
                await release.wait()
            return Response(body=b"try %d" % calls[0])

        async with Backend(first_hangs) as b1, Backend(first_hangs) as b2:
            retries = {"attempts": 1, "per_try_timeout_ms": 200}
            # The route timeout is far above the per-try one: without a per-try timeout the
            # caller would get a 504 from the route timeout instead of the second try's answer.
            svc = service(
                "reviews", {"v1": [b1.address, b2.address]}, timeout_ms=8000, retries=retries
            )
            async with Agent({"services": [svc]}) as agent, _client(agent) as c:
                r = await c.get("/", headers={"host": "reviews"})
            release.set()
            assert (r.status_code, r.text) == (200, "try 2")
            assert len(b1.requests) + len(b2.requests) == 2

    run(scenario())


def test_retry_budget_caps_retries_through_the_proxy() -> None:
    """Budget 50 % of requests and no floor: of 10 failing requests, every second one may be
    retried once (10 + 5 tries), however many attempts the policy allows."""

    async def scenario() -> None:
        async def failing(req: BackendRequest) -> Response:
            return Response(status=503, body=b"no")

        async with Backend(failing) as be:
            svc = service(
                "reviews",
                {"v1": [be.address]},
                retries={"attempts": 2, "backoff_base_ms": 1, "backoff_max_ms": 1},
                retry_budget={"percent": 50, "min_retries_per_second": 0, "window_s": 600},
                outlier_detection={"enabled": False},
            )
            async with Agent({"services": [svc]}) as agent, _client(agent) as c:
                for _ in range(10):
                    assert (await c.get("/", headers={"host": "reviews"})).status_code == 503
            assert len(be.requests) == 15

    run(scenario())


def test_mirrors_in_flight_are_capped_and_the_rest_shed() -> None:
    async def scenario() -> None:
        stuck = asyncio.Event()
        cap_reached = asyncio.Event()
        final_mirrored = asyncio.Event()
        cap = MAX_MIRRORS_IN_FLIGHT

        async def shadow(req: BackendRequest) -> Response:
            if req.path.startswith("/final"):
                final_mirrored.set()
                return Response()
            if len(mirror.requests) == cap:
                cap_reached.set()
            await stuck.wait()
            return Response()

        async with Backend() as main, Backend(shadow) as mirror:
            route = {
                "name": "r",
                "backends": [{"version": "v1"}],
                "mirror": {"version": "v2", "percent": 100},
            }
            svc = service("reviews", {"v1": [main.address], "v2": [mirror.address]}, routes=[route])
            async with Agent({"services": [svc]}) as agent, _client(agent) as c:
                for i in range(cap + 6):
                    r = await c.post(f"/{i}", headers={"host": "reviews"}, content=b"x")
                    assert r.status_code == 200  # the caller never waits for its mirror
                async with asyncio.timeout(10):
                    await cap_reached.wait()
                stuck.set()
                # Once the stuck mirrors are done, mirroring resumes.
                async with asyncio.timeout(10):
                    n = 0
                    while not final_mirrored.is_set():
                        await c.post(f"/final{n}", headers={"host": "reviews"}, content=b"x")
                        n += 1
            mirrored = [q.path for q in mirror.requests if not q.path.startswith("/final")]
            assert sorted(mirrored, key=lambda p: int(p[1:])) == [f"/{i}" for i in range(cap)]

    run(scenario())
