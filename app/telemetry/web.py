"""HTML routes of traces: the search page (htmx partial results) and the waterfall of one trace."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response

from app.deps import SessionDep
from app.telemetry import traces
from app.telemetry.api import TRACE_ID_PATTERN
from app.web import clean_url, is_htmx, render

router = APIRouter()

RANGES: dict[str, tuple[str, timedelta]] = {
    "15m": ("Last 15 minutes", timedelta(minutes=15)),
    "1h": ("Last hour", timedelta(hours=1)),
    "6h": ("Last 6 hours", timedelta(hours=6)),
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "3d": ("Last 3 days", timedelta(days=3)),
}
PAGE_LIMIT = 50
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


@router.get("/traces")
def traces_page(
    request: Request,
    session: SessionDep,
    service: Annotated[str, Query(max_length=63)] = "",
    operation: Annotated[str, Query(max_length=255)] = "",
    errors: Annotated[str, Query(max_length=5)] = "",
    min_duration_ms: Annotated[str, Query(max_length=12)] = "",
    range: Annotated[str, Query(max_length=4)] = "1h",
) -> Response:
    problems: dict[str, str] = {}
    min_ms: float | None = None
    if min_duration_ms.strip():
        if _NUMBER.match(min_duration_ms.strip()):
            min_ms = float(min_duration_ms)
        else:
            problems["min_duration_ms"] = "a number of milliseconds, e.g. 250"
    if range not in RANGES:
        problems["range"] = "pick one of the offered ranges"
    lookback = RANGES.get(range, RANGES["1h"])[1]
    items = (
        []
        if problems
        else traces.search_traces(
            session,
            service=service.strip() or None,
            operation=operation.strip() or None,
            error=True if errors in ("1", "on", "true") else None,
            min_duration_ms=min_ms,
            since=datetime.now(UTC) - lookback,
            limit=PAGE_LIMIT,
        )
    )
    filters = {
        "service": service,
        "operation": operation,
        "errors": errors in ("1", "on", "true"),
        "min_duration_ms": min_duration_ms,
        "range": range if range in RANGES else "1h",
    }
    context = {
        "section": "traces",
        "items": items,
        "filters": filters,
        "filtered": any(
            [service, operation, filters["errors"], min_duration_ms, filters["range"] != "1h"]
        ),
        "problems": problems,
        "ranges": RANGES,
        "limit": PAGE_LIMIT,
        "colour": traces.service_colour,
    }
    response = render(
        request,
        "traces/list.html",
        context,
        block_name="results",
        status_code=422 if problems else 200,
    )
    if is_htmx(request):
        response.headers["HX-Push-Url"] = clean_url(request)
    return response


@router.get("/traces/{trace_id}")
def trace_page(
    request: Request,
    session: SessionDep,
    trace_id: Annotated[str, Path(pattern=TRACE_ID_PATTERN)],
) -> Response:
    trace = traces.get_trace(session, trace_id)
    if trace is None:
        raise HTTPException(404, "No span of this trace is stored (it may have been pruned).")
    rows, total_ms = traces.waterfall(trace.spans)
    ticks = [round(total_ms * i / 4, 3) for i in range(5)]
    return render(
        request,
        "traces/detail.html",
        {
            "section": "traces",
            "trace": trace,
            "rows": rows,
            "total_ms": total_ms,
            "ticks": ticks,
            "skewed": sum(1 for r in rows if r.clamped),
            "truncated": len(trace.spans) >= traces.MAX_SPANS_PER_TRACE,
        },
    )
