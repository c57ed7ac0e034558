"""``meshctl demo`` as a newcomer runs it: everything comes up connected, a canary shift reaches
every agent, Ctrl-C leaves no process behind and frees the ports, and a second run starts
cleanly. A taken port is reported and nothing is left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.demo.topology import SERVICES
from tests.e2e.mesh import MESHCTL, free_port, wait_until

# Real processes on a loaded 2-core machine: the default 120 s per test is too tight.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

AGENTS = sum(len(s.versions) * s.replicas for s in SERVICES) + 1  # + the load generator's


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our temp folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MESH_DATA_DIR": str(tmp / "data"), "MESH_PORT": str(self.port)}
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*MESHCTL, "demo", "--rps", "20"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def token(self) -> str:
        """The newcomer's meshctl token the demo wrote (a new one each run)."""
        return (self.tmp / "data" / "demo" / "token").read_text().strip()

    def get(self, path: str, **params: Any) -> Any:
        """The JSON API, as the newcomer (the demo's admin)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=5).json()

    def synced(self) -> bool:
        assert self.proc is not None
        if not (self.tmp / "data" / "demo" / "token").exists():
            return False  # still seeding
        if self.proc.poll() is not None:
            raise AssertionError(
                f"demo exited: {self.proc.stdout.read() if self.proc.stdout else ''}"
            )
        counts = self.get("/api/v1/agents")["counts"]
        return bool(counts["SYNCED"] == AGENTS)

    def sync_report(self) -> str:
        """Each agent that is not SYNCED, with its state and last error (for a timeout)."""
        listing = self.get("/api/v1/agents")
        behind = [
            f"{a['service']}/{a['version']} {a['sync_state']}"
            f" runs {a['config_version']} of {a['latest_version']}"
            + (f" ({a['last_error']})" if a["last_error"] else "")
            for a in listing["items"]
            if a["sync_state"] != "SYNCED"
        ]
        # What each process said last (agents log warnings and errors only): an agent that
        # never registered is not in the listing at all, and its log is the only clue.
        said = []
        for path in sorted((self.tmp / "data" / "demo" / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()
            if lines:
                said.append(f"  {path.stem}: " + " | ".join(line[:300] for line in lines[-3:]))
        return (
            f"counts {listing['counts']}, registered {listing['total']}: "
            + "; ".join(behind)
            + ("\nlast log lines:\n" + "\n".join(said) if said else "")
        )

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        code = self.proc.returncode
        self.proc = None
        assert code == 0, out
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    yield d
    d.kill()
    deadline = time.monotonic() + 20  # children die with the runner (parent-death signal)
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)


EXPECTED_EDGES = {
    ("loadgen", "frontend"),
    ("frontend", "catalog"),
    ("frontend", "recommendations"),
    ("frontend", "checkout"),
    ("recommendations", "catalog"),
    ("checkout", "inventory"),
    ("checkout", "payments"),
    ("checkout", "shipping"),
}


def edges(demo: Demo) -> set[tuple[str, str]]:
    graph = demo.get("/api/v1/topology", window="5m", namespace="shop")
    service = {n["id"]: n["service"] for n in graph["nodes"]}
    return {(service[e["source"]], service[e["target"]]) for e in graph["edges"]}


def v2_share(demo: Demo) -> float:
    metrics = demo.get(
        "/api/v1/services/catalog/metrics", namespace="shop", window="1m", by="version"
    )
    requests = {v["version"]: v["totals"]["requests"] for v in metrics["versions"]}
    total = sum(requests.values())
    return requests.get("v2", 0) / total if total else 0.0


def test_the_demo_comes_up_converges_and_stops_cleanly(demo: Demo) -> None:
    demo.start()
    wait_until(demo.synced, 120, f"{AGENTS} agents SYNCED", demo.sync_report)
    # The agents report to the console: the expected calls show up as edges, with traces.
    wait_until(lambda: edges(demo) >= EXPECTED_EDGES, 90, "the demo's edges")
    # Spans travel on their own path (batched by the agents, stored by the span worker), so
    # they may arrive after the metrics that drew the edges.
    wait_until(
        lambda: bool(demo.get("/api/v1/traces", service="frontend")["items"]),
        90,
        "a trace of the frontend",
    )
    assert v2_share(demo) < 0.4  # the seeded canary: 10 % to v2

    canary = subprocess.run(
        [*MESHCTL, "canary", "catalog", "-n", "shop", "--weights", "v1=10,v2=90",
         "--reason", "more canary", "--server", demo.url],
        env={**demo.env, "MESH_TOKEN": demo.token}, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert canary.returncode == 0, canary.stderr
    assert f"{AGENTS}/{AGENTS} agents synced in" in canary.stdout
    wait_until(lambda: v2_share(demo) > 0.5, 120, "v2's share of catalog traffic rising")

    out = demo.stop()
    assert "console  " + demo.url in out
    assert "sign in  " + demo.url + "/sign-in/link/" in out
    assert processes_mentioning(str(demo.tmp)) == []
    with (
        socket.socket() as s
    ):  # the console's port is free again (TIME_WAIT aside, as servers bind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", demo.port))

    # A second run starts from a fresh mesh, not from the first run's leftovers.
    demo.start()
    wait_until(demo.synced, 120, "second run SYNCED", demo.sync_report)
    assert demo.get("/api/v1/agents")["total"] == AGENTS
    changes = demo.get("/api/v1/services/catalog/changes", namespace="shop")
    assert [c["summary"] for c in changes] == ["v1 90 %, v2 10 %"]
    demo.stop()
    assert processes_mentioning(str(demo.tmp)) == []


def test_a_taken_port_is_reported_and_nothing_is_left_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MESH_DATA_DIR": str(tmp_path / "data"), "MESH_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-c", "from app.cli import main; main()", "demo"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"port {port}" in result.stderr
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert processes_mentioning(str(tmp_path)) == []
