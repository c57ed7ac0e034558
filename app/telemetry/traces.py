"""Reading traces back: search (one summary per trace), one whole trace, and its waterfall."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from app.telemetry.models import Span
from app.telemetry.schemas import SpanRead, TraceRead, TraceSummary

__all__ = [
    "KIND_NAMES",
    "WaterfallRow",
    "get_trace",
    "search_traces",
    "service_colour",
    "waterfall",
]

KIND_NAMES = ("unspecified", "internal", "server", "client", "producer", "consumer")
# A trace page never loads more than this many spans (a runaway trace must not take the console).
MAX_SPANS_PER_TRACE = 5_000
SERVICE_COLOURS = 8


def search_traces(
    session: Session,
    *,
    service: str | None = None,
    operation: str | None = None,
    error: bool | None = None,
    min_duration_ms: float | None = None,
    since: datetime,
    until: datetime | None = None,
    limit: int = 20,
) -> list[TraceSummary]:
    """Traces with at least one span matching every given filter, newest first.

    The filters apply to single spans (as in Jaeger): ``service=reviews&error=true`` finds
    traces in which a span of reviews failed, not traces that failed somewhere and touched
    reviews elsewhere.
    """
    since_ns = _ns(since)
    conditions = [Span.start_ns >= since_ns]
    if until is not None:
        conditions.append(Span.start_ns < _ns(until))
    if service:
        conditions.append(Span.service == service)
    if operation:
        conditions.append(Span.name == operation)
    if error is not None:
        conditions.append(Span.error.is_(error))
    if min_duration_ms is not None:
        conditions.append(Span.duration_ms >= min_duration_ms)
    latest = func.max(Span.start_ns).label("latest")
    trace_ids = list(
        session.scalars(
            select(Span.trace_id)
            .where(*conditions)
            .group_by(Span.trace_id)
            .order_by(desc(latest))
            .limit(limit)
        )
    )
    if not trace_ids:
        return []
    rows = session.execute(
        select(
            Span.trace_id,
            Span.span_id,
            Span.parent_span_id,
            Span.name,
            Span.service,
            Span.start_ns,
            Span.end_ns,
            Span.error,
        ).where(Span.trace_id.in_(trace_ids))
    ).all()
    by_trace: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_trace[row.trace_id].append(row)
    summaries = [_summary(trace_id, by_trace[trace_id]) for trace_id in trace_ids]
    summaries.sort(key=lambda s: s.start, reverse=True)
    return summaries


def get_trace(session: Session, trace_id: str) -> TraceRead | None:
    spans = session.scalars(
        select(Span)
        .where(Span.trace_id == trace_id.lower())
        .order_by(Span.start_ns, Span.id)
        .limit(MAX_SPANS_PER_TRACE)
    ).all()
    if not spans:
        return None
    summary = _summary(trace_id.lower(), spans)
    return TraceRead(
        trace_id=summary.trace_id,
        spans=[_span_read(span) for span in spans],
        services=summary.services,
        span_count=summary.span_count,
        error=summary.error,
        duration_ms=summary.duration_ms,
        start=summary.start,
    )


def _span_read(span: Span) -> SpanRead:
    return SpanRead(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        name=span.name,
        kind=KIND_NAMES[span.kind] if 0 <= span.kind < len(KIND_NAMES) else "unspecified",
        service=span.service,
        namespace=span.namespace,
        version=span.version,
        start=_datetime(span.start_ns),
        start_ns=span.start_ns,
        end_ns=span.end_ns,
        duration_ms=span.duration_ms,
        http_status=span.http_status,
        error=span.error,
        attributes=span.attributes or {},
    )


def _summary(trace_id: str, spans: Sequence[Any]) -> TraceSummary:
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
    root = min(roots or spans, key=lambda s: s.start_ns)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    errors = sum(1 for s in spans if s.error)
    return TraceSummary(
        trace_id=trace_id,
        root_name=root.name,
        root_service=root.service,
        services=sorted({s.service for s in spans}),
        span_count=len(spans),
        error_count=errors,
        error=errors > 0,
        duration_ms=max(0, end - start) / 1e6,
        start=_datetime(start),
    )


# ---------------------------------------------------------------------------------------------
# Waterfall


@dataclass(frozen=True)
class WaterfallRow:
    span: SpanRead
    depth: int
    offset_pct: float
    width_pct: float
    # The span was drawn inside its parent because the sender's clock put it outside.
    clamped: bool
    # The span names a parent that is not in the trace (not received, or pruned).
    orphan: bool
    colour: int


def service_colour(service: str) -> int:
    """A stable palette index per service name (same service, same colour on every page)."""
    return sum(service.encode()) % SERVICE_COLOURS


def waterfall(spans: Sequence[SpanRead]) -> tuple[list[WaterfallRow], float]:
    """Rows in depth-first order (children under their parent, by start) and the total ms.

    Clock skew between hosts can put a child before its parent's start or after its end; such
    a child is drawn clamped into its parent's bar and flagged, so no bar gets a negative
    offset or width. Durations shown in text stay the ones the sender measured.
    """
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRead]] = defaultdict(list)
    roots: list[SpanRead] = []
    for span in spans:
        parent = span.parent_span_id
        if parent and parent in by_id and parent != span.span_id:
            children[parent].append(span)
        else:
            roots.append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: s.start_ns)
    roots.sort(key=lambda s: s.start_ns)

    placed: list[tuple[SpanRead, int, int, int, bool]] = []
    seen: set[str] = set()
    stack: list[tuple[SpanRead, int, int | None, int | None]] = [
        (root, 0, None, None) for root in reversed(roots)
    ]
    while stack:
        span, depth, low, high = stack.pop()
        if span.span_id in seen:  # a cycle of parent ids must not loop forever
            continue
        seen.add(span.span_id)
        start, end = span.start_ns, max(span.start_ns, span.end_ns)
        clamped = span.end_ns < span.start_ns
        if low is not None and high is not None:
            if start < low or end > high:
                clamped = True
            start = min(max(start, low), high)
            end = min(max(end, start), high)
        placed.append((span, depth, start, end, clamped))
        for child in reversed(children.get(span.span_id, [])):
            stack.append((child, depth + 1, start, end))

    if not placed:
        return [], 0.0
    t0 = min(p[2] for p in placed)
    t1 = max(p[3] for p in placed)
    total = max(t1 - t0, 1)
    rows = [
        WaterfallRow(
            span=span,
            depth=depth,
            offset_pct=round((start - t0) * 100 / total, 3),
            width_pct=round(max((end - start) * 100 / total, 0.25), 3),
            clamped=clamped,
            orphan=bool(span.parent_span_id) and span.parent_span_id not in by_id,
            colour=service_colour(span.service),
        )
        for span, depth, start, end, clamped in placed
    ]
    return rows, (t1 - t0) / 1e6


_INT64 = 2**63 - 1


def _ns(value: datetime) -> int:
    # Clamped: a date past 2262 is beyond what a 64-bit nanosecond column holds.
    return max(-_INT64, min(_INT64, int(value.timestamp() * 1_000_000) * 1000))


def _datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)
