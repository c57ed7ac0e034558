"""Real senders against a real receiver over loopback: the OpenTelemetry SDK's own OTLP/HTTP
span exporter, and the agent's metrics exporter (deltas across exports, retry after failure)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import func, select

from app.telemetry import histogram
from app.telemetry.models import EdgeRollup, Span
from mesh_agent import metrics_export
from mesh_agent.metrics_export import MetricsExporter, metrics_url
from mesh_agent.telemetry import Telemetry
from tests.telemetry.conftest import LiveReceiver

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_the_sdk_exporter_delivers_spans(
    live_receiver: LiveReceiver, compression: Compression
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "billing"}))
    exporter = OTLPSpanExporter(
        endpoint=live_receiver.url + "/v1/traces",
        compression=compression,
        headers={"Authorization": "Bearer join-token"},
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("invoice", kind=trace.SpanKind.SERVER),
        tracer.start_as_current_span("db"),
    ):
        pass
    provider.shutdown()
    with live_receiver.database.session(write=False) as session:
        names = set(session.scalars(select(Span.name).where(Span.service == "billing")))
    assert names == {"invoice", "db"}


def test_the_worker_process_refuses_bad_spans_with_the_reason(
    process_receiver: LiveReceiver,
) -> None:
    import urllib.error
    import urllib.request

    from google.rpc.status_pb2 import Status

    request = urllib.request.Request(
        process_receiver.url + "/v1/traces",
        data=b"\x0a\xff\xff\xff\xff\x0fgarbage",
        headers={"Content-Type": "application/x-protobuf"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "protobuf" in Status.FromString(refused.value.read()).message


def rollup_totals(receiver: LiveReceiver) -> dict[tuple[str, str, str], tuple[int, int, list[int]]]:
    """(source, destination, version) → (requests, failures, histogram) at 10 s resolution."""
    totals: dict[tuple[str, str, str], tuple[int, int, list[int]]] = {}
    with receiver.database.session(write=False) as session:
        for row in session.scalars(select(EdgeRollup).where(EdgeRollup.resolution_s == 10)):
            key = (row.source_service, row.dest_service, row.dest_version)
            requests, failures, counts = totals.get(key, (0, 0, histogram.empty()))
            totals[key] = (
                requests + row.requests,
                failures + row.failures,
                histogram.merge([counts, row.latency_counts]),
            )
    return totals


def agent() -> Telemetry:
    return Telemetry(
        service="web", version="v1", namespace="shop", sampling_ratio=0.0, otlp_endpoint=None
    )


def test_two_exports_send_deltas_not_totals(live_receiver: LiveReceiver) -> None:
    telemetry = agent()
    exporter = MetricsExporter(telemetry, live_receiver.url, headers={"Authorization": "Bearer t"})
    for _ in range(3):
        telemetry.record(
            source="web",
            destination="reviews",
            destination_version="v2",
            status=200,
            duration_s=0.004,
        )
    telemetry.record(
        source="web", destination="reviews", destination_version="v2", status=503, duration_s=0.2
    )
    assert exporter.export()
    assert rollup_totals(live_receiver)[("web", "reviews", "v2")][:2] == (4, 1)

    telemetry.record(
        source="web", destination="reviews", destination_version="v2", status=None, duration_s=3.0
    )
    # The inbound side: a meshed caller (counted by its own agent) and one from outside.
    telemetry.record(
        source="gateway", destination="web", destination_version="v1", status=200, duration_s=0.001
    )
    telemetry.record(
        source="unknown", destination="web", destination_version="v1", status=200, duration_s=0.001
    )
    assert exporter.export()
    assert exporter.export()  # nothing new: nothing sent, nothing added
    totals = rollup_totals(live_receiver)
    requests, failures, counts = totals[("web", "reviews", "v2")]
    assert (requests, failures) == (5, 2)
    assert counts[histogram.LATENCY_BOUNDS_MS.index(5)] == 3  # the three 4 ms requests
    assert ("gateway", "web", "v1") not in totals  # gateway's agent reports that edge
    assert totals[("", "web", "v1")][:2] == (1, 0)
    assert exporter.exports == 2


def test_a_failed_export_is_sent_with_the_next_one(live_receiver: LiveReceiver) -> None:
    telemetry = agent()
    down = {"on": True}

    def flaky(url: str, body: bytes, headers: object, timeout: float) -> int | None:
        if down["on"]:
            return metrics_export._post(
                "http://127.0.0.1:9/v1/metrics", body, {}, timeout
            )  # discard port: refused
        return metrics_export._post(url, body, headers, timeout)  # type: ignore[arg-type]

    exporter = MetricsExporter(telemetry, live_receiver.url + "/v1/traces", post=flaky)
    assert exporter.url == live_receiver.url + "/v1/metrics"
    telemetry.record(
        source="web", destination="ratings", destination_version="v1", status=200, duration_s=0.01
    )
    assert not exporter.export()
    assert exporter.failures == 1
    assert rollup_totals(live_receiver) == {}

    telemetry.record(
        source="web", destination="ratings", destination_version="v1", status=200, duration_s=0.01
    )
    down["on"] = False
    assert exporter.export()
    assert rollup_totals(live_receiver)[("web", "ratings", "v1")][0] == 2


def test_a_refused_delta_is_dropped_not_retried_forever() -> None:
    telemetry = agent()
    calls: list[bytes] = []

    def refuse(url: str, body: bytes, headers: object, timeout: float) -> int:
        calls.append(body)
        return 400

    exporter = MetricsExporter(telemetry, "http://cp:8000", post=refuse)
    telemetry.record(
        source="web", destination="x", destination_version="v1", status=200, duration_s=0.01
    )
    assert not exporter.export()
    assert exporter.export()  # nothing pending any more
    assert len(calls) == 1 and exporter.dropped_points == 1


def test_metrics_url() -> None:
    assert metrics_url("http://cp:8000") == "http://cp:8000/v1/metrics"
    assert metrics_url("http://cp:8000/") == "http://cp:8000/v1/metrics"
    assert metrics_url("https://cp/otlp/v1/traces") == "https://cp/otlp/v1/metrics"


def test_the_receiver_throttles_but_the_exporter_keeps_the_delta(
    live_receiver: LiveReceiver,
) -> None:
    telemetry = agent()
    statuses: list[int | None] = []

    def throttled(url: str, body: bytes, headers: object, timeout: float) -> int | None:
        status = 429 if not statuses else metrics_export._post(url, body, headers, timeout)  # type: ignore[arg-type]
        statuses.append(status)
        return status

    exporter = MetricsExporter(telemetry, live_receiver.url, post=throttled)
    telemetry.record(
        source="web", destination="cart", destination_version="v1", status=200, duration_s=0.01
    )
    assert not exporter.export()
    assert exporter.export()
    assert statuses == [429, 200]
    with live_receiver.database.session(write=False) as session:
        assert (
            session.scalar(
                select(func.sum(EdgeRollup.requests)).where(EdgeRollup.resolution_s == 10)
            )
            == 1
        )


def test_agent_flags_for_metrics_export() -> None:
    from mesh_agent.__main__ import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "--service",
            "web",
            "--otlp-endpoint",
            "http://cp:8000",
            "--otlp-header",
            "Authorization=Bearer s3cret",
        ]
    )
    assert args.metrics_interval == 5.0
    assert dict(args.otlp_header) == {"Authorization": "Bearer s3cret"}
    assert parser.parse_args(["--service", "web", "--metrics-interval", "0"]).metrics_interval == 0
    for bad in (["--otlp-header", "no-equals"], ["--metrics-interval", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--service", "web", *bad])
        assert exit_info.value.code == 2


def test_concurrent_metric_posts_add_up_exactly(live_receiver: LiveReceiver) -> None:
    """Six agents post ten exports each at once over HTTP: the group-committing writer loses
    and doubles nothing."""
    import threading

    errors: list[BaseException] = []

    def run_agent(n: int) -> None:
        try:
            telemetry = agent()
            exporter = MetricsExporter(
                telemetry, live_receiver.url, headers={"Authorization": f"Bearer agent-{n}"}
            )
            for _ in range(10):
                for status in (200, 200, 503):
                    telemetry.record(
                        source="web",
                        destination="reviews",
                        destination_version="v2",
                        status=status,
                        duration_s=0.003,
                    )
                assert exporter.export()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_agent, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    requests, failures, counts = rollup_totals(live_receiver)[("web", "reviews", "v2")]
    assert (requests, failures) == (180, 60)
    assert counts[histogram.LATENCY_BOUNDS_MS.index(5)] == 180


def test_a_backlog_older_than_the_limit_is_dropped_not_sent() -> None:
    telemetry = agent()
    now = [0]
    posted: list[bytes] = []

    def down(url: str, body: bytes, headers: object, timeout: float) -> None:
        posted.append(body)
        return None

    exporter = MetricsExporter(
        telemetry, "http://cp:8000", post=down, max_backlog_s=60, clock_ns=lambda: now[0]
    )
    telemetry.record(
        source="web", destination="x", destination_version="v1", status=200, duration_s=0.01
    )
    assert not exporter.export()  # failed: kept
    now[0] = 30 * 10**9
    assert not exporter.export()  # failed again: still kept, sent again
    now[0] = 61 * 10**9
    assert not exporter.export()  # too old now: dropped without a send
    assert (len(posted), exporter.dropped_points) == (2, 1)
    assert exporter.export()  # nothing left
