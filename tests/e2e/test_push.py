"""The whole push path with real processes: ``meshctl serve``, agents in front of two versions
of a backend, a calling agent, and the traffic it actually gets."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, wait_until

# Real processes on a loaded 2-core machine: the default 120 s per test is too tight.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

# 400 requests at a 25 % share: one standard deviation is 2.2 points; ±8 points is 3.7 of them,
# so a correct split fails this check about once in five thousand runs.
SAMPLES = 400
TOLERANCE = 0.08


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(
        tmp_path,
        # Small windows so a killed agent is noticed within the test's patience.
        MESH_AGENT_DISCONNECT_S="1",
        MESH_AGENT_GRACE_S="1",
        MESH_POLL_HOLD_S="5",
    )
    try:
        m.start_control_plane()
        v1, v2 = m.backend("v1"), m.backend("v2")
        m.start_agent("reviews-v1", "reviews", "v1", app=v1.address)
        m.start_agent("reviews-v2", "reviews", "v2", app=v2.address)
        m.start_agent("web", "web", "v1")
        wait_until(lambda: m.all_synced(3), 60, "3 agents SYNCED")  # a cap, for a busy CI
        yield m
    finally:
        m.close()


def share(seen: Counter[str], version: str) -> float:
    return seen[version] / sum(seen.values())


def test_shift_0_25_100_through_the_api_and_meshctl(mesh: Mesh) -> None:
    change = mesh.shift("reviews", {"v1": 100, "v2": 0})["change"]
    done = mesh.wait_change(change["id"])
    assert (done["state"], done["synced"], done["targeted"]) == ("converged", 3, 3)
    assert mesh.call("web", "reviews", 50) == Counter({"v1": 50})

    canary = mesh.meshctl(
        "canary", "reviews", "--weights", "v1=75,v2=25", "--reason", "canary", "--server", mesh.url
    )
    assert canary.returncode == 0, canary.stderr
    assert "3/3 agents synced in" in canary.stdout
    seen = mesh.call("web", "reviews", SAMPLES)
    assert set(seen) == {"v1", "v2"}, seen
    assert abs(share(seen, "v2") - 0.25) <= TOLERANCE, seen

    change = mesh.shift("reviews", {"v2": 100})["change"]
    mesh.wait_change(change["id"])
    assert mesh.call("web", "reviews", 50) == Counter({"v2": 50})
    timeline = mesh.api.get("/api/v1/services/reviews/changes").json()
    assert [c["summary"] for c in timeline] == [
        "v1 0 %, v2 100 %",
        "v1 75 %, v2 25 %",
        "v1 100 %, v2 0 %",
    ]
    assert all(c["state"] == "converged" for c in timeline)
    status = mesh.meshctl("proxy-status", "--server", mesh.url)
    assert status.returncode == 0
    assert status.stdout.count("SYNCED") >= 3


def test_control_plane_killed_under_traffic_loses_no_request(mesh: Mesh) -> None:
    mesh.wait_change(mesh.shift("reviews", {"v1": 50, "v2": 50})["change"]["id"])
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            seen.update(mesh.call("web", "reviews", 10))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_until(lambda: sum(seen.values()) >= 100, 30, "traffic before the kill")
        mesh.cp.stop(signal.SIGKILL)
        before = sum(seen.values())
        wait_until(lambda: sum(seen.values()) >= before + 300, 60, "traffic while it is down")
        mesh.start_control_plane()
        wait_until(lambda: mesh.all_synced(3), 60, "agents back and SYNCED")
        after = sum(seen.values())
        wait_until(lambda: sum(seen.values()) >= after + 100, 30, "traffic after the restart")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert set(seen) == {"v1", "v2"}, seen  # every answer came from a backend: no failure
    # The restarted control plane pushes again.
    done = mesh.wait_change(mesh.shift("reviews", {"v1": 0, "v2": 100})["change"]["id"])
    assert done["state"] == "converged"
    assert mesh.call("web", "reviews", 20) == Counter({"v2": 20})


def test_an_agent_restarted_while_the_control_plane_is_down_serves_its_last_config(
    mesh: Mesh,
) -> None:
    mesh.wait_change(mesh.shift("reviews", {"v1": 0, "v2": 100})["change"]["id"])
    version = mesh.agent_config("web")["version"]
    mesh.cp.stop(signal.SIGKILL)
    mesh.agents["web"].stop(signal.SIGKILL)
    mesh.start_agent("web", "web", "v1")
    config = mesh.agent_config("web")
    assert config["version"] == version
    assert config["source"].startswith("state:")
    assert mesh.call("web", "reviews", 30) == Counter({"v2": 30})


def test_a_disconnected_agents_endpoint_leaves_its_callers_config(mesh: Mesh) -> None:
    mesh.wait_change(mesh.shift("reviews", {"v1": 50, "v2": 50})["change"]["id"])
    mesh.agents["reviews-v2"].stop(signal.SIGKILL)  # no goodbye: the control plane must notice

    def v2_withdrawn() -> bool:
        services = mesh.agent_config("web")["config"]["services"]
        reviews = next(s for s in services if s["name"] == "reviews")
        return "v2" not in reviews["versions"]

    # Withdrawn after the grace, and never in the control plane's first 30 s (restart grace).
    wait_until(v2_withdrawn, 90, "v2 withdrawn from the caller's config")
    agents = {
        a["version"]: a
        for a in mesh.api.get("/api/v1/agents", params={"service": "reviews"}).json()["items"]
    }
    assert agents["v2"]["sync_state"] == "DISCONNECTED"
    # Make before break: the 50 % still configured for v2 goes to v1, nothing fails.
    assert mesh.call("web", "reviews", 40) == Counter({"v1": 40})


def test_reverting_a_revision_sends_the_traffic_back(mesh: Mesh) -> None:
    first = mesh.shift("reviews", {"v1": 0, "v2": 100})
    mesh.wait_change(first["change"]["id"])
    second = mesh.shift("reviews", {"v1": 100, "v2": 0})
    mesh.wait_change(second["change"]["id"])
    assert mesh.call("web", "reviews", 20) == Counter({"v1": 20})
    answer = mesh.api.post(
        "/api/v1/services/reviews/traffic/revert",
        json={"revision": second["revision"], "to": first["revision"]},
    )
    assert answer.status_code == 200, answer.text
    mesh.wait_change(answer.json()["change"]["id"])
    assert mesh.call("web", "reviews", 20) == Counter({"v2": 20})
