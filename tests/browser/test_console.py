"""The console in a real Chromium against a real ``meshctl serve``."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]


def test_create_with_inline_error_then_find_open_and_audit(page: Page) -> None:
    page.goto("/services")
    page.get_by_role("link", name="+ New service").first.click()
    expect(page).to_have_url(re.compile(r"/services/new$"))

    # First try: an invalid name. The error shows next to the field, typed values stay.
    page.get_by_role("textbox", name="Name", exact=True).fill("Checkout_Service")
    page.get_by_label("Owner team").fill("payments")
    page.get_by_label("Description").fill("Takes the money <b>fast</b>")
    page.get_by_label("Labels").fill("tier=backend")
    page.get_by_role("button", name="Create service").click()
    error = page.locator("#f-name-error")
    expect(error).to_contain_text("DNS label")
    expect(page).to_have_url(re.compile(r"/services/new$"))
    expect(page.get_by_label("Owner team")).to_have_value("payments")
    expect(page.get_by_role("textbox", name="Name", exact=True)).to_have_attribute(
        "aria-invalid", "true"
    )

    # Fix it and submit: we land on the service page with a confirmation.
    page.get_by_role("textbox", name="Name", exact=True).fill("checkout")
    page.get_by_label("Reason").fill("launching payments")
    page.get_by_role("button", name="Create service").click()
    expect(page).to_have_url(re.compile(r"/services/default/checkout$"))
    expect(page.locator(".flash")).to_contain_text("Created default/checkout")
    expect(page.locator(".description")).to_have_text("Takes the money <b>fast</b>")

    # Live search from the catalog finds it, without a page load, and the URL follows.
    page.goto("/services")
    page.evaluate("window.__same_document = true")
    page.get_by_label("Search").press_sequentially("check", delay=30)
    results = page.locator("#results")
    expect(results.get_by_role("link", name="checkout")).to_be_visible()
    expect(page).to_have_url(re.compile(r"[?&]q=check"))
    assert page.evaluate("window.__same_document") is True
    page.get_by_label("Search").fill("zzz-no-such-service")
    expect(results).to_contain_text("No services match")
    page.get_by_label("Search").fill("check")
    results.get_by_role("link", name="checkout").click()

    # The service page lists its audit entry; the audit page shows it with the reason.
    expect(page).to_have_url(re.compile(r"/services/default/checkout$"))
    changes = page.locator("#changes")
    expect(changes).to_contain_text("service.create")
    expect(changes).to_contain_text("launching payments")
    changes.get_by_role("link", name="Audit log").click()
    expect(page).to_have_url(re.compile(r"/audit\?"))
    event = page.locator("li.event").first
    expect(event).to_contain_text("service.create")
    expect(event).to_contain_text("default/checkout")
    expect(event).to_contain_text("launching payments")
    expect(event).to_contain_text("UTC")
    expect(page.locator("#verify")).to_contain_text("Chain intact")


def test_add_version_inline_and_stale_edit_message(page: Page) -> None:
    page.goto("/services/new")
    page.get_by_role("textbox", name="Name", exact=True).fill("ledger")
    page.get_by_label("Owner team").fill("payments")
    page.get_by_role("button", name="Create service").click()
    expect(page).to_have_url(re.compile(r"/services/default/ledger$"))

    versions = page.locator("#versions")
    versions.get_by_label("New version").fill("v1")
    versions.get_by_role("button", name="Add version").click()
    expect(versions.locator("tbody")).to_contain_text("v1")
    expect(page.locator("#changes")).to_contain_text("version.create")  # swapped out of band
    expect(page.locator("#toasts")).to_contain_text("Added version v1")

    # Two tabs edit the same revision; the second save is refused with a clear message.
    page.goto("/services/default/ledger/edit")
    other = page.context.new_page()
    other.goto("/services/default/ledger/edit")
    other.get_by_label("Description").fill("edited in the other tab")
    other.get_by_role("button", name="Save changes").click()
    expect(other).to_have_url(re.compile(r"/services/default/ledger$"))
    other.close()

    page.get_by_label("Description").fill("my edit")
    page.get_by_role("button", name="Save changes").click()
    alert = page.get_by_role("alert").filter(has_text="Someone else changed this service")
    expect(alert).to_be_visible()
    expect(page.get_by_label("Description")).to_have_value("my edit")
    alert.get_by_role("link", name="Reload the latest version").click()
    expect(page.get_by_label("Description")).to_have_value("edited in the other tab")
