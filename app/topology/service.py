"""What the traffic looks like: the topology graph and the golden metrics of a service.

Read-only: nothing here writes, so nothing here audits. The JSON API and the HTML pages both
call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast
from urllib.parse import quote, urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog.models import Service
from app.config import Settings
from app.errors import DomainError, NotFoundError
from app.telemetry import read
from app.telemetry.models import Span
from app.telemetry.read import EdgeWindowCache, Figures, Window
from app.topology import schemas, stages
from app.topology.layout import LayoutCache
from app.topology.stages import CatalogEntry, GraphInputs, GraphOptions, GroupBy, Thresholds

__all__ = [
    "InvalidParameterError",
    "TopologyQuery",
    "catalog_entries",
    "health_by_service",
    "recent_traces",
    "service_metrics",
    "thresholds",
    "topology",
]


class InvalidParameterError(DomainError):
    status_code = 422


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        degraded=settings.health_degraded_error_pct / 100,
        failing=settings.health_failing_error_pct / 100,
    )


@dataclass(frozen=True)
class TopologyQuery:
    window: str = "5m"
    namespace: str | None = None
    focus: str | None = None
    """``name`` or ``namespace/name``."""
    hops: int = 1
    group: GroupBy | None = None
    versions: bool = False
    hide_idle: bool = False
    hide_healthy: bool = False


def _window_read(window: Window) -> schemas.WindowRead:
    return schemas.WindowRead(
        name=cast(schemas.WindowName, window.name),
        resolution_s=window.resolution_s,
        start=window.start,
        end=window.now,
    )


def catalog_entries(session: Session) -> list[CatalogEntry]:
    """Every catalog service with its owner team, by namespace and name."""
    rows = session.execute(
        select(Service.namespace, Service.name, Service.owner_team).order_by(
            Service.namespace, Service.name
        )
    )
    return [CatalogEntry(ns, name, team) for ns, name, team in rows]


def _resolve_focus(
    focus: str,
    namespace: str | None,
    catalog: Sequence[CatalogEntry],
    edges: dict[read.EdgeKey, Figures],
) -> tuple[str, str]:
    """``(namespace, name)`` of the focused service: in the catalog or seen in the traffic."""
    known = {(entry.namespace, entry.name) for entry in catalog}
    for key in edges:
        known.add((key.dest_namespace, key.dest_service))
        if key.source_service:
            known.add((key.source_namespace, key.source_service))
    if "/" in focus:
        ns, _, name = focus.partition("/")
        candidates = [(ns, name)] if (ns, name) in known else []
    else:
        candidates = sorted(
            (ns, name)
            for ns, name in known
            if name == focus and (namespace is None or ns == namespace)
        )
    if not candidates:
        raise NotFoundError(f"no service {focus!r} in the catalog or the traffic", field="focus")
    if len(candidates) > 1:
        where = ", ".join(f"{ns}/{name}" for ns, name in candidates)
        raise InvalidParameterError(
            f"several services are called {focus!r} ({where}); write namespace/name",
            field="focus",
        )
    return candidates[0]


@lru_cache(maxsize=4096)
def _quoted(name: str) -> str:
    return quote(name, safe="")


def _node_url(data: dict[str, Any]) -> str | None:
    if data["kind"] == "service":
        return f"/services/{_quoted(data['namespace'])}/{_quoted(data['service'])}"
    if data["kind"] == "group" and data["namespace"]:
        return "/topology?" + urlencode({"namespace": data["namespace"]})
    if data["kind"] == "group" and data["team"]:
        return "/services?" + urlencode({"team": data["team"]})
    return None


def topology(
    session: Session,
    query: TopologyQuery,
    *,
    edge_cache: EdgeWindowCache,
    layouts: LayoutCache,
    limits: Thresholds,
    now: datetime | None = None,
) -> schemas.Topology:
    window = read.window_for(query.window, now)
    edges, covered = edge_cache.edges(session, window, namespace=query.namespace)
    catalog = catalog_entries(session)
    focus = _resolve_focus(query.focus, query.namespace, catalog, edges) if query.focus else None
    options = GraphOptions(
        versions=query.versions,
        hide_idle=query.hide_idle,
        hide_healthy=query.hide_healthy,
        focus=focus,
        hops=query.hops,
        group=query.group,
        thresholds=limits,
        namespace=query.namespace,
    )
    graph = stages.build(GraphInputs(edges, catalog), options)
    positions = layouts.get(graph.nodes, graph.edges)
    elapsed = covered.elapsed_s

    # Plain dicts validated in one call: pydantic-core builds the 1,200 nested models far
    # faster than Python constructors would.
    nodes: list[dict[str, Any]] = []
    for node, data in graph.nodes(data=True):
        main: Figures = data["inbound"] if data["inbound"].requests else data["outbound"]
        x, y = positions[node]
        nodes.append(
            {
                "id": node,
                "kind": data["kind"],
                "label": data["label"],
                "namespace": data["namespace"],
                "service": data["service"],
                "version": data["version"],
                "team": data["team"],
                "health": data["health"],
                "members": data["members"],
                "metrics": schemas.golden_dict(main.golden(elapsed)),
                "on_failing_path": data["on_failing_path"],
                "x": x,
                "y": y,
                "url": _node_url(data),
            }
        )
    edge_list: list[dict[str, Any]] = []
    for source, dest, data in graph.edges(data=True):
        figures: Figures = data["figures"]
        rate = figures.error_rate
        dest_data = graph.nodes[dest]
        traces_url = (
            "/traces?service=" + _quoted(dest_data["service"])
            if dest_data["kind"] == "service"
            else None
        )
        edge_list.append(
            {
                "id": f"{source}->{dest}",
                "source": source,
                "target": dest,
                "health": data["health"],
                "error_pct": None if rate is None else round(rate * 100, 4),
                "metrics": schemas.golden_dict(figures.golden(elapsed)),
                "on_failing_path": data["on_failing_path"],
                "traces_url": traces_url,
            }
        )
    nodes.sort(key=lambda n: str(n["id"]))
    edge_list.sort(key=lambda e: str(e["id"]))
    return schemas.Topology.model_validate(
        {"window": _window_read(covered), "nodes": nodes, "edges": edge_list}
    )


# ---------------------------------------------------------------------------------------------
# One service
# ---------------------------------------------------------------------------------------------


def _series(window: Window, buckets: list[Figures]) -> schemas.SeriesRead:
    t, rps, success, p50, p95, p99 = [], [], [], [], [], []
    for start, figures in zip(window.buckets, buckets, strict=True):
        # The last bucket is still filling: its rate is over the part that has passed.
        span = min(float(window.resolution_s), max((window.now - start).total_seconds(), 1.0))
        golden = schemas.GoldenRead.of(figures.golden(span))
        t.append(start)
        rps.append(golden.rps)
        success.append(golden.success_rate)
        p50.append(golden.p50_ms)
        p95.append(golden.p95_ms)
        p99.append(golden.p99_ms)
    return schemas.SeriesRead(
        t=t, rps=rps, success_rate=success, p50_ms=p50, p95_ms=p95, p99_ms=p99
    )


def service_metrics(
    session: Session,
    namespace: str,
    name: str,
    *,
    window_name: str,
    by_version: bool,
    limits: Thresholds,
    now: datetime | None = None,
) -> schemas.ServiceMetrics:
    """Golden metrics of one service's inbound traffic: totals, per version, series, peers.

    404 for a service that is neither in the catalog nor seen in the window's traffic."""
    window = read.window_for(window_name, now)
    points = read.service_series(session, window, namespace, name)
    callers, callees = read.neighbours(session, window, namespace, name)
    if not points and not callers and not callees:
        exists = session.scalar(
            select(Service.id).where(Service.namespace == namespace, Service.name == name)
        )
        if exists is None:
            raise NotFoundError(f"no service {namespace}/{name}")
    total = Figures.merged(point.figures for point in points)
    versions = []
    if by_version:
        for version in sorted({point.version for point in points}):
            mine = [point for point in points if point.version == version]
            figures = Figures.merged(point.figures for point in mine)
            versions.append(
                schemas.VersionMetrics(
                    version=version,
                    totals=schemas.GoldenRead.of(figures.golden(window.elapsed_s)),
                    series=_series(window, read.fill_series(window, mine)),
                )
            )

    def peers(found: list[read.Neighbour]) -> list[schemas.PeerMetrics]:
        return [
            schemas.PeerMetrics(
                namespace=peer.namespace,
                service=peer.service,
                health=stages.classify(peer.figures, limits) if peer.service else "external",
                metrics=schemas.GoldenRead.of(peer.figures.golden(window.elapsed_s)),
            )
            for peer in found
        ]

    return schemas.ServiceMetrics(
        namespace=namespace,
        service=name,
        window=_window_read(window),
        health=stages.classify(total, limits),
        totals=schemas.GoldenRead.of(total.golden(window.elapsed_s)),
        series=_series(window, read.fill_series(window, points)),
        versions=versions,
        callers=peers(callers),
        callees=peers(callees),
    )


@dataclass(frozen=True)
class ServiceHealth:
    health: stages.Health
    success_rate: float | None
    rps: float


def health_by_service(
    session: Session,
    services: Sequence[tuple[str, str]],
    *,
    limits: Thresholds,
    window_name: str = "5m",
    now: datetime | None = None,
) -> dict[tuple[str, str], ServiceHealth]:
    """Health and success rate of each ``(namespace, name)`` over the window, in one query."""
    window = read.window_for(window_name, now)
    found = read.inbound_by_service(session, window, services)
    result = {}
    for key in services:
        figures = found.get(key, Figures())
        result[key] = ServiceHealth(
            health=stages.classify(figures, limits),
            success_rate=figures.success_rate,
            rps=figures.requests / window.elapsed_s,
        )
    return result


@dataclass(frozen=True)
class TraceRef:
    trace_id: str
    operation: str
    version: str
    duration_ms: float
    http_status: int | None
    error: bool
    started_at: datetime


def recent_traces(
    session: Session, namespace: str, name: str, *, window_name: str, limit: int = 5
) -> tuple[list[TraceRef], list[TraceRef]]:
    """(latest failing, slowest) traces with a span of this service in the window, one entry
    per trace."""
    window = read.window_for(window_name)
    since_ns = int(window.start.timestamp()) * 1_000_000_000
    mine = select(
        Span.trace_id,
        Span.name,
        Span.version,
        Span.duration_ms,
        Span.http_status,
        Span.error,
        Span.start_ns,
    ).where(Span.service == name, Span.namespace == namespace, Span.start_ns >= since_ns)
    failing = session.execute(
        mine.where(Span.error.is_(True)).order_by(Span.start_ns.desc()).limit(limit * 4)
    )
    slowest = session.execute(mine.order_by(Span.duration_ms.desc()).limit(limit * 4))
    return _distinct(failing, limit), _distinct(slowest, limit)


def _distinct(rows: Any, limit: int) -> list[TraceRef]:
    seen: set[str] = set()
    refs = []
    for trace_id, operation, version, duration, status, error, start_ns in rows:
        if trace_id in seen:
            continue
        seen.add(trace_id)
        started = datetime.fromtimestamp(start_ns / 1e9, tz=UTC)
        refs.append(TraceRef(trace_id, operation, version, duration, status, error, started))
        if len(refs) == limit:
            break
    return refs
