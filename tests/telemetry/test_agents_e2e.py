"""Real mesh-agent processes carrying real traffic report to a real receiver: the edge, its
error rate under a 10 % injected abort, and the traces, as the console will show them."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.telemetry.models import EdgeRollup, Span
from tests.agent.support import free_port
from tests.telemetry.conftest import LiveReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REQUESTS = 400


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def app_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def agent(tmp_path: Path, name: str, receiver: str, *extra: str) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).with_name("mesh-agent")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mesh_agent"]
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [
            *command,
            "--otlp-endpoint",
            receiver,
            "--otlp-header",
            "Authorization=Bearer e2e",
            "--metrics-interval",
            "0.5",
            "--sampling-ratio",
            "1",
            "--state-dir",
            str(tmp_path / "state"),
            "--admin",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MESH_AGENT_LOG_LEVEL": "warning"},
    )


def wait_for(predicate, what: str, limit_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition that has no event to wait on (the agents report on their own timer)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_agents_report_the_edge_its_error_rate_and_traces(
    live_receiver: LiveReceiver, app_server: int, tmp_path: Path
) -> None:
    reviews_in, web_out = free_port(), free_port()
    config = {
        "services": [
            {
                "name": "reviews",
                "versions": {"v2": {"endpoints": [f"127.0.0.1:{reviews_in}"]}},
                "routes": [
                    {
                        "name": "all",
                        "backends": [{"version": "v2", "weight": 100}],
                        "fault": {"abort": {"percent": 10, "status": 503}},
                    }
                ],
            }
        ]
    }
    (tmp_path / "web.json").write_text(json.dumps(config))
    (tmp_path / "reviews.json").write_text(json.dumps({"services": []}))
    processes = [
        agent(
            tmp_path,
            "reviews",
            live_receiver.url,
            "--service",
            "reviews",
            "--version",
            "v2",
            "--namespace",
            "shop",
            "--app",
            f"127.0.0.1:{app_server}",
            "--inbound",
            f"127.0.0.1:{reviews_in}",
            "--outbound",
            "127.0.0.1:0",
            "--config",
            str(tmp_path / "reviews.json"),
        ),
        agent(
            tmp_path,
            "web",
            live_receiver.url,
            "--service",
            "web",
            "--version",
            "v1",
            "--namespace",
            "shop",
            "--outbound",
            f"127.0.0.1:{web_out}",
            "--config",
            str(tmp_path / "web.json"),
        ),
    ]
    try:
        for port in (reviews_in, web_out):
            wait_for(lambda p=port: _listening(p), f"an agent on port {port}")
        statuses: dict[int, int] = {}
        connection = http.client.HTTPConnection("127.0.0.1", web_out, timeout=10)
        for i in range(REQUESTS):
            connection.request("GET", f"/reviews/{i}", headers={"Host": "reviews"})
            response = connection.getresponse()
            response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.getheader("connection", "").lower() == "close":
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", web_out, timeout=10)
        connection.close()
        assert set(statuses) <= {200, 503}

        def edge_requests() -> int:
            with live_receiver.database.session(write=False) as session:
                total = session.scalar(
                    select(func.sum(EdgeRollup.requests)).where(
                        EdgeRollup.resolution_s == 10, EdgeRollup.dest_service == "reviews"
                    )
                )
            return int(total or 0)

        wait_for(lambda: edge_requests() >= REQUESTS, "the agents' metrics")
        with live_receiver.database.session(write=False) as session:
            edges = session.execute(
                select(
                    EdgeRollup.source_service,
                    EdgeRollup.source_version,
                    EdgeRollup.dest_service,
                    EdgeRollup.dest_version,
                    func.sum(EdgeRollup.requests),
                    func.sum(EdgeRollup.failures),
                )
                .where(EdgeRollup.resolution_s == 60)
                .group_by(
                    EdgeRollup.source_service,
                    EdgeRollup.source_version,
                    EdgeRollup.dest_service,
                    EdgeRollup.dest_version,
                )
            ).all()
        # One edge, counted once (the callee's own view of web's requests is not added).
        assert [tuple(e[:4]) for e in edges] == [("web", "v1", "reviews", "v2")]
        requests, failures = edges[0][4], edges[0][5]
        assert requests == REQUESTS
        assert failures == statuses.get(503, 0)
        assert 0.04 <= failures / requests <= 0.17  # 10 % aborts, binomial spread at n=400

        def traced_services() -> set[str]:
            with live_receiver.database.session(write=False) as session:
                return set(session.scalars(select(Span.service).distinct()))

        wait_for(lambda: traced_services() == {"web", "reviews"}, "spans of both agents")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
