"""OTLP/HTTP receiver (``/v1/traces``, ``/v1/metrics``) and the traces JSON API.

The receiver's routes are async so that the guards, reading the body and waiting for the
store cost no thread; decoding and writing happen in ingest's own workers (``receiver``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response
from google.protobuf import json_format
from google.rpc.status_pb2 import Status

from app import metrics
from app.deps import SessionDep
from app.telemetry import otlp, traces
from app.telemetry.receiver import Receiver
from app.telemetry.schemas import TraceList, TraceRead
from app.telemetry.throttle import ClientRateLimiter

__all__ = ["receive", "receiver", "receiver_for", "require_ingest_auth", "router"]

Signal = Literal["traces", "metrics"]
TRACE_ID_PATTERN = r"^[0-9a-fA-F]{32}$"
DEFAULT_LOOKBACK = timedelta(hours=1)
# The route-level cap only lifts the console's 1 MiB default; MESH_OTLP_MAX_BYTES is enforced
# while the body streams in (and again after gunzip).
_ROUTE_BODY_CEILING = 1 << 30


async def require_ingest_auth(request: Request) -> None:
    """Who may send telemetry: holders of the mesh join token (``Authorization: Bearer …``),
    as agents send it; an OpenTelemetry SDK or Collector sets the same header
    (``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token>``). Anything else is 401."""
    from app.agents.api import require_agent_token

    if request.app.state.settings.otlp_require_token:
        await require_agent_token(request, request.app.state.hub)


receiver = APIRouter(tags=["otlp"], dependencies=[Depends(require_ingest_auth)])
router = APIRouter(prefix="/api/v1/traces", tags=["traces"])

_OTLP_DOC = (
    "OTLP/HTTP export request, `application/x-protobuf` or `application/json` (OTLP JSON: hex "
    "ids), optionally `Content-Encoding: gzip`. 400: not a valid request (nothing stored); "
    "413: larger than MESH_OTLP_MAX_BYTES before or after gunzip; 415: other content type or "
    "encoding; 429: this client sends too fast (see Retry-After); 503: ingest is saturated."
)


@receiver.post(
    "/v1/traces",
    summary="Receive spans (OTLP/HTTP)",
    description=_OTLP_DOC,
    max_body_size=_ROUTE_BODY_CEILING,
    response_class=Response,
)
async def export_traces(request: Request) -> Response:
    return await receive(request, "traces")


@receiver.post(
    "/v1/metrics",
    summary="Receive RED metrics (OTLP/HTTP, mesh.request.duration delta histograms)",
    description=_OTLP_DOC + " See docs/telemetry.md for the metric and its attributes.",
    max_body_size=_ROUTE_BODY_CEILING,
    response_class=Response,
)
async def export_metrics(request: Request) -> Response:
    return await receive(request, "metrics")


def receiver_for(request: Request) -> Receiver:
    """The app's receiver (made at start-up; made here for an app run without its lifespan)."""
    found: Receiver | None = getattr(request.app.state, "otlp_receiver", None)
    if found is None:  # on the event loop thread: no race
        found = Receiver(request.app.state.database, request.app.state.settings)
        request.app.state.otlp_receiver = found
    return found


async def receive(request: Request, signal: Signal) -> Response:
    """One OTLP export request, answered: the routes' handler and the ASGI fast path's
    (:mod:`app.telemetry.asgi`), after the join-token check."""
    receiver = receiver_for(request)
    settings = receiver.settings
    key = ClientRateLimiter.client_key(
        request.headers.get("authorization"),
        request.client.host if request.client else None,
        request.headers.get("x-mesh-agent"),
    )
    wait = receiver.limiter.acquire(key)
    if wait > 0:
        metrics.OTLP_REJECTED.labels(signal, "rate_limited").inc()
        return _error(
            None,
            429,
            "too many requests from this client; retry later",
            {"Retry-After": ClientRateLimiter.retry_after(wait)},
        )
    encoding: otlp.Encoding | None = None
    try:
        encoding = otlp.media_type(request.headers.get("content-type"))
        body = await _read_body(request, settings.otlp_max_bytes)
        if receiver.slots.full:
            metrics.OTLP_REJECTED.labels(signal, "busy").inc()
            return _error(encoding, 503, "ingest is saturated; retry later", {"Retry-After": "1"})
        content_encoding = request.headers.get("content-encoding")
        store = receiver.store_traces if signal == "traces" else receiver.store_metrics
        content = await store(body, encoding, content_encoding)
    except otlp.OtlpError as exc:
        metrics.OTLP_REJECTED.labels(signal, exc.reason).inc()
        return _error(encoding, exc.status, exc.message)
    return Response(content, media_type=encoding)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise otlp.OtlpError(413, f"body larger than {max_bytes} bytes", "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise otlp.OtlpError(413, f"body larger than {max_bytes} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(
    encoding: otlp.Encoding | None,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """OTLP's error body: a google.rpc.Status in the request's encoding (JSON when unknown)."""
    if encoding == otlp.PROTOBUF:
        body = Status(code=_GRPC_CODES.get(status, 2), message=message).SerializeToString()
        return Response(body, status_code=status, media_type=otlp.PROTOBUF, headers=headers)
    status_message = Status(code=_GRPC_CODES.get(status, 2), message=message)
    return Response(
        json_format.MessageToJson(status_message, indent=None),
        status_code=status,
        media_type=otlp.JSON,
        headers=headers,
    )


# HTTP status → gRPC code, for the Status body (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, …).
_GRPC_CODES = {400: 3, 413: 8, 415: 3, 429: 8, 503: 14}


# ---------------------------------------------------------------------------------------------
# Traces API


@router.get("", response_model=TraceList, summary="Search traces, newest first")
def list_traces(
    session: SessionDep,
    service: Annotated[
        str | None, Query(max_length=63, description="A span of this service")
    ] = None,
    operation: Annotated[
        str | None, Query(max_length=255, description="A span with this name")
    ] = None,
    error: Annotated[
        bool | None, Query(description="true: a matching span failed; false: one succeeded")
    ] = None,
    min_duration_ms: Annotated[
        float | None, Query(ge=0, description="A matching span took at least this long")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="Inclusive, ISO 8601; default one hour ago")
    ] = None,
    until: Annotated[datetime | None, Query(description="Exclusive, ISO 8601")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> TraceList:
    items = traces.search_traces(
        session,
        service=service or None,
        operation=operation or None,
        error=error,
        min_duration_ms=min_duration_ms,
        since=_aware(since) or datetime.now(UTC) - DEFAULT_LOOKBACK,
        until=_aware(until),
        limit=limit,
    )
    return TraceList(items=items, limit=limit)


@router.get(
    "/{trace_id}",
    response_model=TraceRead,
    summary="All spans of one trace",
    responses={404: {"description": "No span of this trace is stored"}},
)
def read_trace(
    session: SessionDep,
    trace_id: Annotated[str, Path(pattern=TRACE_ID_PATTERN, description="32 hex digits")],
) -> TraceRead:
    trace = traces.get_trace(session, trace_id)
    if trace is None:
        raise HTTPException(404, f"no trace {trace_id.lower()} is stored")
    return trace


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
