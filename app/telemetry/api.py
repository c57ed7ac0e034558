"""OTLP/HTTP receiver (``/v1/traces``, ``/v1/metrics``) and the traces JSON API.

The receiver's routes are async so that the guards, reading the body and waiting for the
store cost no thread; decoding and writing happen in ingest's own workers (``receiver``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from starlette.datastructures import State

from app import metrics
from app.deps import SessionDep
from app.telemetry import otlp, traces
from app.telemetry.receiver import Receiver
from app.telemetry.schemas import TraceList, TraceRead
from app.telemetry.throttle import ClientRateLimiter

__all__ = [
    "answer",
    "check_ingest_auth",
    "receive",
    "receiver",
    "receiver_for",
    "receiver_of",
    "require_ingest_auth",
    "router",
]

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
    await check_ingest_auth(
        request.app.state,
        request.headers.get("authorization", ""),
        request.client.host if request.client else None,
    )


async def check_ingest_auth(state: State, authorization: str, client: str | None) -> None:
    """:func:`require_ingest_auth` without a Request; raises the 401 (a DomainError)."""
    from app.agents.api import agent_token_namespace

    if state.settings.otlp_require_token:
        await agent_token_namespace(state.hub, state, authorization, client)


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
    return receiver_of(request.app.state)


def receiver_of(state: State) -> Receiver:
    found: Receiver | None = getattr(state, "otlp_receiver", None)
    if found is None:  # on the event loop thread: no race
        found = state.otlp_receiver = Receiver(state.database, state.settings)
    return found


# (status, body, content type, extra headers): an answer to an export, for the route to wrap in
# a Response and for the ASGI path (app.telemetry.asgi) to send as it is.
Answer = tuple[int, bytes, str, dict[str, str] | None]


async def receive(request: Request, signal: Signal) -> Response:
    """One OTLP export request, answered by the FastAPI routes (after the join-token check)."""
    status, content, media, headers = await answer(
        receiver_for(request),
        signal,
        request.headers,
        request.client.host if request.client else None,
        request.stream(),
    )
    return Response(content, status_code=status, media_type=media, headers=headers)


async def answer(
    receiver: Receiver,
    signal: Signal,
    headers: Mapping[str, str],
    client: str | None,
    body: AsyncIterator[bytes],
) -> Answer:
    """One OTLP export, answered: the routes' handler and the ASGI path's. ``headers`` maps
    lower-case names; ``body`` yields the body's chunks as they arrive (it is not read past
    MESH_OTLP_MAX_BYTES)."""
    settings = receiver.settings
    key = ClientRateLimiter.client_key(
        headers.get("authorization"), client, headers.get("x-mesh-agent")
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
        encoding = otlp.media_type(headers.get("content-type"))
        data = await _read_body(headers.get("content-length"), body, settings.otlp_max_bytes)
        if receiver.slots.full:
            metrics.OTLP_REJECTED.labels(signal, "busy").inc()
            return _error(encoding, 503, "ingest is saturated; retry later", {"Retry-After": "1"})
        content_encoding = headers.get("content-encoding")
        store = receiver.store_traces if signal == "traces" else receiver.store_metrics
        content = await store(data, encoding, content_encoding)
    except otlp.OtlpError as exc:
        metrics.OTLP_REJECTED.labels(signal, exc.reason).inc()
        return _error(encoding, exc.status, exc.message)
    return 200, content, encoding, None


async def _read_body(declared: str | None, body: AsyncIterator[bytes], max_bytes: int) -> bytes:
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise otlp.OtlpError(413, f"body larger than {max_bytes} bytes", "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > max_bytes:
            raise otlp.OtlpError(413, f"body larger than {max_bytes} bytes", "too_large")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _error(
    encoding: otlp.Encoding | None,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> Answer:
    """OTLP's error body: a google.rpc.Status in the request's encoding (JSON when unknown)."""
    status_message = Status(code=_GRPC_CODES.get(status, 2), message=message)
    if encoding == otlp.PROTOBUF:
        return status, status_message.SerializeToString(), otlp.PROTOBUF, headers
    body = json_format.MessageToJson(status_message, indent=None).encode()
    return status, body, otlp.JSON, headers


def error_answer(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    """An OTLP error body (JSON) for a failure outside :func:`answer` (the ASGI path's 500 and
    503 for an unavailable database)."""
    return _error(None, status, message, headers)


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
