"""HTML catalog: full pages vs htmx fragments, forms with inline errors, stale edits, escaping."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

HX = {"HX-Request": "true"}


def form(name: str = "reviews", **fields: str) -> dict[str, str]:
    return {
        "namespace": "default",
        "name": name,
        "owner_team": "bookinfo",
        "description": "",
        "links": "",
        "labels": "",
        "reason": "",
        **fields,
    }


def create(client: TestClient, name: str = "reviews", **fields: str) -> None:
    response = client.post("/services/new", data=form(name, **fields), follow_redirects=False)
    assert response.status_code == 303, response.text


def api_create(client: TestClient, name: str, **fields: Any) -> None:
    response = client.post("/api/v1/services", json={"name": name, "owner_team": "t", **fields})
    assert response.status_code == 201, response.text


def field_error(html: str, field: str) -> str | None:
    match = re.search(rf'<p class="field-error" id="f-{field}-error"[^>]*>(.*?)</p>', html, re.S)
    return match.group(1).strip() if match else None


def test_root_redirects_to_the_catalog(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code in (302, 303, 307)
    assert response.headers["location"] == "/services"


def test_empty_catalog_says_what_to_do_next(client: TestClient) -> None:
    html = client.get("/services").text
    assert "No services yet" in html
    assert 'href="/services/new"' in html
    assert "meshctl demo" in html


def test_full_request_gets_the_page_htmx_request_gets_the_results_fragment(
    client: TestClient,
) -> None:
    create(client, "reviews")
    create(client, "ratings")

    page = client.get("/services")
    assert page.status_code == 200
    assert page.text.lstrip().startswith("<!doctype html>")
    assert "<nav" in page.text and 'id="filters"' in page.text
    assert "/static/htmx.min.js" in page.text

    fragment = client.get("/services", params={"q": "rev"}, headers=HX)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'id="filters"' not in fragment.text
    assert fragment.text.lstrip().startswith('<div id="results"')
    assert ">reviews</a>" in fragment.text
    assert ">ratings</a>" not in fragment.text


def test_history_restore_gets_the_whole_page(client: TestClient) -> None:
    headers = {**HX, "HX-History-Restore-Request": "true"}
    assert "<html" in client.get("/services", headers=headers).text


def test_filters_by_namespace_and_team(client: TestClient) -> None:
    create(client, "checkout", namespace="payments", owner_team="payments")
    create(client, "reviews", owner_team="bookinfo")

    page = client.get("/services").text
    assert '<option value="payments"' in page  # namespace and team options come from the data

    by_namespace = client.get("/services", params={"namespace": "payments"}, headers=HX).text
    assert ">checkout</a>" in by_namespace and ">reviews</a>" not in by_namespace
    by_team = client.get("/services", params={"team": "bookinfo"}, headers=HX).text
    assert ">reviews</a>" in by_team and ">checkout</a>" not in by_team


def test_search_without_match_offers_to_clear_filters(client: TestClient) -> None:
    create(client)
    html = client.get("/services", params={"q": "nothing-like-this"}, headers=HX).text
    assert "No services match" in html
    assert "Clear filters" in html


def test_pagination_links_keep_filters_and_swap_the_results(client: TestClient) -> None:
    for i in range(30):
        api_create(client, f"svc-{i:02d}", description="paged")
    first = client.get("/services", params={"q": "paged"}, headers=HX).text
    assert "Page 1 of 2" in first
    assert "Showing 1\N{EN DASH}25 of 30 services" in first
    assert ">svc-24</a>" in first and ">svc-25</a>" not in first
    next_link = re.search(r'<a class="btn btn-ghost" href="([^"]+)"\s+hx-get="\1"', first)
    assert next_link is not None
    assert "q=paged" in next_link.group(1) and "page=2" in next_link.group(1)
    assert 'hx-target="#results"' in first and 'hx-push-url="true"' in first

    second = client.get(next_link.group(1).replace("&amp;", "&"), headers=HX).text
    assert "Page 2 of 2" in second
    assert ">svc-25</a>" in second and ">svc-24</a>" not in second


def test_create_through_the_form_redirects_to_the_service_page_with_a_flash(
    client: TestClient,
) -> None:
    data = form(
        description="Book reviews",
        links="Runbook https://wiki.example.com/reviews\nhttps://grafana.example.com/d/reviews",
        labels="tier=backend, app=reviews",
        reason="new service",
    )
    response = client.post("/services/new", data=data, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/services/default/reviews"

    page = client.get("/services/default/reviews").text
    assert 'class="flash"' in page and "Created default/reviews." in page
    assert 'href="https://wiki.example.com/reviews"' in page and ">Runbook</a>" in page
    assert 'href="https://grafana.example.com/d/reviews"' in page
    assert '<span class="badge-key">tier</span><span class="badge-value">backend</span>' in page
    assert "new service" in page  # the reason shows under recent changes
    # The flash is shown once.
    assert "Created default/reviews." not in client.get("/services/default/reviews").text


def test_htmx_create_answers_with_hx_redirect(client: TestClient) -> None:
    response = client.post("/services/new", data=form(), headers=HX, follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["hx-redirect"] == "/services/default/reviews"


def test_invalid_form_shows_errors_next_to_fields_and_keeps_input(client: TestClient) -> None:
    data = form(name="Bad_Name", owner_team="", links="wiki", labels="tier")
    response = client.post("/services/new", data=data, headers=HX)
    assert response.status_code == 422
    html = response.text
    assert "<html" not in html and html.lstrip().startswith('<form id="service-form"')
    assert "DNS label" in (field_error(html, "name") or "")
    assert field_error(html, "owner_team") == "required"
    assert "line 1" in (field_error(html, "links") or "")
    assert "key=value" in (field_error(html, "labels") or "")
    assert field_error(html, "namespace") is None
    assert 'value="Bad_Name"' in html  # what the user typed stays
    assert ">wiki</textarea>" in html
    assert client.get("/api/v1/services").json()["total"] == 0


def test_invalid_form_without_htmx_gets_the_whole_page(client: TestClient) -> None:
    response = client.post("/services/new", data=form(name="-bad-"))
    assert response.status_code == 422
    assert "<html" in response.text
    assert field_error(response.text, "name")


def test_duplicate_name_is_reported_on_the_name_field(client: TestClient) -> None:
    create(client)
    response = client.post("/services/new", data=form(), headers=HX)
    assert response.status_code == 409
    assert "already exists" in (field_error(response.text, "name") or "")


def test_description_with_markup_is_shown_escaped(client: TestClient) -> None:
    create(client, description='<script>alert("x")</script>', labels="a=b")
    for html in (
        client.get("/services/default/reviews").text,
        client.get("/services").text,
        client.get("/audit").text,
    ):
        assert '<script>alert("x")</script>' not in html
        assert "&lt;script&gt;" in html


def test_service_page_shows_versions_instances_and_recent_changes(client: TestClient) -> None:
    create(client, description="Book reviews", reason="initial import")
    api = "/api/v1/services/reviews"
    assert client.post(f"{api}/versions", json={"name": "v1"}).status_code == 201
    instance = {"address": "10.0.0.7:9080", "version": "v1", "health": "healthy"}
    assert client.post(f"{api}/instances", json=instance).status_code == 201

    html = client.get("/services/default/reviews").text
    assert "<h1>reviews</h1>" in html
    assert ">bookinfo</a>" in html
    assert '<td class="primary mono">v1</td>' in html
    assert "10.0.0.7:9080" in html and "healthy" in html
    assert "service.create" in html and "version.create" in html and "instance.create" in html
    assert "initial import" in html
    assert "/audit?resource_kind=service&amp;resource_name=default/reviews" in html


def test_unknown_service_is_a_404_page(client: TestClient) -> None:
    response = client.get("/services/default/missing")
    assert response.status_code == 404
    assert "Service not found" in response.text and "<html" in response.text


def test_add_version_inline_returns_versions_and_changes_out_of_band(client: TestClient) -> None:
    create(client)
    response = client.post(
        "/services/default/reviews/versions",
        data={"name": "v1", "labels": "track=stable"},
        headers=HX,
    )
    assert response.status_code == 200
    html = response.text
    assert "<html" not in html
    assert html.lstrip().startswith('<section id="versions"')
    assert '<td class="primary mono">v1</td>' in html
    assert 'id="changes"' in html and 'hx-swap-oob="true"' in html
    assert "toast" in response.headers["hx-trigger"]


def test_add_version_errors_inline(client: TestClient) -> None:
    create(client)
    bad = client.post("/services/default/reviews/versions", data={"name": "V 1"}, headers=HX)
    assert bad.status_code == 422
    assert field_error(bad.text, "name")
    assert 'value="V 1"' in bad.text

    client.post("/services/default/reviews/versions", data={"name": "v1"}, headers=HX)
    dup = client.post("/services/default/reviews/versions", data={"name": "v1"}, headers=HX)
    assert dup.status_code == 409
    assert "already has a version" in (field_error(dup.text, "name") or "")


def test_add_version_without_htmx_redirects(client: TestClient) -> None:
    create(client)
    response = client.post(
        "/services/default/reviews/versions", data={"name": "v1"}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/services/default/reviews"


def test_edit_form_is_prefilled_and_carries_the_revision(client: TestClient) -> None:
    create(client, links="Runbook https://wiki.example.com/r", labels="b=2,a=1")
    html = client.get("/services/default/reviews/edit").text
    assert '<input type="hidden" name="revision" value="1">' in html
    assert ">Runbook https://wiki.example.com/r</textarea>" in html
    assert ">a=1\nb=2</textarea>" in html
    assert re.search(r'name="name" value="reviews"[^>]*readonly', html, re.S)


def test_edit_saves_and_records_the_reason(client: TestClient) -> None:
    create(client)
    data = form(owner_team="bookinfo-core", description="now with ratings", revision="1")
    data["reason"] = "team split"
    response = client.post("/services/default/reviews/edit", data=data, follow_redirects=False)
    assert response.status_code == 303
    service = client.get("/api/v1/services/reviews").json()
    assert service["owner_team"] == "bookinfo-core" and service["revision"] == 2
    events = client.get("/api/v1/audit", params={"resource_name": "default/reviews"}).json()
    assert events["items"][0]["reason"] == "team split"


def test_stale_edit_gets_409_with_a_clear_message_and_keeps_input(client: TestClient) -> None:
    create(client)
    first = form(owner_team="first-writer", revision="1")
    assert client.post("/services/default/reviews/edit", data=first).status_code == 200

    second = form(owner_team="second-writer", revision="1")
    response = client.post("/services/default/reviews/edit", data=second, headers=HX)
    assert response.status_code == 409
    html = response.text
    assert "Someone else changed this service" in html
    assert 'href="/services/default/reviews/edit"' in html  # reload link
    assert 'value="second-writer"' in html
    assert client.get("/api/v1/services/reviews").json()["owner_team"] == "first-writer"


def test_edit_with_invalid_field_is_422_not_a_write(client: TestClient) -> None:
    create(client)
    response = client.post(
        "/services/default/reviews/edit", data=form(owner_team="", revision="1"), headers=HX
    )
    assert response.status_code == 422
    assert field_error(response.text, "owner_team") == "required"
    assert client.get("/api/v1/services/reviews").json()["revision"] == 1


def test_delete_redirects_to_the_catalog(client: TestClient) -> None:
    create(client)
    response = client.post("/services/default/reviews/delete", data={"revision": "1"}, headers=HX)
    assert response.headers["hx-redirect"] == "/services"
    assert client.get("/api/v1/services/reviews").status_code == 404
    assert "Deleted default/reviews." in client.get("/services").text


def test_stale_delete_is_refused(client: TestClient) -> None:
    create(client)
    client.post("/services/default/reviews/edit", data=form(owner_team="x", revision="1"))
    response = client.post("/services/default/reviews/delete", data={"revision": "1"}, headers=HX)
    assert response.status_code == 409
    assert "someone else changed this service" in response.text
    assert client.get("/api/v1/services/reviews").status_code == 200


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Origin", "https://evil.example"),
        ("Referer", "https://evil.example/form"),
        ("Origin", "null"),
    ],
)
def test_cross_origin_form_posts_are_refused(client: TestClient, header: str, value: str) -> None:
    response = client.post("/services/new", data=form(), headers={header: value})
    assert response.status_code == 403
    assert client.get("/api/v1/services").json()["total"] == 0


def test_same_origin_form_post_is_accepted(client: TestClient) -> None:
    response = client.post(
        "/services/new",
        data=form(),
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert response.status_code == 303


def test_links_from_other_sites_still_open_pages(client: TestClient) -> None:
    create(client)
    headers = {"Referer": "https://wiki.example.com/runbooks", "Origin": "https://wiki.example.com"}
    assert client.get("/services/default/reviews", headers=headers).status_code == 200


def test_damaged_revision_is_explained_at_the_top_of_the_form(client: TestClient) -> None:
    create(client)
    response = client.post("/services/default/reviews/edit", data=form(revision="abc"), headers=HX)
    assert response.status_code == 422
    assert "out of date or damaged" in response.text


def test_live_search_pushes_a_clean_address(client: TestClient) -> None:
    response = client.get("/services?q=rev&namespace=&team=", headers=HX)
    assert response.headers["hx-push-url"] == "/services?q=rev"
    assert response.headers["vary"] == "HX-Request"


def test_a_reason_with_a_bidi_override_is_a_field_error(client: TestClient) -> None:
    response = client.post("/services/new", data=form(reason="ok \u202eevil"), headers=HX)
    assert response.status_code == 422
    assert "U+202E" in (field_error(response.text, "reason") or "")
    assert client.get("/api/v1/services").json()["total"] == 0
