"""CSRF tokens flow in a real Chromium: through htmx's header and through a plain form post
with JavaScript off; a form planted on another origin is refused."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import sign_in_path

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]


def test_a_plain_form_post_without_javascript_carries_the_token(
    browser: Browser, live_server: str
) -> None:
    context = browser.new_context(base_url=live_server, java_script_enabled=False)
    page = context.new_page()
    page.goto(sign_in_path("nojs@example.com"))
    page.goto("/services/new")
    page.get_by_role("textbox", name="Name", exact=True).fill("nojs-checkout")
    page.get_by_label("Owner team").fill("payments")
    page.get_by_role("button", name="Create service").click()
    expect(page).to_have_url(re.compile(r"/services/default/nojs-checkout$"))
    context.close()


def attack_form(live_server: str) -> str:
    return (
        f'<form method="post" action="{live_server}/services/new">'
        '<input name="name" value="planted"><input name="owner_team" value="evil">'
        "<button>go</button></form>"
    )


def test_forms_without_the_token_or_from_another_origin_are_refused(
    browser: Browser, live_server: str
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(live_server + sign_in_path("victim@example.com"))
    page.goto(f"{live_server}/services")  # the victim has the console open: cookie set

    # Markup injected into the console's own origin: same origin, but no token.
    page.set_content(attack_form(live_server))
    page.get_by_role("button", name="go").click()
    expect(page.locator("body")).to_contain_text("did not come from this console")

    # A page of another origin (opaque here: about:blank, Origin "null").
    page.goto("about:blank")
    page.set_content(attack_form(live_server))
    page.get_by_role("button", name="go").click()
    expect(page.locator("body")).to_contain_text("cross-origin request refused")

    page.goto(f"{live_server}/api/v1/services/planted")
    expect(page.locator("body")).to_contain_text("not found")
    context.close()
