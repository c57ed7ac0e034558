"""HTML audit log: filters, readable diffs, the verification badge, fragments vs pages."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.db import Database

HX = {"HX-Request": "true"}


def make_changes(client: TestClient) -> None:
    payload = {"name": "reviews", "owner_team": "bookinfo", "labels": {"tier": "backend"}}
    assert client.post("/api/v1/services", json=payload).status_code == 201
    update = {"revision": 1, "owner_team": "bookinfo-core", "labels": {"tier": "api"}}
    response = client.patch(
        "/api/v1/services/reviews", json=update, headers={"X-Mesh-Reason": "team split"}
    )
    assert response.status_code == 200, response.text
    assert (
        client.post("/api/v1/services", json={"name": "ratings", "owner_team": "b"}).status_code
        == 201
    )


def test_empty_audit_log_says_what_to_do_next(client: TestClient) -> None:
    html = client.get("/audit").text
    assert "The audit log is empty" in html
    assert 'href="/services/new"' in html


def test_audit_page_shows_actor_time_action_resource_reason_and_diff(client: TestClient) -> None:
    make_changes(client)
    html = client.get("/audit").text
    assert "<html" in html
    assert "admin@example.com" in html
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", html)
    assert "service.update" in html and "service.create" in html
    assert 'href="/services/default/reviews">default/reviews</a>' in html
    assert "team split" in html
    # The update shows old → new for the changed fields only.
    update = html[html.index("service.update") :]
    update = update[: update.index("</li>")]
    assert re.search(
        r"<th[^>]*>owner_team</th>.*?<del>bookinfo</del>.*?<ins>bookinfo-core</ins>", update, re.S
    )
    assert re.search(
        r"<th[^>]*>labels\.tier</th>.*?<del>backend</del>.*?<ins>api</ins>", update, re.S
    )
    assert 'class="diff-changed"' in update


def test_htmx_filter_request_gets_only_the_events(client: TestClient) -> None:
    make_changes(client)
    response = client.get("/audit", params={"resource_name": "default/ratings"}, headers=HX)
    html = response.text
    assert "<html" not in html and 'id="audit-filters"' not in html
    assert html.lstrip().startswith('<div id="events"')
    assert "default/ratings" in html and "default/reviews" not in html
    assert "1 event matches" in html


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"resource_kind": "service"}, "3 events match"),
        ({"resource_kind": "version"}, "No events match"),
        ({"actor": "admin@example.com"}, "3 events match"),
        ({"actor": "someone@else"}, "No events match"),
        ({"since": "2000-01-01T00:00"}, "3 events match"),
        ({"until": "2000-01-01T00:00"}, "No events match"),
    ],
)
def test_filter_by_kind_actor_and_time(
    client: TestClient, params: dict[str, str], expected: str
) -> None:
    make_changes(client)
    assert expected in client.get("/audit", params=params, headers=HX).text


def test_unreadable_time_is_reported_not_a_500(client: TestClient) -> None:
    make_changes(client)
    response = client.get("/audit", params={"since": "yesterday"}, headers=HX)
    assert response.status_code == 200
    assert "not a date and time" in response.text


def test_audit_pagination(client: TestClient) -> None:
    for i in range(55):
        client.post("/api/v1/services", json={"name": f"s{i}", "owner_team": "t"})
    first = client.get("/audit", headers=HX).text
    assert "Page 1 of 2" in first and "55 events" in first
    assert first.count('<li class="event"') == 50
    second = client.get("/audit", params={"page": 2}, headers=HX).text
    assert second.count('<li class="event"') == 5


def test_verify_badge_reports_an_intact_chain(client: TestClient) -> None:
    make_changes(client)
    page = client.get("/audit").text
    assert 'hx-get="/audit/verify"' in page and 'hx-trigger="load"' in page
    badge = client.get("/audit/verify", headers=HX).text
    assert "<html" not in badge
    assert "Chain intact" in badge and "3 events" in badge


def test_verify_badge_reports_a_tampered_event(client: TestClient, database: Database) -> None:
    make_changes(client)
    with database.engine.begin() as connection:
        if database.dialect == "postgresql":
            # The append-only triggers refuse UPDATE; a superuser can go around them.
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            connection.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
            connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
        else:
            query = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
            triggers = connection.execute(text(query)).all()
            for name, _ in triggers:
                connection.execute(text(f'DROP TRIGGER "{name}"'))
            connection.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
            for _, sql in triggers:
                connection.execute(text(sql))
    badge = client.get("/audit/verify").text
    assert "Chain broken at #2" in badge
