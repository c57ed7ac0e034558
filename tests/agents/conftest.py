from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Database
from tests.conftest import ADMIN_EMAIL, api_token


@pytest.fixture
def push_settings(tmp_path: Path, db_url: str) -> Settings:
    # A short hold so a poll with nothing new returns quickly (204) instead of after 30 s.
    return Settings(
        data_dir=tmp_path, database_url=db_url, poll_hold_s=0.3, allowed_hosts=["testserver"]
    )


def _agent_call(method: str, url: str) -> bool:
    """What mesh-agent itself calls (with the join token): registration, deregistration,
    discovery, OTLP export. Everything else is an operator's request."""
    path = urlsplit(url).path
    if path.startswith("/v1/"):
        return True
    if path == "/api/v1/agents":
        return method.upper() == "POST"
    return path.startswith("/api/v1/agents/") and method.upper() in ("POST", "DELETE")


class AgentAndOperator(TestClient):
    """Two parties on one client: agent calls carry the join token, the rest an admin's API
    token, unless a test sets Authorization itself."""

    join_token = ""
    operator_token = ""

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        headers = dict(kwargs.pop("headers", None) or {})
        if not any(key.lower() == "authorization" for key in headers):
            token = self.join_token if _agent_call(method, str(url)) else self.operator_token
            headers["Authorization"] = f"Bearer {token}"
        return super().request(method, url, headers=headers, **kwargs)


@pytest.fixture
def cp(push_settings: Settings, database: Database) -> Iterator[TestClient]:
    from app.main import create_app

    with AgentAndOperator(create_app(push_settings, database)) as client:
        client.join_token = client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
        client.operator_token = api_token(database, ADMIN_EMAIL)
        assert client.app.state.hub.wait_ready()  # type: ignore[attr-defined]
        yield client


def registration(service: str, version: str, address: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "agent_id": f"{service}-{version}-{(address or 'x').replace(':', '-')}",
        "service": service,
        "version": version,
        "address": address,
        "agent_version": "0.1.0",
        **extra,
    }
