"""The topology page in a real Chromium against a real ``meshctl serve`` over a SQLite file
seeded with a small mesh's catalog and traffic (``tests.topology.support.seed_mesh``). Here,
beside the other browser tests, so that the run shares one Chromium."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import (
    REPO_ROOT,
    WAIT_MS,
    free_port,
    meshctl,
    sign_in_path,
    wait_until_ready,
)
from tests.topology.support import seed_mesh

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

SERVER_ENV: dict[str, str] = {}
GRAPH_READY = "() => window.meshTopology && window.meshTopology.nodes().length > 0"


@pytest.fixture(scope="module")
def mesh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("topology-server")
    url = f"sqlite:///{data_dir / 'mesh.db'}"
    seed_mesh(url)
    port = free_port()
    env = {**os.environ, "MESH_DATABASE_URL": url, "MESH_DATA_DIR": str(data_dir)}
    SERVER_ENV.update(env)
    with (data_dir / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [*meshctl(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(base, process)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def page(browser: Browser, mesh_server: str) -> Iterator[Page]:
    context = browser.new_context(base_url=mesh_server, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(sign_in_path("topology@example.com", role="viewer", env=SERVER_ENV))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    assert errors == []  # no script errors, no CSP violations


def graph(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(
        """() => {
          const cy = window.meshTopology;
          return {
            nodes: cy.nodes().map(n => ({id: n.id(), label: n.data('display')})),
            edges: cy.edges().map(e => ({id: e.id(), label: e.data('display'),
                                         health: e.data('health')})),
            zoom: cy.zoom(),
          };
        }"""
    )
    return result


def click_element(page: Page, element_id: str, *, edge: bool = False) -> None:
    point = page.evaluate(
        """([id, edge]) => {
          const el = window.meshTopology.getElementById(id);
          const p = edge ? el.renderedMidpoint() : el.renderedPosition();
          const box = document.getElementById('topology-graph').getBoundingClientRect();
          return {x: box.left + p.x, y: box.top + p.y};
        }""",
        [element_id, edge],
    )
    page.mouse.click(point["x"], point["y"])


def test_topology_renders_nodes_with_health_and_labelled_edges(page: Page) -> None:
    page.goto("/topology?window=1h")
    page.wait_for_function(GRAPH_READY)
    drawn = graph(page)

    ids = {n["id"] for n in drawn["nodes"]}
    assert ids == {
        "~external",
        "default/productpage",
        "default/reviews",
        "default/ratings",
        "default/details",
    }
    labels = {n["id"]: n["label"] for n in drawn["nodes"]}
    assert "degraded" in labels["default/reviews"]  # text beside the colour
    assert "healthy" in labels["default/ratings"]
    assert len(drawn["edges"]) == 4
    for e in drawn["edges"]:
        assert re.search(r"rps · [\d.]+ % err · p99 \d", e["label"]), e
    # The accessible twin of the canvas: the same calls as a table.
    assert page.locator("#topology-edges tbody tr").count() == 4


def test_focusing_on_a_service_hides_the_rest(page: Page) -> None:
    page.goto("/topology?window=1h")
    page.wait_for_function(GRAPH_READY)
    page.get_by_label("Focus on service").fill("default/ratings")
    page.get_by_label("Focus on service").press("Enter")
    page.wait_for_function("() => window.meshTopology.nodes().length === 2")

    assert {n["id"] for n in graph(page)["nodes"]} == {"default/reviews", "default/ratings"}
    assert re.search(r"focus=default%2Fratings", page.url)
    expect_rows = page.locator("#topology-nodes tbody tr")
    page.wait_for_function(
        "() => document.querySelectorAll('#topology-nodes tbody tr').length === 2"
    )
    assert expect_rows.count() == 2


def test_clicking_a_node_opens_its_service_page(page: Page) -> None:
    page.goto("/topology?window=1h")
    page.wait_for_function(GRAPH_READY)
    click_element(page, "default/reviews")
    page.wait_for_url(re.compile(r"/services/default/reviews$"))
    # The service page then loads its traffic panel.
    page.wait_for_selector("#service-metrics .versions-side")
    assert "v2" in page.locator("#service-metrics .versions-side").inner_text().lower()


def test_clicking_an_edge_shows_its_figures_and_a_refresh_keeps_zoom_and_selection(
    page: Page,
) -> None:
    page.goto("/topology?window=1h")
    page.wait_for_function(GRAPH_READY)
    click_element(page, "default/productpage->default/reviews", edge=True)
    panel = page.locator("#edge-panel")
    panel.wait_for(state="visible")
    assert "productpage → reviews" in panel.inner_text()
    assert "10.00 %" in panel.inner_text()  # 4 of 40 failed
    assert panel.get_by_role("link", name="Recent traces →").get_attribute("href") == (
        "/traces?service=reviews"
    )

    page.evaluate("() => { window.meshTopology.zoom(1.7); }")  # zoom() returns the graph
    before = page.locator("#topology-status").inner_text()
    page.wait_for_function(
        "(before) => document.getElementById('topology-status').textContent !== before",
        arg=before,
        polling=200,  # not requestAnimationFrame: an idle canvas page may not draw frames
        timeout=30_000,
    )
    assert graph(page)["zoom"] == pytest.approx(1.7)
    assert panel.is_visible()
    assert page.get_by_label("Focus on service").input_value() == ""


def test_highlight_failing_paths_fades_the_rest(page: Page) -> None:
    page.goto("/topology?window=1h&versions=true")
    page.wait_for_function(GRAPH_READY)
    page.get_by_label("Highlight failing paths").check()
    faded = page.evaluate("() => window.meshTopology.elements('.faded').map(e => e.id())")
    on_path = page.evaluate("() => window.meshTopology.edges('.on-path').map(e => e.id())")
    assert "default/productpage@v1->default/reviews@v2" in on_path
    assert "default/productpage@v1->default/details@v1" in faded
