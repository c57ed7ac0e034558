"""The newcomer's path through the running demo (``meshctl demo``) in a real Chromium: open the
console, see the shop's topology with live edges, open the catalog, open the service with a
canary, shift 25 % of its traffic to the canary and watch every agent converge."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import WAIT_MS
from tests.e2e.mesh import wait_until
from tests.e2e.test_demo import AGENTS, EXPECTED_EDGES, Demo, processes_mentioning

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

# Generous bounds for a loaded 2-core machine; each wait ends as soon as its condition holds.
EDGES_TIMEOUT_MS = 120_000
SYNC_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp: Path = tmp_path_factory.mktemp("demo")
    running = Demo(tmp)
    running.start()
    try:
        wait_until(running.synced, 180, f"{AGENTS} agents SYNCED")
        yield running
        running.stop()
    finally:
        running.kill()
    assert processes_mentioning(str(tmp)) == []


def open_console_as_newcomer(browser: Browser, demo: Demo) -> Page:
    """What a newcomer does with what ``meshctl demo`` printed: open the one-time sign-in
    link, which lands on the console signed in."""
    link = (demo.tmp / "data" / "demo" / "sign-in-link").read_text().strip()
    assert link.startswith(demo.url + "/sign-in/link/")
    context = browser.new_context(base_url=demo.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(demo.url)
    assert "/sign-in" in page.url  # nobody gets in without signing in
    page.goto(link)
    assert "/sign-in" not in page.url
    return page


@pytest.fixture
def console(browser: Browser, demo: Demo) -> Iterator[Page]:
    page = open_console_as_newcomer(browser, demo)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.context.close()
    assert errors == []  # no script errors


def drawn_edges(page: Page) -> set[tuple[str, str]]:
    pairs: list[list[str]] = page.evaluate(
        """() => window.meshTopology.edges().map(e => [e.source().id(), e.target().id()])"""
    )
    return {(source.split("/")[-1], target.split("/")[-1]) for source, target in pairs}


def test_newcomer_sees_the_living_shop_and_shifts_a_canary(console: Page) -> None:
    from playwright.sync_api import expect

    page = console
    # The topology: the shop's services, and the calls between them as live edges.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Topology").click()
    expect(page).to_have_url(re.compile(r"/topology"))
    page.wait_for_function(
        """(expected) => window.meshTopology && expected.every(([s, t]) =>
             window.meshTopology.edges().some(e =>
               e.source().id().endsWith('/' + s) && e.target().id().endsWith('/' + t)))""",
        arg=sorted(EXPECTED_EDGES),
        polling=500,
        timeout=EDGES_TIMEOUT_MS,
    )
    assert drawn_edges(page) >= EXPECTED_EDGES
    edges_table = page.locator("#topology-edges")
    expect(edges_table).to_contain_text("checkout")
    expect(edges_table).to_contain_text(re.compile(r"\d"))  # live figures, not blanks

    # The catalog, then the service with a canary.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Services").click()
    services = page.locator("main")
    for name in ("frontend", "catalog", "checkout", "inventory", "payments"):
        expect(services.get_by_role("link", name=name, exact=True)).to_be_visible()
    services.get_by_role("link", name="catalog", exact=True).click()
    expect(page).to_have_url(re.compile(r"/services/shop/catalog$"))

    # The canary control: 25 % to v2, with a reason, applied.
    traffic = page.locator("#traffic")
    expect(traffic.get_by_role("heading", name="Traffic")).to_be_visible()
    expect(traffic.get_by_label("Canary version")).to_have_value("v2")
    traffic.get_by_role("button", name="25 %", exact=True).click()
    expect(traffic.locator("#share-result")).to_contain_text("v1 75 %, v2 25 %")
    traffic.get_by_label("Reason").fill("a newcomer tries the canary")
    traffic.get_by_role("button", name="Apply").click()

    # Every agent of the demo converges on the change, as the console shows it.
    progress = page.locator("#change-progress")
    expect(progress).to_contain_text(
        re.compile(rf"{AGENTS}/{AGENTS} synced in \d+ ms"), timeout=SYNC_TIMEOUT_MS
    )
    expect(progress).to_contain_text("v1 75 %, v2 25 %")
    expect(page.locator(".split")).to_have_attribute(
        "aria-label", "Current split: v1 75 %, v2 25 %"
    )
    entry = page.locator("#traffic-timeline li").first
    expect(entry).to_contain_text("a newcomer tries the canary")
    expect(entry).to_contain_text("converged", timeout=SYNC_TIMEOUT_MS)
