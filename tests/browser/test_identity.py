"""Sign-in and roles in a real Chromium: a person signs in with a password, sees only what their
role allows, moves their own team's canary but not another team's (the page offers no control,
and the server refuses the request anyway)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import LIVE_SERVER_ENV, WAIT_MS, admin_token

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "a long and private passphrase"


def _api(url: str, method: str, path: str, token: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.fixture(scope="module")
def two_teams(live_server: str) -> str:
    """Two services with a canary each: ``search-api`` of team search, ``billing`` of team
    payments; and two people: an operator of search, and a viewer."""
    token = admin_token(LIVE_SERVER_ENV)
    for name, team in (("search-api", "search"), ("billing", "payments")):
        assert _api(
            live_server, "POST", "/api/v1/services", token, {"name": name, "owner_team": team}
        ) in (201, 409)
        for version in ("v1", "v2"):
            _api(live_server, "POST", f"/api/v1/services/{name}/versions", token, {"name": version})
    for email, role, teams in (
        ("searcher@example.com", "operator", ["search"]),
        ("looker@example.com", "viewer", []),
    ):
        body = {"email": email, "role": role, "teams": teams, "password": PASSWORD}
        assert _api(live_server, "POST", "/api/v1/users", token, body) in (201, 409)
    return live_server


def signed_in_page(browser: Browser, url: str, email: str) -> Page:
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto("/services")
    expect(page).to_have_url(re.compile(r"/sign-in\?next=/services$"))
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/services$"))
    return page


def test_an_operator_moves_their_teams_canary_and_not_another_teams(
    browser: Browser, two_teams: str
) -> None:
    page = signed_in_page(browser, two_teams, "searcher@example.com")
    expect(page.locator(".user-menu")).to_contain_text("searcher@example.com")
    expect(page.locator(".user-menu")).to_contain_text("operator · search")
    expect(
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Access")
    ).to_have_count(0)

    page.goto("/services/default/search-api")
    traffic = page.locator("#traffic")
    traffic.get_by_role("button", name="25 %", exact=True).click()
    traffic.get_by_label("Reason").fill("try the new ranking")
    traffic.get_by_role("button", name="Apply").click()
    expect(page.locator(".split")).to_have_attribute(
        "aria-label", "Current split: v1 75 %, v2 25 %"
    )

    page.goto("/services/default/billing")
    expect(page.locator("#traffic")).to_contain_text("made by operators of team payments")
    expect(page.locator("#canary-form")).to_have_count(0)
    expect(page.get_by_role("link", name="Edit", exact=True)).to_have_count(0)

    # The page offers nothing, and the server refuses the request anyway, with the reason.
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    answer = page.request.post(
        f"{two_teams}/services/default/billing/traffic/weights",
        form={"csrf_token": csrf or "", "candidate": "v2", "share": "50", "action": "apply"},
        headers={"Origin": two_teams, "Accept": "text/html"},
    )
    assert answer.status == 403
    assert "operators may change only their own team" in answer.text()
    history = page.request.get(
        f"{two_teams}/api/v1/audit", params={"resource_name": "default/billing"}
    ).json()
    assert [e["action"] for e in history["items"] if e["action"].startswith("traffic")] == []
    page.context.close()


def test_a_viewer_sees_everything_and_can_change_nothing(browser: Browser, two_teams: str) -> None:
    page = signed_in_page(browser, two_teams, "looker@example.com")
    expect(page.get_by_role("link", name="+ New service")).to_have_count(0)
    page.goto("/services/default/search-api")
    expect(page.locator("#traffic")).to_contain_text("viewer role")
    expect(page.locator("#canary-form")).to_have_count(0)
    page.goto("/mesh/defaults")
    expect(page.get_by_role("button", name="Save")).to_have_count(0)
    expect(page.locator("body")).to_contain_text("Only admins can change the mesh defaults")

    # Signing out ends the session: the console asks to sign in again.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/sign-in$"))
    page.goto("/services")
    expect(page).to_have_url(re.compile(r"/sign-in\?next=/services$"))
    page.context.close()
