"""A database outage: the API answers 503 (never 500), agents keep polling and ACKing, because
the push path reads nothing from the database once a snapshot is compiled."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.agents.conftest import registration
from tests.conftest import POSTGRES_ADMIN_URL


def _set_connections(db_url: str, allowed: bool) -> None:
    name = make_url(db_url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        )
        if not allowed:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
    admin.dispose()


# The outage is simulated by refusing PostgreSQL connections (SQLite is a file: it has none).
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_outage_gives_503_and_agents_keep_their_stream(
    cp: TestClient, db_url: str
) -> None:
    agent_id = cp.post("/api/v1/agents", json=registration("web", "v1", None)).json()["agent_id"]
    first = cp.post(
        f"/api/v1/agents/{agent_id}/discovery",
        json={"service": "web", "service_version": "v1", "agent_id": agent_id},
    ).json()
    _set_connections(db_url, allowed=False)
    try:
        listed = cp.get("/api/v1/services")
        assert listed.status_code == 503
        assert listed.headers["retry-after"] == "1"
        ack = cp.post(
            f"/api/v1/agents/{agent_id}/discovery",
            json={
                "service": "web",
                "service_version": "v1",
                "agent_id": agent_id,
                "version": first["version"],
                "response_nonce": first["nonce"],
            },
        )
        assert ack.status_code == 204  # held, then nothing new: the agent's stream is intact
        # People's requests need the database to check who they are: 503, never 500.
        assert cp.get("/api/v1/agents").status_code == 503
    finally:
        _set_connections(db_url, allowed=True)
    assert cp.get("/api/v1/services").status_code == 200
    # The agent ACKed during the outage and is still in sync.
    assert cp.get("/api/v1/agents").json()["items"][0]["sync_state"] == "SYNCED"
