"""The control plane's own Prometheus metrics, served at ``GET /metrics``.

One registry of our own rather than prometheus_client's global one: tests create many apps in
one process, and the global registry would refuse the second registration of a name. Other
domains register their counters on :data:`REGISTRY` here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

__all__ = [
    "INGEST_SECONDS",
    "METRIC_POINTS_RECEIVED",
    "METRIC_POINTS_STORED",
    "OTLP_REJECTED",
    "PRUNED_ROWS",
    "REGISTRY",
    "SPANS_RECEIVED",
    "SPANS_STORED",
    "router",
]

REGISTRY = CollectorRegistry(auto_describe=True)

SPANS_RECEIVED = Counter(
    "mesh_telemetry_spans_received",
    "Spans in OTLP requests that decoded.",
    registry=REGISTRY,
)
SPANS_STORED = Counter(
    "mesh_telemetry_spans_stored",
    "Spans written (a span sent twice is written once).",
    registry=REGISTRY,
)
METRIC_POINTS_RECEIVED = Counter(
    "mesh_telemetry_metric_points_received",
    "OTLP metric data points in requests that decoded.",
    registry=REGISTRY,
)
METRIC_POINTS_STORED = Counter(
    "mesh_telemetry_metric_points_stored",
    "mesh.request.duration data points added to the edge rollups.",
    registry=REGISTRY,
)
OTLP_REJECTED = Counter(
    "mesh_telemetry_rejected_requests",
    "OTLP requests refused, by signal and reason.",
    ["signal", "reason"],
    registry=REGISTRY,
)
PRUNED_ROWS = Counter(
    "mesh_telemetry_pruned_rows",
    "Rows deleted by retention, by table and rule.",
    ["table", "rule"],
    registry=REGISTRY,
)
INGEST_SECONDS = Histogram(
    "mesh_telemetry_ingest_seconds",
    "Time to decode and store one OTLP request, by signal.",
    ["signal"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    text = generate_latest(REGISTRY)
    hub = getattr(request.app.state, "hub", None)
    if hub is not None:  # the push path's metrics live on the hub (one set per app)
        text += hub.metrics.exposition(hub)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
