from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Database


@pytest.fixture
def push_settings(tmp_path: Path, db_url: str) -> Settings:
    # A short hold so a poll with nothing new returns quickly (204) instead of after 30 s.
    return Settings(
        data_dir=tmp_path, database_url=db_url, poll_hold_s=0.3, allowed_hosts=["testserver"]
    )


@pytest.fixture
def cp(push_settings: Settings, database: Database) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(push_settings, database)) as client:
        token = client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {token}"
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
