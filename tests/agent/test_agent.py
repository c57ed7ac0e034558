"""The agent's lifecycle (``mesh_agent.agent.Agent``): the wiring the CLI and the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from mesh_agent.agent import Agent as CoreAgent
from mesh_agent.config import validate_config
from mesh_agent.control import ConfigStore

from .support import Agent, FakeTelemetry, RawApp, run, service

pytestmark = pytest.mark.e2e


class RecordingSource:
    """A config source that offers one config when triggered and records its lifecycle."""

    def __init__(self, store: ConfigStore, config: dict[str, Any]) -> None:
        self.store = store
        self.config = config
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    def trigger(self) -> None:
        self.events.append("trigger")
        self.store.offer(validate_config(self.config, "recording"))


def test_source_starts_after_the_listeners_reloads_on_demand_and_stops_on_drain() -> None:
    async def scenario() -> None:
        sources: list[RecordingSource] = []
        seen_listeners: list[dict[str, str]] = []

        def factory(store: ConfigStore, listeners: Mapping[str, str]) -> RecordingSource:
            seen_listeners.append(dict(listeners))
            source = RecordingSource(store, {"services": [service("a", {"v1": ["10.0.0.1:80"]})]})
            sources.append(source)
            return source

        agent = CoreAgent(service="web", telemetry=FakeTelemetry(), source_factory=factory)
        assert sources == []  # wiring alone opens nothing and builds no source
        listeners = await agent.start(outbound=("127.0.0.1", 0), admin=("127.0.0.1", 0))
        (source,) = sources
        assert source.events == ["start"]
        # Built after the listeners were bound: port 0 is resolved in what the source is told.
        assert seen_listeners == [listeners]
        assert not listeners["outbound"].endswith(":0")
        assert set(listeners) == {"outbound", "admin"}  # no app: no inbound listener
        async with httpx.AsyncClient() as c:
            admin = f"http://{listeners['admin']}"
            assert (await c.get(f"{admin}/ready")).status_code == 503
            agent.reload()  # what SIGHUP does
            assert (await c.get(f"{admin}/ready")).status_code == 200
            config = (await c.get(f"{admin}/config")).json()
            assert config["source"] == "recording"
            assert config["bootstrap"]["listeners"] == listeners
            metrics = (await c.get(f"{admin}/metrics")).text
            assert 'mesh_agent_config_updates_total{result="accepted"} 1' in metrics
        serving = asyncio.create_task(agent.serve())
        agent.stop()  # what SIGTERM does
        await serving
        assert source.events == ["start", "trigger", "stop"]
        await agent.close()
        host, port = listeners["outbound"].rsplit(":", 1)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))

    run(scenario())


def test_a_config_swap_closes_idle_connections_to_endpoints_no_longer_in_it() -> None:
    async def scenario() -> None:
        async def ok(conn: int, req: int, r: Any, w: asyncio.StreamWriter) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return True

        async with RawApp(ok) as old, RawApp(ok) as new:
            cfg = {"services": [service("reviews", {"v1": [old.address]})]}
            async with Agent(cfg) as agent, httpx.AsyncClient(base_url=agent.outbound) as c:
                assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
                assert len(agent.pooled_connections()) == 1
                agent.apply({"services": [service("reviews", {"v1": [new.address]})]})
                async with asyncio.timeout(10):
                    await old.closed_by_peer.wait()  # the agent hung up on the old endpoint
                assert agent.pooled_connections() == []
                assert (await c.get("/", headers={"host": "reviews"})).status_code == 200
            assert (old.connections, new.connections) == (1, 1)

    run(scenario())
