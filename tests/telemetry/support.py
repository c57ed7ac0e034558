"""Building OTLP requests the way real senders do: spans from the OpenTelemetry SDK, encoded by
the SDK's own OTLP encoder; metric requests in the shape the agent exports."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.telemetry.histogram import LATENCY_BOUNDS_MS, empty, observe
from app.telemetry.ingest import SPAN_COLUMNS, SpanRow

PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


def span_row(fields: dict[str, Any]) -> SpanRow:
    """The row ``ingest.store_spans`` takes, from its columns by name (attributes as a dict)."""
    values = {**fields, "attributes": json.dumps(fields["attributes"], ensure_ascii=False)}
    row: SpanRow = tuple(values[name] for name in SPAN_COLUMNS)  # type: ignore[assignment]
    return row


def sdk_spans(
    service: str = "web", namespace: str = "shop", version: str = "v1", *, error: bool = False
) -> list[ReadableSpan]:
    """A two-span trace (server span with a client child) recorded by the real SDK."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": service, "service.namespace": namespace, "service.version": version}
        )
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span(
        "GET /checkout", kind=trace.SpanKind.SERVER, attributes={"http.request.method": "GET"}
    ) as root:
        with tracer.start_as_current_span("GET /reviews", kind=trace.SpanKind.CLIENT) as child:
            child.set_attribute("http.response.status_code", 503 if error else 200)
            if error:
                child.set_status(trace.Status(trace.StatusCode.ERROR, "upstream failed"))
        root.set_attribute("http.response.status_code", 200)
    provider.shutdown()
    return list(exporter.get_finished_spans())


def trace_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    request: ExportTraceServiceRequest = encode_spans(spans)
    return request


def protobuf_body(spans: Sequence[ReadableSpan]) -> bytes:
    body: bytes = trace_request(spans).SerializeToString()
    return body


def gz(body: bytes) -> bytes:
    return gzip.compress(body)


def _str(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def duration_point(
    *,
    source: str,
    destination: str,
    destination_version: str,
    status_class: str,
    samples_ms: Iterable[float],
    start_ns: int,
    end_ns: int,
    reporter: str = "source",
) -> dict[str, Any]:
    counts = empty()
    samples = list(samples_ms)
    for sample in samples:
        observe(counts, sample)
    return {
        "attributes": [
            _str("mesh.reporter", reporter),
            _str("mesh.source.service", source),
            _str("mesh.destination.service", destination),
            _str("mesh.destination.version", destination_version),
            _str("mesh.status_class", status_class),
        ],
        "startTimeUnixNano": str(start_ns),
        "timeUnixNano": str(end_ns),
        "count": str(len(samples)),
        "sum": float(sum(samples)),
        "bucketCounts": [str(c) for c in counts],
        "explicitBounds": [float(b) for b in LATENCY_BOUNDS_MS],
    }


def metrics_document(
    points: list[dict[str, Any]],
    *,
    service: str = "web",
    namespace: str = "shop",
    version: str = "v1",
    temporality: int = 1,
) -> dict[str, Any]:
    return {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": [
                        _str("service.name", service),
                        _str("service.namespace", namespace),
                        _str("service.version", version),
                    ]
                },
                "scopeMetrics": [
                    {
                        "scope": {"name": "tests"},
                        "metrics": [
                            {
                                "name": "mesh.request.duration",
                                "unit": "ms",
                                "histogram": {
                                    "aggregationTemporality": temporality,
                                    "dataPoints": points,
                                },
                            }
                        ],
                    }
                ],
            }
        ]
    }


def metrics_protobuf(document: dict[str, Any]) -> bytes:
    from google.protobuf import json_format

    message = ExportMetricsServiceRequest()
    json_format.ParseDict(document, message)
    body: bytes = message.SerializeToString()
    return body
