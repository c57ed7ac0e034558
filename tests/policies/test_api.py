"""Traffic policy and mesh defaults through the JSON API: revisions, validation by field, stale
writes, revert, and the change record each write leaves for the agents."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def reviews(client: TestClient) -> TestClient:
    assert (
        client.post("/api/v1/services", json={"name": "reviews", "owner_team": "books"}).status_code
        == 201
    )
    for version in ("v1", "v2"):
        assert (
            client.post("/api/v1/services/reviews/versions", json={"name": version}).status_code
            == 201
        )
    return client


def route(v1: int, v2: int, name: str = "default") -> dict[str, Any]:
    return {
        "name": name,
        "backends": [{"version": "v1", "weight": v1}, {"version": "v2", "weight": v2}],
    }


def put(client: TestClient, revision: int, spec: dict[str, Any], **kw: Any) -> Any:
    return client.put(
        "/api/v1/services/reviews/traffic", json={"revision": revision, "spec": spec}, **kw
    )


def test_a_service_without_a_policy_reads_as_revision_0(reviews: TestClient) -> None:
    body = reviews.get("/api/v1/services/reviews/traffic").json()
    assert body["revision"] == 0
    assert body["spec"]["routes"] == []
    assert body["effective"]["config"] is None  # no instance yet: nothing to route to


def test_each_write_is_a_new_audited_revision_with_its_reason(reviews: TestClient) -> None:
    first = put(reviews, 0, {"routes": [route(90, 10)]}, headers={"X-Mesh-Reason": "canary"})
    assert first.status_code == 200, first.text
    assert first.json()["revision"] == 1
    assert first.json()["change"]["summary"] == "traffic policy revision 1"
    second = put(reviews, 1, {"routes": [route(50, 50)], "timeout_ms": 800})
    assert second.json()["revision"] == 2
    revisions = reviews.get("/api/v1/services/reviews/traffic/revisions").json()
    assert [r["revision"] for r in revisions["items"]] == [2, 1]
    assert revisions["items"][1]["reason"] == "canary"
    audit = reviews.get("/api/v1/audit", params={"resource_kind": "traffic"}).json()["items"]
    assert [e["action"] for e in audit] == ["traffic.update", "traffic.update"]
    assert audit[0]["before"]["routes"][0]["backends"][1]["weight"] == 10
    assert audit[0]["after"]["timeout_ms"] == 800
    assert audit[1]["reason"] == "canary"


def test_an_unchanged_policy_stores_and_pushes_nothing(reviews: TestClient) -> None:
    put(reviews, 0, {"routes": [route(90, 10)]})
    again = put(reviews, 1, {"routes": [route(90, 10)]})
    assert again.json()["revision"] == 1
    assert again.json()["change"] is None


def test_weights_that_do_not_sum_to_100_are_refused_by_field(reviews: TestClient) -> None:
    answer = put(reviews, 0, {"routes": [route(60, 30)]})
    assert answer.status_code == 422
    errors = {e["field"]: e["message"] for e in answer.json()["errors"]}
    assert "sum to 90" in errors["spec.routes[0].backends"]
    assert reviews.get("/api/v1/services/reviews/traffic").json()["revision"] == 0


def test_an_unknown_version_is_refused_naming_the_backend(reviews: TestClient) -> None:
    spec = {"routes": [{"name": "r", "backends": [{"version": "v3", "weight": 100}]}]}
    answer = put(reviews, 0, spec)
    assert answer.status_code == 422
    assert answer.json()["field"] == "spec.routes[0].backends[0].version"
    assert "v3" in answer.json()["detail"]


def test_what_the_agent_would_refuse_is_refused_before_it_is_stored(reviews: TestClient) -> None:
    spec = {"routes": [route(50, 50, "same"), route(50, 50, "same")]}
    answer = put(reviews, 0, spec)
    assert answer.status_code == 422
    assert any("duplicate route name" in e["message"] for e in answer.json()["errors"])
    assert reviews.get("/api/v1/services/reviews/traffic/revisions").json()["total"] == 0
    assert reviews.get("/api/v1/services/reviews/changes").json() == []


def test_unknown_fields_and_bad_types_are_422_not_500(reviews: TestClient) -> None:
    assert put(reviews, 0, {"routez": []}).status_code == 422
    assert (
        put(
            reviews, 0, {"routes": [{"name": "r", "backends": [{"version": "v1", "weight": "x"}]}]}
        ).status_code
        == 422
    )
    assert (
        reviews.put(
            "/api/v1/services/reviews/traffic",
            content=b"{",
            headers={"content-type": "application/json"},
        ).status_code
        == 422
    )


def test_a_stale_revision_gets_409_and_changes_nothing(reviews: TestClient) -> None:
    put(reviews, 0, {"routes": [route(90, 10)]})
    stale = put(reviews, 0, {"routes": [route(0, 100)]})
    assert stale.status_code == 409
    assert stale.json()["field"] == "revision"
    body = reviews.get("/api/v1/services/reviews/traffic").json()
    assert body["spec"]["routes"][0]["backends"][1]["weight"] == 10


def test_canary_weights_keep_the_other_routes(reviews: TestClient) -> None:
    header_route = {
        "name": "testers",
        "match": {"headers": [{"name": "x-tester", "exact": "1"}]},
        "backends": [{"version": "v2", "weight": 100}],
    }
    put(reviews, 0, {"routes": [header_route]})
    answer = reviews.post(
        "/api/v1/services/reviews/traffic/weights",
        json={"weights": {"v1": 75, "v2": 25}},
        headers={"X-Mesh-Reason": "25 % to v2"},
    )
    assert answer.status_code == 200, answer.text
    routes = answer.json()["spec"]["routes"]
    assert [r["name"] for r in routes] == ["testers", "default"]
    assert routes[1]["backends"] == [
        {"version": "v1", "weight": 75},
        {"version": "v2", "weight": 25},
    ]
    assert answer.json()["change"]["summary"] == "v1 75 %, v2 25 %"
    audit = answer.json()
    assert audit["reason"] == "25 % to v2"


def test_canary_weights_must_name_known_versions_and_sum_to_100(reviews: TestClient) -> None:
    bad_sum = reviews.post(
        "/api/v1/services/reviews/traffic/weights", json={"weights": {"v1": 80, "v2": 10}}
    )
    assert bad_sum.status_code == 422
    assert bad_sum.json()["field"] == "weights"
    unknown = reviews.post(
        "/api/v1/services/reviews/traffic/weights", json={"weights": {"v9": 100}}
    )
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "weights.v9"
    missing = reviews.post("/api/v1/services/nope/traffic/weights", json={"weights": {"v1": 100}})
    assert missing.status_code == 404


def test_revert_makes_an_earlier_revision_current_as_a_new_one(reviews: TestClient) -> None:
    put(reviews, 0, {"routes": [route(90, 10)]})
    put(reviews, 1, {"routes": [route(0, 100)]})
    reverted = reviews.post(
        "/api/v1/services/reviews/traffic/revert", json={"revision": 2, "to": 1}
    )
    assert reverted.status_code == 200, reverted.text
    body = reverted.json()
    assert body["revision"] == 3
    assert body["spec"]["routes"][0]["backends"][1]["weight"] == 10
    items = reviews.get("/api/v1/services/reviews/traffic/revisions").json()["items"]
    assert items[0]["reverted_from"] == 1
    assert (
        reviews.post(
            "/api/v1/services/reviews/traffic/revert", json={"revision": 3, "to": 9}
        ).status_code
        == 404
    )
    assert (
        reviews.post(
            "/api/v1/services/reviews/traffic/revert", json={"revision": 1, "to": 1}
        ).status_code
        == 409
    )


def test_revert_to_a_revision_that_no_longer_fits_the_catalog_is_refused(
    reviews: TestClient,
) -> None:
    put(reviews, 0, {"routes": [route(50, 50)]})
    put(
        reviews,
        1,
        {"routes": [{"name": "default", "backends": [{"version": "v1", "weight": 100}]}]},
    )
    assert reviews.delete("/api/v1/services/reviews/versions/v2").status_code == 204
    answer = reviews.post("/api/v1/services/reviews/traffic/revert", json={"revision": 2, "to": 1})
    assert answer.status_code == 422
    assert reviews.get("/api/v1/services/reviews/traffic").json()["revision"] == 2


def test_mesh_defaults_are_inherited_until_a_service_overrides_them(reviews: TestClient) -> None:
    reviews.post(
        "/api/v1/services/reviews/instances", json={"address": "127.0.0.1:9001", "version": "v1"}
    )
    current = reviews.get("/api/v1/mesh/defaults").json()
    assert current["revision"] == 0
    spec = {**current["spec"], "timeout_ms": 1234}
    answer = reviews.put("/api/v1/mesh/defaults", json={"revision": 0, "spec": spec})
    assert answer.status_code == 200, answer.text
    assert answer.json()["revision"] == 1
    effective = reviews.get("/api/v1/services/reviews/traffic").json()["effective"]["config"]
    assert effective["timeout_ms"] == 1234
    put(reviews, 0, {"timeout_ms": 50})
    effective = reviews.get("/api/v1/services/reviews/traffic").json()["effective"]["config"]
    assert effective["timeout_ms"] == 50
    assert (
        reviews.put("/api/v1/mesh/defaults", json={"revision": 0, "spec": spec}).status_code == 409
    )
    bad = reviews.put("/api/v1/mesh/defaults", json={"revision": 1, "spec": {"timeout_ms": -1}})
    assert bad.status_code == 422
    back = reviews.post("/api/v1/mesh/defaults/revert", json={"revision": 1, "to": 0})
    assert back.json()["spec"]["timeout_ms"] == 15_000
    actions = [
        e["action"]
        for e in reviews.get("/api/v1/audit", params={"resource_kind": "mesh-defaults"}).json()[
            "items"
        ]
    ]
    assert actions == ["defaults.revert", "defaults.update"]
