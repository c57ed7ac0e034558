"""A fleet registering at once (after a control-plane restart) queues for a few registration
slots instead of taking every worker thread: the console keeps answering people meanwhile."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from app.agents.api import REGISTRATIONS_AT_ONCE


class _FullGate(asyncio.Semaphore):
    """A registration gate with every slot taken, that says when someone queues at it."""

    def __init__(self) -> None:
        super().__init__(0)
        self.queued = asyncio.Event()

    async def acquire(self) -> bool:
        self.queued.set()
        return await super().acquire()


def test_console_answers_while_registrations_wait_for_a_slot(client: TestClient) -> None:
    app = client.app
    token = app.state.hub.token.ensure()  # type: ignore[attr-defined]
    portal = client.portal
    assert portal is not None

    async def take_every_slot() -> _FullGate:
        gate = _FullGate()
        app.state.registration_gate = gate  # type: ignore[attr-defined]
        return gate

    gate = portal.call(take_every_slot)

    async def until_queued() -> None:
        async with asyncio.timeout(30):
            await gate.queued.wait()

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(
            client.post,
            "/api/v1/agents",
            json={"agent_id": "web-1", "service": "web", "version": "v1"},
            headers={"Authorization": f"Bearer {token}"},
        )
        portal.call(until_queued)
        page = client.get("/services")
        assert page.status_code == 200
        assert not waiting.done()  # still queued for a slot, holding no worker thread
        assert client.get("/api/v1/agents").json()["total"] == 0

        async def free_a_slot() -> None:
            gate.release()

        portal.call(free_a_slot)
        registered = waiting.result(timeout=60)
    assert registered.status_code == 200, registered.text
    agents = client.get("/api/v1/agents").json()
    assert [a["agent_id"] for a in agents["items"]] == ["web-1"]


def test_registrations_beyond_the_slots_all_complete(client: TestClient) -> None:
    token = client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
    count = REGISTRATIONS_AT_ONCE * 3

    def register(i: int) -> int:
        response = client.post(
            "/api/v1/agents",
            json={"agent_id": f"web-{i}", "service": "web", "version": "v1"},
            headers={"Authorization": f"Bearer {token}"},
        )
        return response.status_code

    # The first one creates the service and version (concurrent first registrations of a new
    # service can race on PostgreSQL and get 409; the agent retries. Not what is tested here).
    assert register(0) == 200
    with ThreadPoolExecutor(max_workers=count) as pool:
        statuses = list(pool.map(register, range(1, count)))
    assert statuses == [200] * (count - 1)
    assert client.get("/api/v1/agents").json()["total"] == count
