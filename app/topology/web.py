"""HTML of the topology domain: the topology page and the metrics panel of a service page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.catalog import service as catalog
from app.deps import SessionDep, SettingsDep
from app.errors import DomainError
from app.topology import service
from app.topology.api import (
    DNS_NAME,
    FOCUS,
    EdgeCacheDep,
    LayoutsDep,
    TopologyCacheDep,
    WindowQuery,
    later,
)
from app.web import fragment, render, templates

router = APIRouter()

WINDOW_CHOICES = (
    ("1m", "last minute"),
    ("5m", "last 5 minutes"),
    ("1h", "last hour"),
    ("6h", "last 6 hours"),
    ("24h", "last 24 hours"),
)


# ---------------------------------------------------------------------------------------------
# Template filters: figures as people read them
# ---------------------------------------------------------------------------------------------


def format_rps(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0 rps"
    if value < 0.1:
        return f"{value * 60:.1f} rpm"
    return f"{value:.1f} rps" if value < 100 else f"{value:,.0f} rps"


def format_pct(value: float | None, digits: int = 2) -> str:
    """A 0..1 fraction as a percentage; ``—`` when there is none."""
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f} %"


def format_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def sparkline(values: Sequence[float | None], width: int = 160, height: int = 32) -> str:
    """SVG polyline points for ``values`` (gaps where a value is None), scaled to the box."""
    present = [v for v in values if v is not None]
    if len(values) < 2 or not present:
        return ""
    low, high = min(0.0, *present), max(present)
    spread = (high - low) or 1.0
    step = width / (len(values) - 1)
    points = [
        f"{i * step:.1f},{height - 2 - (v - low) / spread * (height - 4):.1f}"
        for i, v in enumerate(values)
        if v is not None
    ]
    return " ".join(points)


def format_figure(value: float | None, kind: str) -> str:
    formats = {"rps": format_rps, "pct": format_pct, "ms": format_ms}
    return formats[kind](value)


templates.env.filters.update(
    rps=format_rps, pct=format_pct, ms=format_ms, figure=format_figure, sparkline=sparkline
)


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


@router.get("/topology")
def topology_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    edge_cache: EdgeCacheDep,
    layouts: LayoutsDep,
    topologies: TopologyCacheDep,
    window: WindowQuery = "5m",
    namespace: Annotated[str, Query(max_length=63, pattern=f"({DNS_NAME})|^$")] = "",
    focus: Annotated[str, Query(max_length=127, pattern=f"({FOCUS})|^$")] = "",
    hops: Annotated[int, Query(ge=1, le=6)] = 1,
    group: Literal["", "namespace", "team"] = "",
    versions: bool = False,
    hide_idle: bool = False,
    hide_healthy: bool = False,
    failing: bool = False,
    table: Literal["", "open", "closed"] = "",
) -> Response:
    filters = {
        "window": window,
        "namespace": namespace,
        "focus": focus,
        "hops": hops,
        "group": group,
        "versions": versions,
        "hide_idle": hide_idle,
        "hide_healthy": hide_healthy,
        "failing": failing,
    }
    query = service.TopologyQuery(
        window=window,
        namespace=namespace or None,
        focus=focus or None,
        hops=hops,
        group=group or None,
        versions=versions,
        hide_idle=hide_idle,
        hide_healthy=hide_healthy,
    )
    error, status_code = None, 200
    graph = None
    try:
        limits = service.thresholds(settings)
        graph = topologies.get(
            (query, limits),
            lambda: service.topology(
                session, query, edge_cache=edge_cache, layouts=layouts, limits=limits
            ),
            later(request, query, edge_cache, layouts, limits),
        ).graph
    except DomainError as exc:
        error, status_code = exc.message, exc.status_code
    context: dict[str, Any] = {
        "section": "topology",
        "filters": filters,
        "graph": graph,
        "labels": {node.id: node.label for node in graph.nodes} if graph else {},
        # Open unless long; a refresh keeps the reader's choice (table=open|closed).
        "table_open": table == "open" or (table == "" and (not graph or len(graph.nodes) <= 60)),
        "error": error,
        "windows": WINDOW_CHOICES,
        "limits": service.thresholds(settings),
    }
    if not request.headers.get("hx-request"):
        context["namespaces"] = catalog.list_namespaces(session)
        context["service_names"] = [
            f"{entry.namespace}/{entry.name}" for entry in service.catalog_entries(session)
        ]
    return render(request, "topology/page.html", context, "table", status_code=status_code)


@router.get("/services/{namespace}/{name}/metrics")
def service_metrics_panel(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    namespace: Annotated[str, Path(max_length=63, pattern=DNS_NAME)],
    name: Annotated[str, Path(max_length=63, pattern=DNS_NAME)],
    window: WindowQuery = "1h",
) -> Response:
    """The golden-metrics panel a service page loads (and reloads) with htmx."""
    metrics = service.service_metrics(
        session,
        namespace,
        name,
        window_name=window,
        by_version=True,
        limits=service.thresholds(settings),
    )
    failing, slowest = service.recent_traces(session, namespace, name, window_name=window)
    context = {
        "m": metrics,
        "failing_traces": failing,
        "slowest_traces": slowest,
        "windows": WINDOW_CHOICES,
        "window": window,
        "panel_url": f"/services/{namespace}/{name}/metrics",
    }
    return fragment(request, "topology/service_metrics.html", "metrics", context)
