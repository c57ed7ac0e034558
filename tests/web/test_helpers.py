"""app.web: the diff shown in the audit log, form error mapping, relative times, htmx helpers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import Response
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.catalog.schemas import ServiceCreate
from app.catalog.web import format_labels, format_links, parse_labels, parse_links
from app.web import ago, field_errors, hx_trigger, json_diff, toast


def test_json_diff_flattens_dicts_and_classifies_fields() -> None:
    before = {"owner_team": "a", "labels": {"tier": "backend", "old": "x"}, "description": "same"}
    after = {"owner_team": "b", "labels": {"tier": "api", "new": "y"}, "description": "same"}
    changes = {c.field: (c.kind, c.old, c.new) for c in json_diff(before, after)}
    assert changes == {
        "owner_team": ("changed", "a", "b"),
        "labels.tier": ("changed", "backend", "api"),
        "labels.old": ("removed", "x", None),
        "labels.new": ("added", None, "y"),
        "description": ("unchanged", "same", "same"),
    }


def test_json_diff_of_a_creation_leaves_out_empty_fields() -> None:
    after = {"name": "reviews", "labels": {}, "links": [], "description": ""}
    assert [(c.field, c.kind) for c in json_diff(None, after)] == [("name", "added")]


def test_json_diff_compares_lists_as_a_whole() -> None:
    changes = json_diff({"links": [{"url": "a"}]}, {"links": [{"url": "b"}]})
    assert [(c.field, c.kind) for c in changes] == [("links", "changed")]


def test_field_errors_name_the_form_field_and_the_line() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceCreate.model_validate(
            {"name": "Bad", "owner_team": "", "links": [{"title": "x", "url": "nope"}]}
        )
    errors = field_errors(caught.value)
    assert errors["owner_team"] == "required"
    assert errors["links"].startswith("line 1: not a valid URL")
    assert "DNS label" in errors["name"]


def test_labels_and_links_round_trip_through_their_text_form() -> None:
    labels, error = parse_labels("tier=backend, app=reviews\nempty=")
    assert error is None
    assert labels == {"tier": "backend", "app": "reviews", "empty": ""}
    assert parse_labels(format_labels(labels)) == (labels, None)

    links, _ = parse_links("Run book https://wiki/x\n\nhttps://grafana/y\n")
    assert links == [
        {"title": "Run book", "url": "https://wiki/x"},
        {"title": "https://grafana/y", "url": "https://grafana/y"},
    ]
    assert format_links(links) == "Run book https://wiki/x\nhttps://grafana/y"


@pytest.mark.parametrize(
    ("text", "message"), [("tier", "key=value"), ("=x", "key=value"), ("a=1, a=2", "twice")]
)
def test_bad_label_syntax_is_explained(text: str, message: str) -> None:
    assert message in (parse_labels(text)[1] or "")


def test_ago_is_coarse_and_handles_naive_values() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert ago(now - timedelta(seconds=2), now) == "just now"
    assert ago(now - timedelta(seconds=42), now) == "42 s ago"
    assert ago(now - timedelta(minutes=5), now) == "5 min ago"
    assert ago((now - timedelta(hours=3)).replace(tzinfo=None), now) == "3 h ago"
    assert ago(now - timedelta(days=2), now) == "2 d ago"
    assert ago(None) == "never"


def test_hx_trigger_merges_events() -> None:
    response = hx_trigger(Response(), "refresh")
    toast(response, "Saved")
    assert response.headers["HX-Trigger"] == (
        '{"refresh": true, "toast": {"message": "Saved", "level": "success"}}'
    )


def test_unknown_pages_and_bad_parameters_get_html_for_browsers_json_for_api(
    client: TestClient,
) -> None:
    html = {"accept": "text/html,application/xhtml+xml"}
    page = client.get("/no-such-page", headers=html)
    assert page.status_code == 404
    assert "<html" in page.text
    assert "Page not found" in page.text
    bad = client.get("/services?page=abc", headers=html)
    assert bad.status_code == 422
    assert "page" in bad.text
    assert "<html" in bad.text
    api = client.get("/api/v1/services?page=abc", headers=html)
    assert api.status_code == 422
    assert api.json()["detail"][0]["loc"] == ["query", "page"]
    assert client.get("/no-such-page").json() == {"detail": "Not Found"}
