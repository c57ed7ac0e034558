"""The HTML side: topology page, the traffic panel of a service page, health in the list."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import insert

from app.db import Database
from app.telemetry.models import Span
from tests.topology.test_api import create_service, mesh, seed  # noqa: F401  (fixture)

HX = {"HX-Request": "true"}


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_topology_page_lists_nodes_and_calls_in_tables(mesh: TestClient) -> None:  # noqa: F811
    response = mesh.get("/topology")
    assert response.status_code == 200
    html = response.text
    assert '<script src="/static/cytoscape.min.js"' in html
    assert '<script src="/static/topology.js"' in html
    assert 'aria-current="page"' in html.split('href="/topology"', 1)[1][:40]
    assert '<a href="/services/default/reviews">reviews</a>' in html
    words = text(html)
    assert "degraded" in words and "idle" in words
    assert '<a href="/traces?service=reviews">' in html
    assert "7.50 %" in words  # error % of productpage → reviews


def test_topology_refresh_fragment_is_just_the_tables(mesh: TestClient) -> None:  # noqa: F811
    response = mesh.get("/topology?focus=default/ratings", headers=HX)
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<details id="topology-table"')
    assert " open>" in response.text.lstrip().split("\n", 1)[0]  # a small graph: unfolded
    assert "<html" not in response.text
    assert "details" not in text(response.text)  # outside the focus


def test_topology_page_with_unknown_focus_says_so(client: TestClient) -> None:
    response = client.get("/topology?focus=nobody", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "no service &#39;nobody&#39;" in response.text


def test_service_page_loads_the_traffic_panel(mesh: TestClient) -> None:  # noqa: F811
    page = mesh.get("/services/default/reviews").text
    assert 'hx-get="/services/default/reviews/metrics"' in page


def test_traffic_panel_shows_versions_side_by_side_peers_and_traces(
    mesh: TestClient,  # noqa: F811
    database: Database,
) -> None:
    now = datetime.now(UTC)
    start_ns = int((now - timedelta(seconds=30)).timestamp() * 1e9)
    spans = [
        ("a" * 32, "reviews", 900.0, 503, True),
        ("b" * 32, "reviews", 1500.0, 200, False),
        ("c" * 32, "ratings", 5000.0, 200, False),
    ]
    with database.session(write=True) as session:
        session.execute(
            insert(Span),
            [
                {
                    "trace_id": trace_id,
                    "span_id": f"{i:016x}",
                    "parent_span_id": None,
                    "name": "GET /reviews",
                    "kind": 2,
                    "service": service,
                    "namespace": "default",
                    "version": "v2",
                    "start_ns": start_ns,
                    "end_ns": start_ns + int(duration * 1e6),
                    "duration_ms": duration,
                    "http_status": status,
                    "error": error,
                    "attributes": {},
                    "received_at": now,
                }
                for i, (trace_id, service, duration, status, error) in enumerate(spans)
            ],
        )
        session.commit()

    response = mesh.get("/services/default/reviews/metrics?window=5m", headers=HX)
    assert response.status_code == 200
    html = response.text
    assert html.lstrip().startswith('<section id="service-metrics"')
    words = text(html)
    assert re.search(r"v1 .*100\.00 %", words)
    assert re.search(r"v2 .*70\.00 %", words)
    assert '<a href="/services/default/productpage">productpage</a>' in html  # a caller
    assert '<a href="/services/default/ratings">ratings</a>' in html  # a callee
    failing = html.split('id="failing-traces-h"', 1)[1].split("</ul>", 1)[0]
    assert f'href="/traces/{"a" * 32}"' in failing
    assert "b" * 32 not in failing
    slowest = html.split('id="slowest-traces-h"', 1)[1].split("</ul>", 1)[0]
    assert slowest.index("b" * 12) < slowest.index("a" * 12)  # slowest first
    assert "c" * 12 not in slowest  # another service's trace
    assert 'role="img" aria-label="Requests per second: latest' in html


def test_catalog_list_shows_health_and_success_rate(mesh: TestClient) -> None:  # noqa: F811
    html = mesh.get("/services").text
    row = r'<tr>\s*<td>\s*<a class="primary" href="/services/default/([a-z]+)".*?</tr>'
    rows = {m.group(1): text(m.group(0)) for m in re.finditer(row, html, re.S)}
    assert "degraded" in rows["reviews"] and "92.50 % ok" in rows["reviews"]
    assert "healthy" in rows["ratings"] and "100.00 % ok" in rows["ratings"]
    assert "idle" in rows["quiet"] and "% ok" not in rows["quiet"]
