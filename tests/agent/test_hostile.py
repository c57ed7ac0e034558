"""Hostile input, each attack sent for real: path tricks past a prefix route, a regex built to
backtrack, floods of connections and headers, malformed framing, spoofed metric labels."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh_agent import telemetry
from mesh_agent.admin import AdminServer
from mesh_agent.proxy import MAX_HEADER_BYTES, Limits, normalize_path
from mesh_agent.telemetry import Telemetry

from .support import Agent, Backend, BackendRequest, Response, free_port, raw_exchange, run, service

pytestmark = pytest.mark.e2e


def _public_only(backend: str, **extra: Any) -> dict[str, Any]:
    """One service whose only route is the /public/ prefix: anything else is a 404."""
    route = {
        "name": "public",
        "match": {"path": {"prefix": "/public/"}},
        "backends": [{"version": "v1"}],
    }
    return {"services": [service("reviews", {"v1": [backend]}, routes=[route])], **extra}


async def _get(port: int, target: bytes, host: bytes = b"reviews") -> bytes:
    return await raw_exchange(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )


# -- path normalisation (CVE-2019-9901, CVE-2021-31920) --------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/public/%2E%2E/%2e/admin", b"/admin"),
        (b"//public//a/./b/", b"/public/a/b/"),
        (b"/public/a/b/..", b"/public/a/"),
        (b"/..", b"/"),
        (b"/%7Euser/%41%20%3f", b"/~user/A%20%3F"),
        (b"/public/..%2fadmin", None),
        (b"/public/..%5Cadmin", None),
        (b"/bad%zzescape", None),
        (b"/trailing%4", None),
    ],
)
def test_normalize_path(path: bytes, expected: bytes | None) -> None:
    assert normalize_path(path) == expected


def test_dot_segments_and_escapes_cannot_slip_past_a_prefix_route() -> None:
    async def scenario() -> None:
        async with Backend() as be, Agent(_public_only(be.address)) as agent:
            port = agent.outbound_port
            for attack in (b"/public/../admin", b"/public/%2e%2e/admin", b"/public/./../admin"):
                out = await _get(port, attack)
                assert out.startswith(b"HTTP/1.1 404 ") and b"no-route" in out, attack
            out = await _get(port, b"/public/..%2fadmin")
            assert out.startswith(b"HTTP/1.1 400 ") and b"x-mesh-error: invalid-path" in out
            out = await _get(port, b"/public/..%5cadmin")
            assert out.startswith(b"HTTP/1.1 400 ")
            assert be.requests == []  # none of it reached the service
            # what does match is forwarded normalised, query string untouched
            out = await _get(port, b"/public//a/%2e/b/../c?next=/../admin")
            assert out.startswith(b"HTTP/1.1 200 ")
            out = await _get(port, b"http://reviews/public/x/../y", host=b"reviews")
            assert out.startswith(b"HTTP/1.1 200 ")
            assert [q.path for q in be.requests] == ["/public/a/c?next=/../admin", "/public/y"]

    run(scenario())


@pytest.mark.parametrize(
    ("mode", "status", "forwarded"),
    [("keep", 200, "/public/..%2Fadmin"), ("unescape", 404, None)],
)
def test_encoded_slashes_can_be_kept_or_unescaped_by_config(
    mode: str, status: int, forwarded: str | None
) -> None:
    async def scenario() -> None:
        async with Backend() as be:
            cfg = _public_only(be.address, path_normalization={"escaped_slashes": mode})
            async with Agent(cfg) as agent:
                out = await _get(agent.outbound_port, b"/public/..%2fadmin")
            assert out.startswith(b"HTTP/1.1 %d " % status)
            assert [q.path for q in be.requests] == ([forwarded] if forwarded else [])

    run(scenario())


def test_inbound_forwards_the_normalised_path_on_both_paths() -> None:
    async def scenario() -> None:
        async def echo(req: BackendRequest) -> Response:
            return Response(body=req.path.encode())

        async with Backend(echo) as app, Agent({}, app=app.address) as agent:
            async with httpx.AsyncClient(base_url=agent.inbound) as c:
                assert (await c.get("/warm")).status_code == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.inbound_port)
            for target in (b"/public/%2e%2e/admin", b"/public/%2E%2E/admin"):
                writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await reader.readexactly(6) == b"/admin"
            writer.close()
            out = await _get(agent.inbound_port, b"/x/..%2fadmin", host=b"a")
            assert out.startswith(b"HTTP/1.1 400 ")
            assert [q.path for q in app.requests] == ["/warm", "/admin", "/admin"]

    run(scenario())


# -- regexes in linear time ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_backtracking_route_regex_does_not_freeze_the_agent() -> None:
    """With a backtracking engine this one request would block the event loop for longer than
    the test's timeout (2^34 steps); RE2 answers at once."""

    async def scenario() -> None:
        async with Backend() as be:
            route = {
                "name": "slow",
                "match": {"path": {"regex": "/slow/(a+)+b"}},
                "backends": [{"version": "v1"}],
            }
            header_route = {
                "name": "hdr",
                "match": {"headers": [{"name": "x-user", "regex": "(a+)+b"}]},
                "backends": [{"version": "v1"}],
            }
            svc = service("reviews", {"v1": [be.address]}, routes=[route, header_route])
            async with Agent({"services": [svc]}) as agent:
                out = await raw_exchange(
                    agent.outbound_port,
                    b"GET /slow/" + b"a" * 34 + b"! HTTP/1.1\r\nHost: reviews\r\n"
                    b"x-user: " + b"a" * 34 + b"!\r\nConnection: close\r\n\r\n",
                )
                assert out.startswith(b"HTTP/1.1 404 ")
                out = await _get(agent.outbound_port, b"/slow/aaab")
                assert out.startswith(b"HTTP/1.1 200 ")

    run(scenario())


# -- request hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: reviews\r\nHost: evil\r\n\r\n", 400, b"duplicate-host"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, b"missing-host"),
        (b"GET http://reviews/ HTTP/1.1\r\n\r\n", 400, b"missing-host"),
        (
            b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            b"unsupported-transfer-coding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"0\r\n\r\n",
            501,
            b"unsupported-transfer-coding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,  # refused by the parser itself: malformed rather than unsupported
            b"malformed-request",
        ),
    ],
)
def test_ambiguous_requests_are_refused(request_bytes: bytes, status: int, reason: bytes) -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            out = await raw_exchange(agent.outbound_port, request_bytes)
            assert out.startswith(b"HTTP/1.1 %d " % status), out[:100]
            assert b"x-mesh-error: " + reason in out
            assert be.requests == []

    run(scenario())


def test_fragment_is_stripped_http10_may_omit_host_and_every_connection_header_counts() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent(
                {"services": [service("reviews", {"v1": [be.address]})]}, app=be.address
            ) as agent,
        ):
            out = await _get(agent.outbound_port, b"/page?q=1#section-2")
            assert out.startswith(b"HTTP/1.1 200 ")
            out = await raw_exchange(agent.inbound_port, b"GET /old HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 ")
            out = await raw_exchange(
                agent.outbound_port,
                b"GET /conn HTTP/1.1\r\nHost: reviews\r\nConnection: x-one\r\n"
                b"Connection: x-two, close\r\nx-one: 1\r\nx-two: 2\r\nx-three: 3\r\n\r\n",
            )
            assert out.startswith(b"HTTP/1.1 200 ")
            page, old, conn = be.requests
            assert page.path == "/page?q=1"
            assert old.path == "/old"
            assert "x-one" not in conn.headers and "x-two" not in conn.headers
            assert conn.headers["x-three"] == "3"

    run(scenario())


# -- resource caps ---------------------------------------------------------------------------------


def test_connections_past_the_listener_cap_are_closed_at_once() -> None:
    async def scenario() -> None:
        limits = Limits(max_connections=3, drain_timeout_s=0.5)
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}, limits=limits) as a,
        ):
            held = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", a.outbound_port)
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
                await reader.readexactly(2)
                held.append((reader, writer))
            reader, writer = await asyncio.open_connection("127.0.0.1", a.outbound_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            async with asyncio.timeout(10):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""  # closed without an answer
            writer.close()
            assert a.proxy is not None and a.proxy.outbound.overflowed == 1
            # a freed slot serves again
            held[0][1].close()
            await held[0][1].wait_closed()
            async with asyncio.timeout(10):
                while len(a.proxy.outbound.conns) >= 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            out = await _get(a.outbound_port, b"/")
            assert out.startswith(b"HTTP/1.1 200 ")
            for _, w in held[1:]:
                w.close()

    run(scenario())


def test_header_count_is_capped() -> None:
    async def scenario() -> None:
        async with (
            Backend() as be,
            Agent({"services": [service("reviews", {"v1": [be.address]})]}) as agent,
        ):
            # 100 headers in all, Host and Connection included: the limit
            ok = b"".join(b"x-h%d: v\r\n" % i for i in range(98))
            out = await raw_exchange(
                agent.outbound_port,
                b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n" + ok + b"\r\n",
            )
            assert out.startswith(b"HTTP/1.1 200 ")
            too_many = b"".join(b"x-h%d: v\r\n" % i for i in range(100))  # 101 with Host
            out = await raw_exchange(
                agent.outbound_port, b"GET / HTTP/1.1\r\nHost: reviews\r\n" + too_many + b"\r\n"
            )
            assert out.startswith(b"HTTP/1.1 431 ") and b"too-many-headers" in out
            assert len(be.requests) == 1

    run(scenario())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_a_flood_of_header_heavy_connections_stays_within_the_documented_memory_cap(
    tmp_path: Path,
) -> None:
    """300 connections each sending ~56 KB of request head and then stalling (the attack that
    used to add 336 MB). Tiny headers hit the header count cap at once; big ones stay under
    both caps and are held until the header timeout: memory stays under the documented bound
    of ~100 KiB per connection."""
    admin, outbound = free_port(), free_port()
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh_agent",
            "--service",
            "web",
            "--admin",
            f"127.0.0.1:{admin}",
            "--outbound",
            f"127.0.0.1:{outbound}",
            "--state-dir",
            str(tmp_path / "state"),
            "--header-timeout",
            "60",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                time.sleep(0.05)
        before = _rss_kib(proc.pid)
        tiny = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 9000  # ~56 KB, 9000 headers
        big = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"x-%02d: %b\r\n" % (i, b"v" * 560) for i in range(98)
        )  # ~56 KB in 98 headers: under both caps, then nothing more
        assert len(big) < MAX_HEADER_BYTES
        for payload in (tiny, big):
            for _ in range(150):
                s = socket.create_connection(("127.0.0.1", outbound), timeout=10)
                s.sendall(payload)
                socks.append(s)
        for s in socks[:150]:  # the tiny-header ones were answered 431 and closed
            s.settimeout(10)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]
        # all 150 big heads are held (the agent counts them as open client connections)
        deadline = time.monotonic() + 20
        while True:
            text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
            if "mesh_agent_downstream_connections 150" in text:
                break
            assert time.monotonic() < deadline, text[-500:]
            time.sleep(0.05)
        grown_mib = (_rss_kib(proc.pid) - before) / 1024
        assert grown_mib < 300 * 100 / 1024, f"RSS grew by {grown_mib:.1f} MiB"
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_admin_listener_closes_silent_slow_and_idle_connections() -> None:
    async def scenario() -> None:
        def admin_server(agent: Agent, timeout_s: float) -> AdminServer:
            return AdminServer(
                config=agent.store,
                metrics=Telemetry(
                    service="web",
                    version="v1",
                    namespace="default",
                    sampling_ratio=0.0,
                    otlp_endpoint=None,
                ),
                bootstrap={},
                header_timeout_s=timeout_s,
                idle_timeout_s=timeout_s,
                max_connections=2,
            )

        async with Agent({}) as agent:
            quick = admin_server(agent, 0.2)
            _, port = await quick.start("127.0.0.1", 0)
            try:
                silent = await asyncio.open_connection("127.0.0.1", port)
                slow = await asyncio.open_connection("127.0.0.1", port)
                slow[1].write(b"GET /rea")
                async with asyncio.timeout(10):
                    assert await silent[0].read() == b""
                    assert await slow[0].read() == b""
                idle = await asyncio.open_connection("127.0.0.1", port)
                idle[1].write(b"GET /config HTTP/1.1\r\nHost: a\r\n\r\n")
                async with asyncio.timeout(10):
                    answered = await idle[0].read()  # answered, then closed when idle
                assert answered.startswith(b"HTTP/1.1 200 ")
                for _, w in (silent, slow, idle):
                    w.close()
            finally:
                await quick.close()
            # The cap: timeouts far away, so only the cap can close the third connection.
            capped = admin_server(agent, 600)
            _, port = await capped.start("127.0.0.1", 0)
            try:
                held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
                over = await asyncio.open_connection("127.0.0.1", port)
                async with asyncio.timeout(10):
                    with contextlib.suppress(ConnectionResetError):
                        assert await over[0].read() == b""
                for _, w in (*held, over):
                    w.close()
            finally:
                await capped.close()

    run(scenario())


# -- spoofed x-mesh-source -------------------------------------------------------------------------


def test_spoofed_sources_cannot_fill_the_metric_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_SOURCES", 4)  # "web" itself and three callers
    tel = Telemetry(
        service="web", version="v1", namespace="default", sampling_ratio=0.0, otlp_endpoint=None
    )

    async def scenario() -> None:
        sources = ["frontend", "checkout", *[f"spoof-{i}" for i in range(20)]]
        sources += ["Not A Name", "x" * 100, "ünïcode"]
        async with (
            Backend() as app,
            Agent({}, app=app.address, telemetry=tel) as agent,
            httpx.AsyncClient(base_url=agent.inbound) as c,
        ):
            for source in sources:
                r = await c.get("/", headers={"x-mesh-source": source.encode("utf-8")})
                assert r.status_code == 200

    run(scenario())
    counts = {row["source"]: row["requests"] for row in tel.snapshot()}
    assert counts == {"frontend": 1, "checkout": 1, "spoof-0": 1, "other": 22}
