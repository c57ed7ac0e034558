"""The traces API and pages: search filters, one trace, the waterfall and its clock-skew rule."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from app.telemetry.schemas import SpanRead
from app.telemetry.traces import waterfall
from tests.telemetry.support import PROTOBUF

MS = 1_000_000


def span(
    trace: int,
    span_id: int,
    parent: int | None,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    error: bool = False,
    status: int = 200,
) -> dict[str, Any]:
    return {
        "trace": trace,
        "span_id": span_id,
        "parent": parent,
        "name": name,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "error": error,
        "status": status,
    }


def send(
    client: TestClient,
    service: str,
    spans: list[dict[str, Any]],
    base_ns: int,
    namespace: str = "shop",
) -> None:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (
        ("service.name", service),
        ("service.namespace", namespace),
        ("service.version", "v1"),
    ):
        attribute = resource_spans.resource.attributes.add()
        attribute.key = key
        attribute.value.string_value = value
    scope = resource_spans.scope_spans.add()
    for s in spans:
        out = scope.spans.add()
        out.trace_id = s["trace"].to_bytes(16, "big")
        out.span_id = s["span_id"].to_bytes(8, "big")
        if s["parent"]:
            out.parent_span_id = s["parent"].to_bytes(8, "big")
        out.name = s["name"]
        out.kind = 2
        out.start_time_unix_nano = base_ns + int(s["start_ms"] * MS)
        out.end_time_unix_nano = base_ns + int(s["end_ms"] * MS)
        attribute = out.attributes.add()
        attribute.key = "http.response.status_code"
        attribute.value.int_value = s["status"]
        if s["error"]:
            out.status.code = 2
    response = client.post("/v1/traces", content=request.SerializeToString(), headers=PROTOBUF)
    assert response.status_code == 200, response.text


@pytest.fixture
def shop(client: TestClient) -> dict[str, str]:
    """Three traces a few minutes ago, and one from yesterday."""
    now = time.time_ns()
    base = now - 5 * 60 * 10**9
    # 1: checkout (fast, fine); 2: checkout → payments fails; 3: a slow search.
    send(
        client,
        "frontend",
        [
            span(1, 11, None, "GET /checkout", 0, 40),
            span(2, 21, None, "GET /checkout", 1000, 1300),
            span(3, 31, None, "GET /search", 2000, 4500),
        ],
        base,
    )
    send(
        client,
        "payments",
        [span(2, 22, 21, "POST /charge", 1010, 1290, error=True, status=503)],
        base,
    )
    send(client, "search", [span(3, 32, 31, "query", 2010, 4400)], base)
    send(client, "frontend", [span(4, 41, None, "GET /old", 0, 10)], now - 26 * 3600 * 10**9)
    return {
        name: format(i, "032x") for name, i in (("ok", 1), ("failed", 2), ("slow", 3), ("old", 4))
    }


def ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.text
    return {item["trace_id"] for item in response.json()["items"]}


def test_search_filters(client: TestClient, shop: dict[str, str]) -> None:
    assert ids(client.get("/api/v1/traces")) == {shop["ok"], shop["failed"], shop["slow"]}
    assert ids(client.get("/api/v1/traces?service=payments")) == {shop["failed"]}
    assert ids(client.get("/api/v1/traces?operation=GET /checkout")) == {shop["ok"], shop["failed"]}
    assert ids(client.get("/api/v1/traces?error=true")) == {shop["failed"]}
    assert ids(client.get("/api/v1/traces?min_duration_ms=2000")) == {shop["slow"]}
    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    until = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    assert ids(client.get("/api/v1/traces", params={"since": since, "until": until})) == {
        shop["old"]
    }
    assert len(ids(client.get("/api/v1/traces?limit=1"))) == 1


def test_a_summary_describes_the_whole_trace(client: TestClient, shop: dict[str, str]) -> None:
    (item,) = client.get("/api/v1/traces?service=payments").json()["items"]
    assert item["root_name"] == "GET /checkout" and item["root_service"] == "frontend"
    assert item["services"] == ["frontend", "payments"]
    assert (item["span_count"], item["error_count"], item["error"]) == (2, 1, True)
    assert item["duration_ms"] == pytest.approx(300, abs=0.01)


def test_one_trace_404_and_422(client: TestClient, shop: dict[str, str]) -> None:
    trace = client.get(f"/api/v1/traces/{shop['failed'].upper()}").json()
    assert [s["name"] for s in trace["spans"]] == ["GET /checkout", "POST /charge"]
    assert trace["spans"][1]["http_status"] == 503
    assert client.get(f"/api/v1/traces/{'f' * 32}").status_code == 404
    assert client.get("/api/v1/traces/not-a-trace-id").status_code == 422
    assert client.get("/api/v1/traces?limit=0").status_code == 422
    assert client.get("/api/v1/traces?min_duration_ms=-1").status_code == 422


def test_traces_are_documented_in_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/traces" in paths and "/api/v1/traces/{trace_id}" in paths
    assert "/v1/traces" in paths and "/v1/metrics" in paths


def test_traces_page_searches_with_htmx_partials_and_pushed_urls(
    client: TestClient, shop: dict[str, str]
) -> None:
    page = client.get("/traces")
    assert page.status_code == 200
    assert 'aria-current="page"' in page.text and ">\n          Traces" in page.text
    assert shop["slow"] in page.text and shop["old"] not in page.text

    partial = client.get("/traces?service=payments&errors=1", headers={"HX-Request": "true"})
    assert "<html" not in partial.text
    assert shop["failed"] in partial.text and shop["ok"] not in partial.text
    assert "✗ 1 error" in partial.text  # error shown in text, not colour alone
    assert partial.headers["HX-Push-Url"] == "/traces?service=payments&errors=1"

    day = client.get("/traces?range=24h")
    assert shop["old"] not in day.text and shop["ok"] in day.text
    assert shop["old"] in client.get("/traces?range=3d").text

    bad = client.get("/traces?min_duration_ms=fast")
    assert bad.status_code == 422
    assert "a number of milliseconds" in bad.text
    assert "No traces match" in client.get("/traces?service=nobody").text


def test_trace_page_is_a_waterfall_with_service_links(
    client: TestClient, shop: dict[str, str]
) -> None:
    page = client.get(f"/traces/{shop['failed']}")
    assert page.status_code == 200
    text = page.text
    assert text.count('<li class="wf-span') == 2
    assert 'href="/services/shop/payments"' in text and 'href="/services/shop/frontend"' in text
    assert "✗ error" in text  # the failing span says so in text
    assert "<details>" in text and "http.response.status_code" in text
    assert "<script" not in text.split("</head>")[1]  # no inline scripts (CSP)
    assert client.get(f"/traces/{'e' * 32}", headers={"Accept": "text/html"}).status_code == 404


def read(
    span_id: str, parent: str | None, start_ms: float, end_ms: float, service: str = "a"
) -> SpanRead:
    return SpanRead(
        trace_id="1" * 32,
        span_id=span_id,
        parent_span_id=parent,
        name=span_id,
        kind="server",
        service=service,
        namespace="default",
        version="",
        start=datetime.now(UTC),
        start_ns=int(start_ms * MS),
        end_ns=int(end_ms * MS),
        duration_ms=max(0.0, end_ms - start_ms),
        http_status=None,
        error=False,
        attributes={},
    )


def test_waterfall_nests_children_and_clamps_clock_skew() -> None:
    spans = [
        read("root", None, 100, 200),
        read("early", "root", 90, 150, "b"),  # starts before its parent (skewed clock)
        read("late", "root", 180, 260, "c"),  # ends after it
        read("inner", "early", 110, 120, "b"),
        read("backwards", "root", 150, 140),  # ends before it starts
        read("orphan", "gone", 120, 130),
    ]
    rows, total_ms = waterfall(spans)
    order = [r.span.span_id for r in rows]
    assert order == ["root", "early", "inner", "backwards", "late", "orphan"]
    by_id = {r.span.span_id: r for r in rows}
    assert [by_id[n].depth for n in ("root", "early", "inner", "late")] == [0, 1, 2, 1]
    assert total_ms == pytest.approx(100)
    for row in rows:
        assert row.offset_pct >= 0 and row.width_pct > 0
        assert row.offset_pct + row.width_pct <= 100.0001
    assert by_id["early"].clamped and by_id["late"].clamped and by_id["backwards"].clamped
    assert not by_id["root"].clamped and not by_id["inner"].clamped
    assert by_id["early"].offset_pct == 0  # drawn from the parent's start, not before it
    assert by_id["orphan"].orphan and not by_id["root"].orphan


def test_skewed_trace_page_says_so(client: TestClient) -> None:
    base = time.time_ns() - 60 * 10**9
    send(client, "edge", [span(9, 91, None, "GET /", 100, 200)], base)
    send(client, "skewed", [span(9, 92, 91, "work", 50, 150)], base)
    text = client.get(f"/traces/{9:032x}").text
    assert "Clock skew" in text and "⚠ clock skew" in text


def test_far_dates_are_just_empty_windows(client: TestClient) -> None:
    response = client.get("/api/v1/traces", params={"since": "2263-01-01T00:00:00Z"})
    assert response.status_code == 200 and response.json()["items"] == []
    response = client.get(
        "/api/v1/traces", params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"}
    )
    assert response.status_code == 200
