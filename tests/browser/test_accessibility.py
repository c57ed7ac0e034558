"""WCAG 2.1 AA in a real Chromium: axe-core (vendored in tests/fixtures/axe) on every console
page, over a catalog that is not empty, and the keyboard path through a form."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import (
    LIVE_SERVER_DATA,
    LIVE_SERVER_ENV,
    REPO_ROOT,
    WAIT_MS,
    admin_token,
    sign_in_path,
)
from tests.telemetry.support import protobuf_body, sdk_spans

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

AXE_SCRIPT = REPO_ROOT / "tests" / "fixtures" / "axe" / "axe.min.js"
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
# What the project promises to have none of; "minor" and "moderate" findings are reviewed by hand.
BLOCKING_IMPACTS = {"serious", "critical"}

# A service of its own, so that other browser tests sharing the live server do not collide.
SERVICE = "a11y-reviews"
SERVICE_URL = f"/services/default/{SERVICE}"


def _api(url: str, token: str, method: str, path: str, body: dict[str, Any], reason: str) -> None:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
            "X-Mesh-Reason": reason,
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status in (200, 201), response.status


@pytest.fixture(scope="module")
def seeded(live_server: str) -> str:
    """A service with two versions, a traffic split, their audit events and a trace, so that
    every page shows its tables, badges and forms rather than its empty state. Returns the
    path of the trace."""
    token = admin_token(LIVE_SERVER_ENV)
    _api(
        live_server,
        token,
        "POST",
        "/api/v1/services",
        {
            "name": SERVICE,
            "owner_team": "shop",
            "description": "Ranks the reviews shown under each product.",
            "labels": {"tier": "backend"},
        },
        "accessibility checks",
    )
    for version in ("v1", "v2"):
        _api(
            live_server,
            token,
            "POST",
            f"/api/v1/services/{SERVICE}/versions",
            {"name": version},
            f"ship {version}",
        )
    _api(
        live_server,
        token,
        "POST",
        f"/api/v1/services/{SERVICE}/traffic/weights",
        {"weights": {"v1": 80, "v2": 20}},
        "canary of v2",
    )
    join_token = (LIVE_SERVER_DATA["data_dir"] / "join-token").read_text().strip()
    spans = sdk_spans(SERVICE, "default", "v2", error=True)
    trace = urllib.request.Request(
        live_server + "/v1/traces",
        data=protobuf_body(spans),
        headers={
            "Content-Type": "application/x-protobuf",
            "Authorization": f"Bearer {join_token}",
        },
        method="POST",
    )
    with urllib.request.urlopen(trace, timeout=60) as response:
        assert response.status == 200
    return "/traces/" + format(spans[0].context.trace_id, "032x")


def blocking_violations(page: Page) -> list[str]:
    """Every serious or critical WCAG 2.1 A/AA violation axe finds on the page once it and the
    partials it loads have settled, folded parts unfolded; one line per offending node."""
    page.wait_for_load_state("networkidle")
    # Polling sections (agents every 2 s) would swap nodes under axe's feet: hold htmx still.
    page.evaluate(
        "() => document.body.addEventListener('htmx:beforeRequest', (e) => e.preventDefault())"
    )
    # axe skips what is hidden: unfold every <details> (trace spans, unchanged fields).
    page.evaluate("() => document.querySelectorAll('details').forEach((d) => { d.open = true; })")
    page.add_script_tag(path=str(AXE_SCRIPT))
    result: dict[str, Any] = page.evaluate(
        "(tags) => axe.run(document, {runOnly: tags})", WCAG_21_AA
    )
    assert result["passes"], "axe checked nothing: is the page blank?"
    found = []
    for violation in result["violations"]:
        if violation["impact"] not in BLOCKING_IMPACTS:
            continue
        for node in violation["nodes"]:
            found.append(
                f"{violation['id']} ({violation['impact']}): {violation['help']}"
                f" at {node['target']}: {node['failureSummary']}"
            )
    return found


def assert_accessible(page: Page, where: str) -> None:
    found = blocking_violations(page)
    assert not found, f"{where}: {len(found)} axe violation(s)\n" + "\n".join(found)


# Every console page a signed-in admin reaches, with a name that says which one failed.
ADMIN_PAGES = {
    "services list": "/services",
    "service detail": SERVICE_URL,
    "service edit form": f"{SERVICE_URL}/edit",
    "new service form": "/services/new",
    "traffic policy editor": f"{SERVICE_URL}/traffic",
    "traffic policy revision": f"{SERVICE_URL}/traffic/revisions/1",
    "mesh defaults editor": "/mesh/defaults",
    "topology": "/topology",
    "traces list": "/traces",
    "trace detail": "{trace}",
    "audit log": "/audit",
    "agents": "/agents",
    "access": "/access",
    "your account": "/account",
    "not found": "/services/default/no-such-service",
}


def _context_page(browser: Browser, live_server: str, storage_state: Any = None) -> Page:
    # The console's CSP (script-src 'self') rightly refuses the injected axe script; bypassing
    # it in the test's browser context only leaves the page under test as served.
    context = browser.new_context(
        base_url=live_server,
        viewport={"width": 1280, "height": 860},
        storage_state=storage_state,
        bypass_csp=True,
    )
    context.set_default_timeout(WAIT_MS)
    return context.new_page()


@pytest.fixture
def admin_page(browser: Browser, live_server: str, admin_storage: Any) -> Iterator[Page]:
    page = _context_page(browser, live_server, admin_storage)
    yield page
    page.context.close()


@pytest.fixture
def signed_out_page(browser: Browser, live_server: str) -> Iterator[Page]:
    page = _context_page(browser, live_server)
    yield page
    page.context.close()


@pytest.fixture
def viewer_page(browser: Browser, live_server: str) -> Iterator[Page]:
    page = _context_page(browser, live_server)
    page.goto(sign_in_path("a11y-viewer@example.com", role="viewer"))
    yield page
    page.context.close()


@pytest.mark.parametrize("path", ADMIN_PAGES.values(), ids=ADMIN_PAGES.keys())
def test_admin_pages_have_no_serious_axe_violation(
    admin_page: Page, seeded: str, path: str
) -> None:
    page = admin_page
    path = path.format(trace=seeded)
    response = page.goto(path)
    assert response is not None
    # The page is the one meant: a redirect to sign-in or a server error would pass axe too.
    expected_status = 404 if path.endswith("no-such-service") else 200
    assert response.status == expected_status, (path, response.status)
    expect(page.locator("main h1, main h2").first).to_be_visible()
    assert_accessible(page, path)


def test_form_with_errors_has_no_serious_axe_violation(admin_page: Page, seeded: str) -> None:
    """The invalid state of a form: alert, aria-invalid and the error next to its field."""
    page = admin_page
    page.goto("/services/new")
    page.get_by_role("textbox", name="Name", exact=True).fill("Not_A_Dns_Label")
    page.get_by_role("button", name="Create service").click()
    expect(page.locator("#f-name-error")).to_be_visible()
    assert_accessible(page, "new service form with errors")


def test_sign_in_page_has_no_serious_axe_violation(signed_out_page: Page) -> None:
    page = signed_out_page
    page.goto("/services")
    expect(page).to_have_url(re.compile(r"/sign-in"))
    expect(page.get_by_label("Password")).to_be_visible()
    assert_accessible(page, "sign-in page")


def test_read_only_service_detail_has_no_serious_axe_violation(
    viewer_page: Page, seeded: str
) -> None:
    page = viewer_page
    page.goto(SERVICE_URL)
    expect(page.get_by_role("heading", name=SERVICE)).to_be_visible()
    # The read-only variant: a viewer is offered no edit.
    expect(page.get_by_role("link", name="View policy (YAML) →")).to_be_visible()
    expect(page.get_by_role("link", name=re.compile("^Edit"))).to_have_count(0)
    assert_accessible(page, "service detail (viewer)")


def _focused_name(page: Page) -> str:
    """What a screen reader would announce first for the focused element: its label, or its
    text for links and buttons."""
    name: str = page.evaluate(
        """() => {
            const el = document.activeElement;
            if (!el) return "";
            const label = el.labels && el.labels[0] ? el.labels[0].textContent : el.textContent;
            return (label || "").replace(/\\s+/g, " ").trim();
        }"""
    )
    return name


def _tab_to(page: Page, name: str, limit: int = 80) -> None:
    """Press Tab until the element named ``name`` has the focus (at once if it has it already,
    as an autofocused field does). A required field's label ends in a decorative "*"."""
    seen = []
    for _ in range(limit):
        focused = _focused_name(page).removesuffix("*").strip()
        if focused == name:
            return
        seen.append(focused)
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {name!r}; it went through {seen}")


def test_keyboard_only_skip_link_and_new_service_form(page: Page, seeded: str) -> None:
    page.goto("/services")
    page.keyboard.press("Tab")
    assert _focused_name(page) == "Skip to content"
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#main$"))

    _tab_to(page, "+ New service")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/services/new$"))

    _tab_to(page, "Name")
    page.keyboard.type("a11y-keyboard")
    _tab_to(page, "Owner team")
    page.keyboard.type("shop")
    _tab_to(page, "Reason")
    page.keyboard.type("created with the keyboard only")
    _tab_to(page, "Create service")
    page.keyboard.press("Enter")

    expect(page).to_have_url(re.compile(r"/services/default/a11y-keyboard$"))
    expect(page.locator(".flash")).to_contain_text("Created default/a11y-keyboard")
