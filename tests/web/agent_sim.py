"""Agents simulated over the real API (register, discovery long poll, ACK/NACK), for console
tests that need agents to sync or refuse a change without starting processes."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

# Each round ends with a held poll that times out (204): the hub had nothing newer to send.
MAX_ROUNDS = 20


def auth(client: TestClient) -> dict[str, str]:
    token: str = client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {token}"}


def create_service(client: TestClient, name: str, versions: tuple[str, ...] = ("v1", "v2")) -> None:
    response = client.post("/api/v1/services", json={"name": name, "owner_team": "shop"})
    assert response.status_code == 201, response.text
    for version in versions:
        response = client.post(f"/api/v1/services/{name}/versions", json={"name": version})
        assert response.status_code == 201, response.text


class SimAgent:
    def __init__(
        self, client: TestClient, agent_id: str, service: str, version: str, address: str
    ) -> None:
        self.client, self.agent_id = client, agent_id
        self.service, self.service_version = service, version
        self.running: str | None = None
        response = client.post(
            "/api/v1/agents",
            json={
                "agent_id": agent_id,
                "service": service,
                "version": version,
                "address": address,
                "agent_version": "0.1.0-test",
            },
            headers=auth(client),
        )
        assert response.status_code == 200, response.text

    def _poll(self, **fields: Any) -> Any:
        body = {
            "service": self.service,
            "service_version": self.service_version,
            "agent_id": self.agent_id,
            "version": self.running,
            **fields,
        }
        return self.client.post(
            f"/api/v1/agents/{self.agent_id}/discovery", json=body, headers=auth(self.client)
        )

    def sync(self, refuse: str | None = None) -> None:
        """Take every push until the hub has nothing newer: ACK it, or NACK it with ``refuse``
        (keeping the config in force, as a real agent does)."""
        response = self._poll()
        for _ in range(MAX_ROUNDS):
            if response.status_code == 204:
                return
            assert response.status_code == 200, response.text
            push = response.json()
            if refuse is None:
                self.running = push["version"]
                response = self._poll(response_nonce=push["nonce"])
            else:
                response = self._poll(response_nonce=push["nonce"], error_detail=refuse)
        raise AssertionError(f"{self.agent_id} kept receiving pushes")
