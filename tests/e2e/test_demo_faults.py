"""Killing a demo service while the demo runs, as a newcomer would to see what the mesh does.

One of inventory's two replicas loses its app: its agent answers its callers 503, the calling
agents retry on the other replica and eject the dead one (outlier detection), so it takes no
more traffic, the healthy replica serves all of it and the caller's edge stays green. Then
shipping, which has one instance, loses its agent: nothing can contain that, and the errors
show on its caller's edge in the topology."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.mesh import wait_until
from tests.e2e.test_demo import AGENTS, Demo, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[Demo]:
    demo = Demo(tmp_path)
    demo.start()
    try:
        wait_until(demo.synced, 180, f"{AGENTS} agents SYNCED", demo.sync_report)
        yield demo
        demo.stop()
    finally:
        demo.kill()
        deadline = time.monotonic() + 20  # children die with the runner (parent-death signal)
        while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)


def children(pid: int) -> dict[int, list[str]]:
    """Command lines (argument lists) of the processes whose parent is ``pid``."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found[int(entry)] = cmdline.rstrip("\0").split("\0")
    return found


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def inventory_replicas(demo: Demo) -> dict[str, str]:
    """Admin URL of each inventory agent, by its state folder's name (``inventory-v1-2`` for
    the second replica)."""
    assert demo.proc is not None
    return {
        Path(option(argv, "--state-dir")).name: "http://" + option(argv, "--admin")
        for argv in children(demo.proc.pid).values()
        if "mesh_agent" in argv and option(argv, "--service") == "inventory"
    }


def inbound(admin_url: str, metric: str = "mesh_requests_total") -> int:
    """Requests (or failures) this inventory agent has passed to its app, as it counts them."""
    text = httpx.get(admin_url + "/metrics", timeout=2).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(metric + "{") and 'destination="inventory"' in line
    )


def edge(demo: Demo, source: str, target: str) -> dict[str, float]:
    """The caller's edge over the last minute, as the topology shows it."""
    graph = demo.get("/api/v1/topology", window="1m", namespace="shop")
    service = {n["id"]: n["service"] for n in graph["nodes"]}
    for e in graph["edges"]:
        if (service[e["source"]], service[e["target"]]) == (source, target):
            metrics: dict[str, float] = e["metrics"]
            return metrics
    return {"requests": 0, "failures": 0}


class Gains:
    """Differences between successive samples of a counter pair, for "since last time"
    conditions polled by ``wait_until``."""

    def __init__(self, *counters: str) -> None:
        self.last: dict[str, int] | None = None
        self.counters = counters

    def since_last(self, now: dict[str, int]) -> dict[str, int] | None:
        last, self.last = self.last, now
        return None if last is None else {k: now[k] - last[k] for k in self.counters}


def test_a_killed_replica_is_contained_and_a_killed_service_shows_on_its_callers_edge(
    running_demo: Demo,
) -> None:
    demo = running_demo
    assert demo.proc is not None
    replicas = inventory_replicas(demo)
    assert sorted(replicas) == ["inventory-v1", "inventory-v1-2"]
    healthy, doomed = replicas["inventory-v1"], replicas["inventory-v1-2"]
    # Both replicas serve while all is well.
    wait_until(lambda: inbound(healthy) > 0 and inbound(doomed) > 0, 120, "both replicas serve")

    (app_pid,) = (
        pid
        for pid, argv in children(demo.proc.pid).items()
        if "app.demo.apps" in argv and any(a.startswith("inventory:v1:") for a in argv)
        and sum(a == "--instance" for a in argv) == 1
    )  # fmt: skip
    os.kill(app_pid, signal.SIGKILL)

    # The dead replica's agent sees its app gone: what its callers got first were errors.
    wait_until(lambda: inbound(doomed, "mesh_request_failures_total") > 0, 60, "503s at replica 2")
    # Then the callers' agents eject it: over a stretch of time the healthy replica takes
    # traffic and the dead one none (between ejections it gets a handful of probes again).
    gains = Gains("healthy", "doomed")

    def ejected() -> bool:
        step = gains.since_last({"healthy": inbound(healthy), "doomed": inbound(doomed)})
        time.sleep(3)  # the stretch the next sample is compared over, not an assertion
        return step is not None and step["healthy"] >= 5 and step["doomed"] == 0

    wait_until(ejected, 120, "the dead replica ejected while the healthy one serves")
    # Retries hid the first failures from the caller: its edge to inventory stays healthy.
    to_inventory = edge(demo, "checkout", "inventory")
    assert to_inventory["requests"] > 0
    assert to_inventory["failures"] <= 0.02 * to_inventory["requests"], to_inventory
    assert demo.proc.poll() is None, "the demo keeps running after one of its services died"

    # shipping has one instance: kill its agent, and nothing is left to retry on.
    (shipping_agent,) = (
        pid
        for pid, argv in children(demo.proc.pid).items()
        if "mesh_agent" in argv and option(argv, "--service") == "shipping"
    )
    assert edge(demo, "checkout", "shipping")["failures"] == 0
    os.kill(shipping_agent, signal.SIGKILL)
    wait_until(
        lambda: edge(demo, "checkout", "shipping")["failures"] > 0,
        90,
        "errors on checkout → shipping in the topology",
    )
    assert demo.proc.poll() is None
