"""The agent's control-plane client against a real control plane on a socket: it registers,
takes snapshots into the same ConfigStore as the file source, ACKs them, and NACKs one it
cannot use while it keeps serving the last good config."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.db import Database, make_engine
from app.main import create_app
from app.migrate import upgrade
from mesh_agent import discovery
from mesh_agent.balancer import EndpointRegistry
from mesh_agent.config import ConfigError, LoadedConfig
from mesh_agent.control import ConfigStore
from mesh_agent.discovery import ControlPlaneSource, stable_agent_id
from mesh_agent.schema import ConfigIssue, registration
from tests.agent.support import run, wait_until
from tests.conftest import ADMIN_EMAIL, api_token


@dataclass
class ControlPlane:
    url: str
    token: str
    api: httpx.Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    settings = Settings(data_dir=tmp_path, database_url=url, poll_hold_s=1.0)
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "control plane did not start"
        time.sleep(0.02)
    token = (tmp_path / "join-token").read_text().strip()
    database = Database(url)
    operator = {"Authorization": f"Bearer {api_token(database, ADMIN_EMAIL)}"}
    database.dispose()
    with httpx.Client(base_url=base, timeout=10, headers=operator) as api:
        api.post("/api/v1/services", json={"name": "reviews", "owner_team": "books"})
        for v in ("v1", "v2"):
            api.post("/api/v1/services/reviews/versions", json={"name": v})
        for v, port_ in (("v1", 9001), ("v2", 9002)):
            api.post(
                "/api/v1/services/reviews/instances",
                json={"address": f"127.0.0.1:{port_}", "version": v},
            )
        yield ControlPlane(base, token, api)
    server.should_exit = True
    thread.join(timeout=15)


def _source(cp: ControlPlane, tmp: Path, token: str | None = None) -> ControlPlaneSource:
    store = ConfigStore(EndpointRegistry(), state_dir=tmp / "state")
    reg = registration(
        agent_id=stable_agent_id("default", "web", "v1", None),
        service="web",
        version="v1",
    )
    return ControlPlaneSource(store, url=cp.url, token=token or cp.token, registration=reg)


def _weights(loaded: LoadedConfig | None) -> dict[str, int]:
    assert loaded is not None
    reviews = next(s for s in loaded.config.services if s.name == "reviews")
    return {b.version: b.weight for r in reviews.routes for b in r.backends}


def _agent_row(cp: ControlPlane, agent_id: str) -> dict[str, Any]:
    items = cp.api.get("/api/v1/agents").json()["items"]
    row: dict[str, Any] = next((a for a in items if a["agent_id"] == agent_id), {})
    return row


def test_takes_config_from_the_control_plane_and_follows_a_change(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    source = _source(control_plane, tmp_path)

    async def scenario() -> None:
        source.start()
        try:
            await wait_until(lambda: source.store.loaded is not None, 20)
            first = source.store.loaded
            assert first is not None
            assert first.source == f"control-plane:{control_plane.url}"
            await wait_until(
                lambda: _agent_row(control_plane, source.agent_id).get("sync_state") == "SYNCED", 20
            )
            answer = await asyncio.to_thread(
                control_plane.api.post,
                "/api/v1/services/reviews/traffic/weights",
                json={"weights": {"v1": 10, "v2": 90}},
            )
            assert answer.status_code == 200
            await wait_until(lambda: _weights(source.store.loaded) == {"v1": 10, "v2": 90}, 20)
        finally:
            await source.stop()

    run(scenario())
    # Deregistered on stop: the agent is gone from the control plane's list.
    ids = [a["agent_id"] for a in control_plane.api.get("/api/v1/agents").json()["items"]]
    assert source.agent_id not in ids


def test_a_snapshot_the_agent_refuses_is_nacked_and_the_old_one_keeps_serving(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(control_plane, tmp_path)
    real_validate = discovery.validate_config

    def picky(data: Any, source: str = "") -> LoadedConfig:
        loaded = real_validate(data, source)
        if _weights(loaded):  # this agent cannot take any route (say, an older agent)
            raise ConfigError(
                [ConfigIssue(path="services[0].routes", message="not supported")], source
            )
        return loaded

    monkeypatch.setattr(discovery, "validate_config", picky)

    async def scenario() -> None:
        source.start()
        try:
            await wait_until(
                lambda: _agent_row(control_plane, source.agent_id).get("sync_state") == "SYNCED", 20
            )
            good = source.store.loaded
            assert good is not None
            answer = await asyncio.to_thread(
                control_plane.api.post,
                "/api/v1/services/reviews/traffic/weights",
                json={"weights": {"v1": 50, "v2": 50}},
            )
            change_id = answer.json()["change"]["id"]
            await wait_until(
                lambda: _agent_row(control_plane, source.agent_id).get("sync_state") == "NACKED", 20
            )
            row = _agent_row(control_plane, source.agent_id)
            assert "not supported" in row["last_error"]
            assert row["config_version"] == good.version
            assert source.store.loaded is good  # still serving the last good config
            assert source.store.rejected == 1
            assert "not supported" in source.store.dump()["last_error"]["error"]
            change = control_plane.api.get(f"/api/v1/changes/{change_id}").json()
            assert change["errors"][0]["agent_id"] == source.agent_id
        finally:
            await source.stop()

    run(scenario())


def test_a_wrong_join_token_gets_no_config_and_says_why(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    source = _source(control_plane, tmp_path, token="wrong")

    async def scenario() -> None:
        source.start()
        try:
            await wait_until(lambda: source.last_error is not None, 20)
        finally:
            await source.stop()

    run(scenario())
    assert source.last_error is not None
    assert "join token" in source.last_error
    assert source.store.loaded is None
    assert control_plane.api.get("/api/v1/agents").json()["total"] == 0
