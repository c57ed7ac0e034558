"""Computed topologies are reused for a few seconds per query, then recomputed: in the
background while the last graph is recent enough, else while the request waits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from app.db import Database
from app.errors import NotFoundError
from app.topology import schemas
from app.topology.cache import TopologyCache
from tests.topology.support import insert_rollups, rollup_rows
from tests.topology.test_api import create_service, mesh  # noqa: F401  (fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _with_window(name: str) -> schemas.Topology:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return schemas.Topology.model_validate(
        {
            "window": {"name": name, "resolution_s": 10, "start": moment, "end": moment},
            "nodes": [],
            "edges": [],
        }
    )


def test_a_graph_is_reused_within_the_ttl_and_recomputed_after() -> None:
    clock = Clock()
    cache = TopologyCache(ttl_s=2.0, clock=clock)
    computed: list[str] = []

    def compute(name: str) -> schemas.Topology:
        computed.append(name)
        return _with_window(name)

    first = cache.get("q", lambda: compute("5m"))
    clock.now += 1.9
    again = cache.get("q", lambda: compute("1m"))
    assert again is first and computed == ["5m"]
    assert again.json == first.json  # serialised once, kept
    clock.now += 0.2
    later = cache.get("q", lambda: compute("1m"))
    assert computed == ["5m", "1m"]
    assert b'"1m"' in later.json


def test_queries_are_cached_apart_and_the_oldest_go_first() -> None:
    cache = TopologyCache(ttl_s=60, max_entries=2, clock=Clock())
    computed: list[str] = []

    def compute(name: str) -> schemas.Topology:
        computed.append(name)
        return _with_window(name)

    cache.get("a", lambda: compute("1m"))
    cache.get("b", lambda: compute("5m"))
    cache.get("a", lambda: compute("1m"))
    cache.get("c", lambda: compute("1h"))  # evicts b, the least recently used
    cache.get("a", lambda: compute("1m"))
    cache.get("b", lambda: compute("5m"))
    assert computed == ["1m", "5m", "1h", "5m"]


def test_a_failed_computation_is_not_kept() -> None:
    cache = TopologyCache(ttl_s=60, clock=Clock())

    def fail() -> schemas.Topology:
        raise NotFoundError("no service 'x'")

    with pytest.raises(NotFoundError):
        cache.get("q", fail)
    assert cache.get("q", lambda: _with_window("6h")).graph.window.name == "6h"


def test_a_stale_graph_is_answered_while_a_new_one_is_computed_in_the_background() -> None:
    clock = Clock()
    cache = TopologyCache(ttl_s=2.0, max_stale_s=30.0, clock=clock)
    computed: list[str] = []

    def compute(name: str) -> schemas.Topology:
        computed.append(name)
        return _with_window(name)

    cache.get("q", lambda: compute("5m"), lambda: compute("later"))
    clock.now += 5
    stale = cache.get("q", lambda: compute("now"), lambda: compute("1h"))
    assert stale.graph.window.name == "5m"  # answered at once, from the cache
    cache.drain()
    assert computed == ["5m", "1h"]  # ... and recomputed off the request
    assert cache.get("q", lambda: compute("now"), lambda: compute("6h")).graph.window.name == "1h"
    clock.now += 31  # nobody asked for longer than max_stale_s: the request waits for a new one
    assert cache.get("q", lambda: compute("24h"), lambda: compute("6h")).graph.window.name == "24h"


def test_a_failed_background_refresh_keeps_the_last_graph(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cache = TopologyCache(ttl_s=2.0, max_stale_s=30.0, clock=clock)

    def fail() -> schemas.Topology:
        raise RuntimeError("database gone")

    cache.get("q", lambda: _with_window("5m"), fail)
    clock.now += 5
    assert cache.get("q", fail, fail).graph.window.name == "5m"
    cache.drain()
    assert "background topology refresh failed" in caplog.text
    assert cache.get("q", fail, fail).graph.window.name == "5m"


def test_a_refresh_after_the_ttl_shows_new_traffic(mesh: TestClient, database: Database) -> None:  # noqa: F811
    clock = Clock()
    cache = TopologyCache(ttl_s=2.0, max_stale_s=30.0, clock=clock)
    mesh.app.state.topologies = cache  # type: ignore[attr-defined]

    def edges() -> set[str]:
        return {edge["id"] for edge in mesh.get("/api/v1/topology").json()["edges"]}

    before = edges()
    assert "default/ratings->default/stars" not in before
    with database.session(write=True) as session:
        insert_rollups(session, rollup_rows(datetime.now(UTC), "ratings", "stars", requests=5))
        session.commit()
    clock.now += 1.0
    assert edges() == before  # a refresh within the TTL: the graph computed a second ago
    clock.now += 1.5
    assert edges() == before  # past the TTL: the last graph, while a new one is computed
    cache.drain()
    assert "default/ratings->default/stars" in edges()
    # The page reads the same cache.
    assert "stars" in mesh.get("/topology").text
