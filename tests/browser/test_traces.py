"""Traces in a real Chromium: search, open one as a waterfall, expand a span."""

from __future__ import annotations

import re
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import LIVE_SERVER_DATA
from tests.telemetry.support import protobuf_body, sdk_spans

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]


def test_a_trace_opens_as_a_waterfall(page: Page, live_server: str) -> None:
    spans = sdk_spans("storefront", "shop", "v7", error=True)
    token = (LIVE_SERVER_DATA["data_dir"] / "join-token").read_text().strip()
    request = urllib.request.Request(
        live_server + "/v1/traces",
        data=protobuf_body(spans),
        headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    trace_id = format(spans[0].context.trace_id, "032x")

    page.goto("/traces")
    page.get_by_label("Service").fill("storefront")
    page.get_by_label("Errors only").check()
    expect(page).to_have_url(re.compile(r"service=storefront"))
    link = page.get_by_role("link", name="storefront: GET /checkout")
    expect(link).to_be_visible()
    link.click()

    expect(page).to_have_url(re.compile(rf"/traces/{trace_id}$"))
    rows = page.locator("li.wf-span")
    expect(rows).to_have_count(2)
    failing = rows.filter(has_text="GET /reviews")
    expect(failing).to_contain_text("✗ error")
    bar = failing.locator(".wf-bar")
    expect(bar).to_be_visible()
    assert (bar.bounding_box() or {}).get("width", 0) > 0

    failing.locator("summary").click()
    expect(failing.get_by_role("link", name="shop/storefront")).to_have_attribute(
        "href", "/services/shop/storefront"
    )
    expect(failing).to_contain_text("http.response.status_code")
