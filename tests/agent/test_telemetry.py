"""mesh_agent.telemetry: trace context, sampling, span export over OTLP/HTTP, RED metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from prometheus_client.parser import text_string_to_metric_families

from mesh_agent import telemetry
from mesh_agent.telemetry import BUCKETS_MS, Telemetry, parse_traceparent, status_class

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE}-{PARENT}-01".encode()
UNSAMPLED = f"00-{TRACE}-{PARENT}-00".encode()


def make(ratio: float = 0.0, endpoint: str | None = None, **kw: Any) -> Telemetry:
    return Telemetry(
        service="web",
        version="v1",
        namespace="shop",
        sampling_ratio=ratio,
        otlp_endpoint=endpoint,
        **kw,
    )


def span(t: Telemetry, traceparent: bytes | None, kind: str = "server") -> telemetry.Span | None:
    return t.start_span(name="GET /", kind=kind, traceparent=traceparent, attributes={})


def fields(header: bytes) -> tuple[str, str, str, str]:
    version, trace_id, parent_id, flags = header.decode().split("-")
    return version, trace_id, parent_id, flags


# -- traceparent parsing ------------------------------------------------------------------------


def test_parse_valid_traceparent() -> None:
    ctx = parse_traceparent(SAMPLED)
    assert ctx is not None
    assert ctx.trace_id == TRACE.encode()
    assert ctx.parent_id == PARENT.encode()
    assert ctx.sampled
    unsampled = parse_traceparent(UNSAMPLED)
    assert unsampled is not None
    assert not unsampled.sampled


def test_parse_tolerates_surrounding_whitespace() -> None:
    assert parse_traceparent(b"  " + SAMPLED + b"\t") == parse_traceparent(SAMPLED)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        f"ff-{TRACE}-{PARENT}-01".encode(),  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # hex must be lowercase
        f"00-{TRACE[:-1]}-{PARENT}-01".encode(),  # trace id one digit short
        f"00-{TRACE}-{PARENT}0-01".encode(),  # parent id one digit long
        f"00-{TRACE}-{PARENT}-1".encode(),
        f"00-{TRACE}-{PARENT}-01-extra".encode(),  # version 00 has nothing after flags
        f"00_{TRACE}_{PARENT}_01".encode(),
        f"0g-{TRACE}-{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT}-01\n00".encode(),
        # the exact 55-byte form is checked without the regex: each of these is that long
        SAMPLED[:10] + b"-" + SAMPLED[11:],  # a dash inside the trace id
        SAMPLED[:40] + b"g" + SAMPLED[41:],  # not hex in the parent id
        SAMPLED[:-1] + b"A",  # flags must be lowercase
        SAMPLED[:-1] + b"\n",
        b"-" + SAMPLED[1:],
    ],
)
def test_parse_rejects_malformed(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_parse_none_is_absent() -> None:
    assert parse_traceparent(None) is None


def test_future_version_is_parsed_and_rewritten_as_version_00() -> None:
    future = f"cc-{TRACE}-{PARENT}-01-what-the-future-holds".encode()
    ctx = parse_traceparent(future)
    assert ctx is not None
    assert ctx.sampled
    assert make().outgoing_traceparent(future.replace(b"-01-", b"-00-", 1)) == UNSAMPLED


# -- sampling -----------------------------------------------------------------------------------


def test_incoming_sampled_flag_forces_a_span_even_at_ratio_zero() -> None:
    s = span(make(ratio=0.0), SAMPLED)
    assert s is not None
    version, trace_id, span_id, flags = fields(s.traceparent())
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert span_id != PARENT  # the header sent on is a child of this hop's span


def test_incoming_unsampled_flag_suppresses_the_span_even_at_ratio_one() -> None:
    assert span(make(ratio=1.0), UNSAMPLED) is None


@pytest.mark.parametrize("incoming", [None, b"00-not-a-valid-header-01"])
def test_without_a_valid_decision_the_ratio_decides(incoming: bytes | None) -> None:
    assert span(make(ratio=0.0), incoming) is None
    s = span(make(ratio=1.0), incoming)
    assert s is not None
    assert parse_traceparent(s.traceparent()) is not None  # a new, valid trace


def test_head_sampling_ratio_is_respected_statistically() -> None:
    t = make(ratio=0.2)
    n = 20_000
    sampled = sum(span(t, None) is not None for _ in range(n))
    # Binomial sd = sqrt(n p (1-p)) ≈ 57; 6 sd keeps this from ever flaking.
    assert abs(sampled - n * 0.2) < 6 * 57


def test_each_sampled_root_starts_its_own_trace() -> None:
    t = make(ratio=1.0)
    traces = set()
    for _ in range(50):
        s = span(t, None)
        assert s is not None
        traces.add(fields(s.traceparent())[1])
    assert len(traces) == 50


def test_span_chain_keeps_trace_id_and_links_parent_to_child() -> None:
    t = make(ratio=0.0)
    server = span(t, SAMPLED, "server")
    assert server is not None
    client = span(t, server.traceparent(), "client")
    assert client is not None
    _, s_trace, s_id, _ = fields(server.traceparent())
    _, c_trace, c_id, _ = fields(client.traceparent())
    assert s_trace == c_trace == TRACE
    assert len({s_id, c_id, PARENT}) == 3


def test_outgoing_traceparent_for_unsampled_requests() -> None:
    t = make(ratio=0.0)
    assert t.outgoing_traceparent(UNSAMPLED) == UNSAMPLED
    fresh = [t.outgoing_traceparent(v) for v in (None, b"bogus", b"")]
    for header in fresh:
        assert header is not None
        ctx = parse_traceparent(header)
        assert ctx is not None
        assert not ctx.sampled
        assert ctx.trace_id != TRACE.encode()
    assert len({fields(h)[1] for h in fresh if h}) == 3


def test_outgoing_traceparent_answers_for_the_header_it_is_given() -> None:
    # The proxy asks start_span, then outgoing_traceparent; the second call reuses the first
    # one's parse only for that very header, never for another request's.
    t = make(ratio=0.0)
    other = f"00-{'1' * 32}-{'2' * 16}-00".encode()
    assert span(t, UNSAMPLED) is None
    assert t.outgoing_traceparent(UNSAMPLED) == UNSAMPLED
    assert t.outgoing_traceparent(other) == other
    assert span(t, b"bogus") is None
    assert t.outgoing_traceparent(other) == other
    fresh = t.outgoing_traceparent(b"bogus")
    assert fresh is not None and fields(fresh)[1] != "1" * 32
    # Not in canonical form (blanks, flags beyond the sampled bit): rebuilt, not passed on.
    assert t.outgoing_traceparent(b" " + UNSAMPLED + b" ") == UNSAMPLED
    assert t.outgoing_traceparent(UNSAMPLED[:-2] + b"02") == UNSAMPLED


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="sampling_ratio"):
        make(ratio=1.5)
    with pytest.raises(ValueError, match="sampling_ratio"):
        make(ratio=float("nan"))
    with pytest.raises(ValueError, match="otlp_endpoint"):
        make(endpoint="localhost:4318")
    with pytest.raises(ValueError, match="kind"):
        make(ratio=1.0).start_span(name="x", kind="internal", traceparent=None, attributes={})


def test_no_endpoint_imports_neither_sdk_nor_prometheus_client() -> None:
    code = (
        "import sys\n"
        "from mesh_agent.telemetry import Telemetry\n"
        "t = Telemetry(service='a', version='v1', namespace='n', sampling_ratio=1.0,"
        " otlp_endpoint=None)\n"
        "s = t.start_span(name='x', kind='server', traceparent=None, attributes={})\n"
        "s.end(200)\n"
        "t.record(source='a', destination='b', destination_version='v1', status=200,"
        " duration_s=0.1)\n"
        "t.prometheus_text()\n"
        "heavy = [m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client'))]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- export to a real OTLP/HTTP receiver --------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append((self.path, self.headers.get("Content-Type", ""), body))
        reply = ExportTraceServiceRequest().SerializeToString()  # an empty success response
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    bodies: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Receiver,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def exported_spans(bodies: list[tuple[str, str, bytes]]) -> list[tuple[dict[str, Any], PbSpan]]:
    spans = []
    for path, content_type, body in bodies:
        assert path == "/v1/traces"
        assert content_type == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                spans.extend((resource, s) for s in scope_spans.spans)
    return spans


def test_spans_are_exported_over_otlp_http_with_ids_preserved(
    otlp_receiver: tuple[str, list[tuple[str, str, bytes]]],
) -> None:
    url, bodies = otlp_receiver
    t = make(ratio=0.0, endpoint=url, batch_delay_ms=50)
    server = t.start_span(
        name="inbound web", kind="server", traceparent=SAMPLED, attributes={"http.method": "GET"}
    )
    assert server is not None
    client = t.start_span(
        name="outbound reviews", kind="client", traceparent=server.traceparent(), attributes={}
    )
    assert client is not None
    root = t.start_span(name="root", kind="server", traceparent=None, attributes={})
    assert root is None  # ratio 0 and no incoming decision
    client.end(None)
    server.end(200)
    t.shutdown()  # flushes the batch processor

    spans = {s.name: (resource, s) for resource, s in exported_spans(bodies)}
    assert set(spans) == {"inbound web", "outbound reviews"}
    resource, inbound = spans["inbound web"]
    _, outbound = spans["outbound reviews"]
    assert resource["service.name"] == "web"
    assert resource["service.version"] == "v1"
    assert resource["service.namespace"] == "shop"
    assert inbound.trace_id.hex() == outbound.trace_id.hex() == TRACE
    assert inbound.parent_span_id.hex() == PARENT
    assert outbound.parent_span_id == inbound.span_id
    # What the agent sends on names exactly the exported spans.
    assert fields(server.traceparent())[2] == inbound.span_id.hex()
    assert fields(client.traceparent())[2] == outbound.span_id.hex()
    assert inbound.kind == PbSpan.SPAN_KIND_SERVER
    assert outbound.kind == PbSpan.SPAN_KIND_CLIENT
    attrs = {a.key: a.value for a in inbound.attributes}
    assert attrs["http.method"].string_value == "GET"
    assert attrs["http.response.status_code"].int_value == 200
    assert inbound.status.code != PbStatus.STATUS_CODE_ERROR
    assert outbound.status.code == PbStatus.STATUS_CODE_ERROR  # no response is a failure


def test_base_url_and_full_traces_url_both_reach_v1_traces(
    otlp_receiver: tuple[str, list[tuple[str, str, bytes]]],
) -> None:
    url, bodies = otlp_receiver
    for endpoint in (url + "/", url + "/v1/traces"):
        t = make(ratio=1.0, endpoint=endpoint, batch_delay_ms=50)
        s = span(t, None)
        assert s is not None
        s.end(503)
        t.shutdown()
    exported = exported_spans(bodies)
    assert len(exported) == 2
    for _, s in exported:
        assert s.parent_span_id == b""  # a root: no incoming context
        assert s.status.code == PbStatus.STATUS_CODE_ERROR


# -- RED metrics --------------------------------------------------------------------------------


def record(t: Telemetry, status: int | None, duration_s: float = 0.003, **kw: str) -> None:
    edge = {"source": "web", "destination": "reviews", "destination_version": "v2", **kw}
    t.record(status=status, duration_s=duration_s, **edge)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "2xx"),
        (204, "2xx"),
        (302, "3xx"),
        (404, "4xx"),
        (499, "4xx"),
        (500, "5xx"),
        (503, "5xx"),
        (None, "none"),
        (101, "1xx"),
        (700, "5xx"),  # not a valid status: counted with the failures
    ],
)
def test_status_class(status: int | None, expected: str) -> None:
    assert status_class(status) == expected


def by_class(t: Telemetry) -> dict[str, dict[str, Any]]:
    return {row["status_class"]: row for row in t.snapshot()}


def test_red_counts_and_failure_definition() -> None:
    t = make()
    for status in (200, 200, 201, 404, 429, 500, 503, None, None):
        record(t, status)
    rows = by_class(t)
    assert {c: (r["requests"], r["failures"]) for c, r in rows.items()} == {
        "2xx": (3, 0),
        "4xx": (2, 0),  # client errors are not the destination's failures
        "5xx": (2, 2),
        "none": (2, 2),  # no response arrived
    }
    assert rows["2xx"]["source"] == "web"
    assert rows["2xx"]["destination"] == "reviews"
    assert rows["2xx"]["destination_version"] == "v2"


def test_versions_and_sources_are_separate_series() -> None:
    t = make()
    record(t, 200, destination_version="v1")
    record(t, 200, destination_version="v2")
    record(t, 200, source="cart", destination_version="v2")
    keys = {(r["source"], r["destination_version"]) for r in t.snapshot()}
    assert keys == {("web", "v1"), ("web", "v2"), ("cart", "v2")}


def test_latency_histogram_is_cumulative_with_inclusive_upper_bounds() -> None:
    t = make()
    for duration in (0.0005, 0.001, 0.0011, 0.3, 20.0, -1.0):
        record(t, 200, duration)
    latency = t.snapshot()[0]["latency"]
    assert latency["buckets_ms"] == list(BUCKETS_MS)
    cumulative = dict(zip(BUCKETS_MS, latency["cumulative"], strict=True))
    assert cumulative[1] == 3  # -1 clamps to 0; 0.5 ms; exactly 1 ms is "le 1 ms"
    assert cumulative[2] == 4
    assert cumulative[250] == 4
    assert cumulative[500] == 5
    assert cumulative[10000] == 5  # 20 s lies only in +Inf
    assert latency["count"] == 6
    assert latency["sum_s"] == pytest.approx(0.0005 + 0.001 + 0.0011 + 0.3 + 20.0)


def test_series_count_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_SERIES", 3)
    t = make()
    for i in range(10):
        record(t, 200, source=f"spoofed-{i}")
    record(t, None, source="late")
    rows = t.snapshot()
    assert len(rows) == 5  # 3 real series, then one overflow series per status class
    overflow = [r for r in rows if r["source"] == "_overflow"]
    assert sorted((r["status_class"], r["requests"]) for r in overflow) == [("2xx", 7), ("none", 1)]


# -- Prometheus text ----------------------------------------------------------------------------


def scrape(t: Telemetry) -> dict[str, list[Any]]:
    families = text_string_to_metric_families(t.prometheus_text().decode())
    return {f.name: list(f.samples) for f in families}


def test_prometheus_text_parses_and_matches_the_counts() -> None:
    t = make()
    for status, duration in ((200, 0.0004), (200, 0.02), (503, 0.004), (None, 1.5)):
        record(t, status, duration)
    metrics = scrape(t)

    requests = {s.labels["status_class"]: s.value for s in metrics["mesh_requests"]}
    assert requests == {"2xx": 2, "5xx": 1, "none": 1}
    (failures,) = metrics["mesh_request_failures"]
    assert failures.value == 2
    assert failures.labels == {
        "source": "web",
        "destination": "reviews",
        "destination_version": "v2",
    }

    samples = metrics["mesh_request_duration_seconds"]
    ok = [s for s in samples if s.labels.get("status_class") == "2xx"]
    buckets = {s.labels["le"]: s.value for s in ok if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 1
    assert buckets["0.025"] == 2
    assert buckets["+Inf"] == 2
    assert len(buckets) == len(BUCKETS_MS) + 1
    count = next(s.value for s in ok if s.name.endswith("_count"))
    total = next(s.value for s in ok if s.name.endswith("_sum"))
    assert count == 2
    assert total == pytest.approx(0.0204)

    (info,) = metrics["mesh_agent_info"]
    assert info.labels == {"service": "web", "version": "v1", "namespace": "shop"}


def test_prometheus_text_with_no_traffic_is_valid() -> None:
    metrics = scrape(make())
    assert metrics["mesh_requests"] == []
    assert metrics["mesh_request_duration_seconds"] == []


def test_prometheus_label_values_are_escaped() -> None:
    nasty = 'we"ird\\name\nwith newline'
    t = make()
    # (a source that is not a service name is counted as "other"; the version label is free)
    record(t, 200, destination_version=nasty)
    text = t.prometheus_text().decode()
    assert 'destination_version="we\\"ird\\\\name\\nwith newline"' in text
    (sample,) = scrape(t)["mesh_requests"]
    assert sample.labels["destination_version"] == nasty  # round-trips through a real parser


def test_repeated_exporter_warnings_are_rate_limited() -> None:
    import logging

    from mesh_agent.telemetry import RepeatedLogFilter

    now = [0.0]
    log_filter = RepeatedLogFilter(interval_s=60, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("otel", logging.WARNING, __file__, 1, msg, None, None)

    assert log_filter.filter(record("collector down"))
    for _ in range(30):
        now[0] += 1
        assert not log_filter.filter(record("collector down"))
    assert log_filter.filter(record("another problem"))
    now[0] += 60
    again = record("collector down")
    assert log_filter.filter(again)
    assert "30 more like this suppressed" in again.getMessage()


# -- the real Telemetry behind the real proxy ----------------------------------------------------


def test_real_proxy_traffic_shows_on_metrics_and_in_exported_spans(
    otlp_receiver: tuple[str, list[tuple[str, str, bytes]]],
) -> None:
    """Inbound traffic through the proxy with the production Telemetry (not the fake): the
    edge counts on the admin /metrics, one exported server span per request, and a valid
    traceparent sent on to the app whether the caller sent a valid one, none, or garbage."""
    import httpx

    from mesh_agent.admin import AdminServer

    from .support import Agent, Backend, run

    url, bodies = otlp_receiver
    tel = make(ratio=1.0, endpoint=url, batch_delay_ms=50)
    callers = [
        {"x-mesh-source": "frontend", "traceparent": SAMPLED.decode()},
        {"x-mesh-source": "frontend"},
        {"x-mesh-source": "frontend", "traceparent": "00-zzzz-not-a-traceparent-01"},
        {"x-mesh-source": "checkout", "traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},
    ]

    async def scenario() -> str:
        async with Backend() as app, Agent({}, app=app.address, telemetry=tel) as agent:
            admin = AdminServer(config=agent.store, metrics=tel, bootstrap={})
            _, admin_port = await admin.start("127.0.0.1", 0)
            try:
                async with httpx.AsyncClient(base_url=agent.inbound) as c:
                    for headers in callers:
                        assert (await c.get("/", headers=headers)).status_code == 200
                async with httpx.AsyncClient() as c:
                    metrics = (await c.get(f"http://127.0.0.1:{admin_port}/metrics")).text
            finally:
                await admin.close()
            sent = [parse_traceparent(q.headers["traceparent"].encode()) for q in app.requests]
            assert all(ctx is not None for ctx in sent), sent
            contexts = [ctx for ctx in sent if ctx is not None]
            assert contexts[0].trace_id.decode() == TRACE  # the caller's trace continues
            # none, garbage, or an all-zero trace id: the agent started a trace of its own
            fresh = {ctx.trace_id for ctx in contexts[1:]}
            assert len(fresh) == 3 and TRACE.encode() not in fresh and b"0" * 32 not in fresh
            return metrics

    metrics = run(scenario())
    tel.shutdown()
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = {
        (s.labels["source"], s.labels["status_class"]): s.value
        for s in families["mesh_requests"].samples
        if s.name == "mesh_requests_total"
    }
    assert samples == {("frontend", "2xx"): 3.0, ("checkout", "2xx"): 1.0}
    spans = [s for _, s in exported_spans(bodies)]
    assert len(spans) == 4
    assert all(s.kind == PbSpan.SPAN_KIND_SERVER for s in spans)
    # named and described only once sampled (Telemetry.begin, then Span.describe)
    assert {s.name for s in spans} == {"web inbound"}
    described = {
        s.trace_id.hex(): {a.key: a.value.string_value for a in s.attributes} for s in spans
    }
    assert described[TRACE]["mesh.source"] == "frontend"
    assert described[TRACE]["http.request.method"] == "GET"
    by_trace = {s.trace_id.hex(): s for s in spans}
    assert by_trace[TRACE].parent_span_id.hex() == PARENT
