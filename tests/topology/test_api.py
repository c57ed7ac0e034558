"""GET /api/v1/topology and GET /api/v1/services/{name}/metrics, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db import Database
from tests.topology.support import insert_rollups, rollup_rows


def create_service(client: TestClient, name: str, team: str = "books", ns: str = "default") -> None:
    response = client.post(
        "/api/v1/services", json={"name": name, "namespace": ns, "owner_team": team}
    )
    assert response.status_code == 201, response.text


def seed(database: Database) -> None:
    """outside → productpage → reviews v1 (fine) / v2 (30 % errors) → ratings; → details."""
    now = datetime.now(UTC)
    rows = []
    for step in range(1, 6):
        at = now - timedelta(seconds=10 * step)
        rows += rollup_rows(at, "", "productpage", requests=50)
        rows += rollup_rows(at, "productpage", "reviews", requests=30, latencies_ms=[8, 30])
        rows += rollup_rows(
            at, "productpage", "reviews", requests=10, failures=3, dest_version="v2",
            latencies_ms=[400],
        )  # fmt: skip
        rows += rollup_rows(at, "reviews", "ratings", requests=20)
        rows += rollup_rows(at, "productpage", "details", requests=50)
    with database.session(write=True) as session:
        insert_rollups(session, rows)
        session.commit()


@pytest.fixture
def mesh(client: TestClient, database: Database) -> TestClient:
    for name, team in (("productpage", "web"), ("reviews", "books"), ("ratings", "books")):
        create_service(client, name, team)
    create_service(client, "details", "books")
    create_service(client, "quiet", "books")
    seed(database)
    return client


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def test_topology_has_nodes_with_health_and_edges_with_figures(mesh: TestClient) -> None:
    response = mesh.get("/api/v1/topology", params={"window": "5m"})
    assert response.status_code == 200
    body = response.json()
    nodes, edges = by_id(body["nodes"]), by_id(body["edges"])

    assert set(nodes) == {
        "~external",
        "default/productpage",
        "default/reviews",
        "default/ratings",
        "default/details",
        "default/quiet",
    }
    reviews = nodes["default/reviews"]
    assert reviews["health"] == "degraded"  # 15 of 200 = 7.5 %
    assert reviews["metrics"]["success_rate"] == pytest.approx(0.925)
    assert reviews["url"] == "/services/default/reviews"
    assert {"x", "y", "team", "label"} <= set(reviews)
    assert nodes["default/quiet"]["health"] == "idle"
    assert nodes["~external"]["label"] == "unknown"

    call = edges["default/productpage->default/reviews"]
    assert call["error_pct"] == pytest.approx(7.5)
    assert call["metrics"]["rps"] > 0
    assert call["metrics"]["p99_ms"] is not None
    assert call["metrics"]["p50_ms"] <= call["metrics"]["p95_ms"] <= call["metrics"]["p99_ms"]
    assert call["traces_url"] == "/traces?service=reviews"
    assert nodes["default/productpage"]["x"] < reviews["x"] < nodes["default/ratings"]["x"]


def test_versions_focus_group_and_hide_filters(mesh: TestClient) -> None:
    versions = by_id(
        mesh.get("/api/v1/topology", params={"versions": "true", "hide_idle": "true"}).json()[
            "edges"
        ]
    )
    assert versions["default/productpage@v1->default/reviews@v2"]["health"] == "failing"

    focused = mesh.get("/api/v1/topology", params={"focus": "ratings", "hops": 1}).json()
    assert {n["id"] for n in focused["nodes"]} == {"default/reviews", "default/ratings"}

    grouped = mesh.get("/api/v1/topology", params={"group": "team"}).json()
    assert {n["id"] for n in grouped["nodes"]} == {"~external", "team:web", "team:books"}

    unhealthy = mesh.get("/api/v1/topology", params={"hide_healthy": "true"}).json()
    assert [e["id"] for e in unhealthy["edges"]] == ["default/productpage->default/reviews"]


def test_positions_stay_put_across_refreshes(mesh: TestClient) -> None:
    first = by_id(mesh.get("/api/v1/topology").json()["nodes"])
    again = by_id(mesh.get("/api/v1/topology").json()["nodes"])
    assert {k: (v["x"], v["y"]) for k, v in first.items()} == {
        k: (v["x"], v["y"]) for k, v in again.items()
    }


@pytest.mark.parametrize(
    "params",
    [
        {"window": "2m"},
        {"hops": "0"},
        {"hops": "7"},
        {"hops": "many"},
        {"group": "colour"},
        {"namespace": "Not A Namespace"},
        {"focus": "a/b/c"},
        {"versions": "maybe"},
    ],
)
def test_bad_parameters_get_422_naming_the_field(
    client: TestClient, params: dict[str, str]
) -> None:
    response = client.get("/api/v1/topology", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", next(iter(params))]


def test_unknown_focus_is_404(client: TestClient) -> None:
    response = client.get("/api/v1/topology", params={"focus": "default/nobody"})
    assert response.status_code == 404
    assert response.json()["field"] == "focus"


def test_an_ambiguous_focus_asks_for_the_namespace(client: TestClient) -> None:
    create_service(client, "api", ns="shop")
    create_service(client, "api", ns="payments")
    response = client.get("/api/v1/topology", params={"focus": "api"})
    assert response.status_code == 422
    assert "namespace/name" in response.json()["detail"]
    assert client.get("/api/v1/topology", params={"focus": "shop/api"}).status_code == 200


def test_service_metrics_by_version(mesh: TestClient) -> None:
    response = mesh.get(
        "/api/v1/services/reviews/metrics", params={"window": "5m", "by": "version"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["totals"]["requests"] == 200
    assert body["health"] == "degraded"
    versions = {v["version"]: v for v in body["versions"]}
    assert versions["v1"]["totals"]["success_rate"] == 1.0
    assert versions["v2"]["totals"]["success_rate"] == pytest.approx(0.7)
    assert versions["v2"]["totals"]["p50_ms"] > versions["v1"]["totals"]["p99_ms"]
    assert len(body["series"]["t"]) == 30 == len(versions["v2"]["series"]["rps"])
    assert [c["service"] for c in body["callers"]] == ["productpage"]
    assert [c["service"] for c in body["callees"]] == ["ratings"]


def test_service_metrics_without_traffic_and_unknown(client: TestClient) -> None:
    create_service(client, "quiet")
    body = client.get("/api/v1/services/quiet/metrics").json()
    assert body["totals"]["success_rate"] is None
    assert body["health"] == "idle"
    assert body["versions"] == []  # not asked for
    assert client.get("/api/v1/services/nobody/metrics").status_code == 404
    assert client.get("/api/v1/services/quiet/metrics?window=7d").status_code == 422


def test_routes_are_in_the_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/topology" in paths
    assert "/api/v1/services/{name}/metrics" in paths
