"""JSON API: happy paths, field-level 422s, 404/409/413, pagination, OpenAPI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Database
from app.main import create_app
from tests.conftest import ADMIN_EMAIL, api_token

API = "/api/v1/services"


def create(client: TestClient, name: str = "reviews", **fields: Any) -> dict[str, Any]:
    payload = {"name": name, "owner_team": "bookinfo", **fields}
    response = client.post(API, json=payload)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_create_get_and_list(client: TestClient) -> None:
    created = create(
        client,
        description="Book reviews",
        links=[{"title": "Runbook", "url": "https://runbooks.example.com/reviews"}],
        labels={"tier": "backend"},
    )
    assert created["revision"] == 1
    assert created["versions"] == []

    response = client.get(f"{API}/reviews")
    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    body = response.json()
    assert body["links"][0]["url"] == "https://runbooks.example.com/reviews"
    assert body["labels"] == {"tier": "backend"}

    listing = client.get(API, params={"q": "book"}).json()
    assert listing["total"] == 1
    assert listing["items"][0]["name"] == "reviews"


def test_field_level_validation_errors(client: TestClient) -> None:
    response = client.post(API, json={"name": "Not_A_Label", "owner_team": "", "extra": 1})
    assert response.status_code == 422
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
    assert ("body", "name") in errors
    assert "DNS label" in errors[("body", "name")]
    assert ("body", "owner_team") in errors
    assert ("body", "extra") in errors


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[]", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"name=x", "application/x-www-form-urlencoded"),
    ],
)
def test_malformed_bodies_are_client_errors(
    client: TestClient, body: bytes, content_type: str
) -> None:
    response = client.post(API, content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500


def test_oversized_body_is_refused_before_anything_is_written(client: TestClient) -> None:
    huge = "x" * 2_000_000
    response = client.post(API, json={"name": "big", "owner_team": "t", "description": huge})
    assert response.status_code == 413
    assert client.get(API).json()["total"] == 0


def test_duplicate_is_409_with_field(client: TestClient) -> None:
    create(client)
    response = client.post(API, json={"name": "reviews", "owner_team": "x"})
    assert response.status_code == 409
    assert response.json()["field"] == "name"


def test_unknown_service_is_404(client: TestClient) -> None:
    assert client.get(f"{API}/nope").status_code == 404
    assert client.patch(f"{API}/nope", json={"revision": 1}).status_code == 404
    assert client.delete(f"{API}/nope").status_code == 404
    assert client.get(f"{API}/nope/versions").status_code == 404


def test_update_with_stale_revision_is_409_and_changes_nothing(client: TestClient) -> None:
    create(client, description="one")
    first = client.patch(f"{API}/reviews", json={"revision": 1, "description": "two"})
    assert first.status_code == 200
    assert first.json()["revision"] == 2
    assert first.headers["etag"] == '"2"'

    stale = client.patch(f"{API}/reviews", json={"revision": 1, "description": "three"})
    assert stale.status_code == 409
    assert "stale" in stale.json()["detail"]
    assert client.get(f"{API}/reviews").json()["description"] == "two"


def test_delete_with_if_match(client: TestClient) -> None:
    create(client)
    assert client.delete(f"{API}/reviews", headers={"If-Match": '"7"'}).status_code == 409
    assert client.delete(f"{API}/reviews", headers={"If-Match": "garbage"}).status_code == 400
    assert client.delete(f"{API}/reviews", headers={"If-Match": '"1"'}).status_code == 204
    assert client.get(f"{API}/reviews").status_code == 404


def test_versions_and_instances_endpoints(client: TestClient) -> None:
    create(client)
    assert client.post(f"{API}/reviews/versions", json={"name": "v1"}).status_code == 201
    assert client.post(f"{API}/reviews/versions", json={"name": "v1"}).status_code == 409
    assert client.post(f"{API}/reviews/versions", json={"name": "V 1"}).status_code == 422
    response = client.post(
        f"{API}/reviews/instances",
        json={"address": "127.0.0.1:9080", "version": "v1", "health": "healthy"},
    )
    assert response.status_code == 201, response.text
    bad_version = client.post(
        f"{API}/reviews/instances", json={"address": "127.0.0.1:9081", "version": "v2"}
    )
    assert bad_version.status_code == 404
    assert bad_version.json()["field"] == "version"
    bad_health = client.post(
        f"{API}/reviews/instances",
        json={"address": "127.0.0.1:9081", "version": "v1", "health": "great"},
    )
    assert bad_health.status_code == 422
    assert [i["address"] for i in client.get(f"{API}/reviews/instances").json()] == [
        "127.0.0.1:9080"
    ]
    assert client.delete(f"{API}/reviews/instances/127.0.0.1:9080").status_code == 204
    assert client.delete(f"{API}/reviews/versions/v1").status_code == 204
    assert client.get(f"{API}/reviews/versions").json() == []


def test_namespaces_keep_same_names_apart(client: TestClient) -> None:
    create(client)
    create(client, namespace="staging", description="staging copy")
    assert client.get(f"{API}/reviews").json()["description"] == ""
    staging = client.get(f"{API}/reviews", params={"namespace": "staging"}).json()
    assert staging["description"] == "staging copy"
    assert client.get(API, params={"namespace": "staging"}).json()["total"] == 1


def test_pagination_is_stable_and_bounded(client: TestClient) -> None:
    for index in range(7):
        create(client, name=f"svc-{index}")
    names: list[str] = []
    for page in (1, 2, 3):
        body = client.get(API, params={"page": page, "page_size": 3}).json()
        assert body["pages"] == 3
        names += [item["name"] for item in body["items"]]
    assert names == [f"svc-{i}" for i in range(7)]
    assert client.get(API, params={"page_size": 1000}).status_code == 422
    assert client.get(API, params={"page": 0}).status_code == 422


def test_reason_header_is_recorded_in_audit(client: TestClient) -> None:
    response = client.post(
        API, json={"name": "reviews", "owner_team": "t"}, headers={"X-Mesh-Reason": "launch"}
    )
    assert response.status_code == 201
    events = client.get("/api/v1/audit", params={"resource_name": "default/reviews"}).json()
    assert events["total"] == 1
    assert events["items"][0]["reason"] == "launch"
    assert events["items"][0]["after"]["name"] == "reviews"


def test_audit_api_filters_and_verify(client: TestClient) -> None:
    create(client)
    client.patch(f"{API}/reviews", json={"revision": 1, "owner_team": "other"})
    body = client.get("/api/v1/audit", params={"action": "service.update"}).json()
    assert body["total"] == 1
    assert body["items"][0]["before"] == {"owner_team": "bookinfo"}
    assert (
        client.get("/api/v1/audit", params={"since": "2999-01-01T00:00:00Z"}).json()["total"] == 0
    )
    assert client.get("/api/v1/audit", params={"since": "yesterday"}).status_code == 422
    verify = client.get("/api/v1/audit/verify").json()
    assert verify == {
        "ok": True,
        "checked": 2,
        "first_broken_seq": None,
        "detail": "all 2 events verified",
        "signed_up_to": None,
    }


def test_openapi_documents_the_resources(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/services" in paths
    assert "/api/v1/services/{name}/versions" in paths
    assert "/api/v1/audit" in paths


def test_chunked_oversized_bodies_get_413_on_json_and_form_routes(
    settings: Settings, database: Database
) -> None:
    """Without a Content-Length the limit is enforced while the body streams in."""
    small = settings.model_copy(update={"max_body_bytes": 2048})

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big", "owner_team": "t", "description": "'
        for _ in range(100):
            yield b"a" * 100
        yield b'"}'

    with TestClient(create_app(small, database)) as small_client:
        small_client.headers["Authorization"] = f"Bearer {api_token(database, ADMIN_EMAIL)}"
        api = small_client.post(API, content=chunks(), headers={"content-type": "application/json"})
        assert api.status_code == 413
        form = small_client.post(
            "/services/new",
            content=chunks(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 413
        assert small_client.get(API).json()["total"] == 0


def test_json_api_refuses_non_json_content_types(client: TestClient) -> None:
    """A cross-site form can POST text/plain without a CORS preflight; the API must not take
    it as JSON, or any page a user visits could create services in their name."""
    response = client.post(
        API, content=b'{"name": "x", "owner_team": "t"}', headers={"content-type": "text/plain"}
    )
    assert response.status_code == 422
    assert client.get(API).json()["total"] == 0
