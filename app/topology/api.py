"""JSON API of the topology domain: the traffic graph and a service's golden metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from app.db import Database
from app.deps import SessionDep, SettingsDep
from app.telemetry.read import EdgeWindowCache
from app.topology import schemas, service
from app.topology.cache import TopologyCache
from app.topology.layout import LayoutCache
from app.topology.stages import Thresholds

router = APIRouter(prefix="/api/v1", tags=["topology"])

DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
FOCUS = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

WindowQuery = Annotated[
    Literal["1m", "5m", "1h", "6h", "24h"],
    Query(description="How far back: 1m, 5m, 1h, 6h or 24h."),
]


def get_edge_cache(request: Request) -> EdgeWindowCache:
    cache: EdgeWindowCache = request.app.state.edge_cache
    return cache


def get_layouts(request: Request) -> LayoutCache:
    layouts: LayoutCache = request.app.state.layouts
    return layouts


def get_topology_cache(request: Request) -> TopologyCache:
    """The app's cache of computed graphs, made on first use (on the event loop: no race)."""
    cache: TopologyCache | None = getattr(request.app.state, "topologies", None)
    if cache is None:
        cache = request.app.state.topologies = TopologyCache()
    return cache


def later(
    request: Request,
    query: service.TopologyQuery,
    edge_cache: EdgeWindowCache,
    layouts: LayoutCache,
    limits: Thresholds,
) -> Callable[[], schemas.Topology]:
    """The same graph computed in a background thread, with a session of its own."""
    database: Database = request.app.state.database

    def compute() -> schemas.Topology:
        with database.session(write=False) as session:
            return service.topology(
                session, query, edge_cache=edge_cache, layouts=layouts, limits=limits
            )

    return compute


EdgeCacheDep = Annotated[EdgeWindowCache, Depends(get_edge_cache)]
TopologyCacheDep = Annotated[TopologyCache, Depends(get_topology_cache)]
LayoutsDep = Annotated[LayoutCache, Depends(get_layouts)]


@router.get(
    "/topology",
    response_model=schemas.Topology,
    summary="The mesh as a graph: services, calls, health and figures over a window",
    description="Nodes carry health (from the error rate; thresholds in the settings), inbound "
    "RPS, success rate and percentiles, and a layered layout position (`x`, `y`; stable while "
    "the graph's structure is). Edges carry RPS, error %, p50/p95/p99. 404 when `focus` names "
    "no known service.",
)
def get_topology(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    edge_cache: EdgeCacheDep,
    layouts: LayoutsDep,
    topologies: TopologyCacheDep,
    window: WindowQuery = "5m",
    namespace: Annotated[
        str | None,
        Query(max_length=63, pattern=DNS_NAME, description="Edges with either end in it."),
    ] = None,
    focus: Annotated[
        str | None,
        Query(
            max_length=127,
            pattern=FOCUS,
            description="`name` or `namespace/name`: show only what is within `hops` of it.",
        ),
    ] = None,
    hops: Annotated[int, Query(ge=1, le=6, description="Calls away from `focus`.")] = 1,
    group: Annotated[
        Literal["", "namespace", "team"],
        Query(description="Collapse services into one node per namespace or owner team."),
    ] = "",
    versions: Annotated[bool, Query(description="One node per service version.")] = False,
    hide_idle: Annotated[bool, Query(description="Drop what had no traffic.")] = False,
    hide_healthy: Annotated[bool, Query(description="Drop healthy edges.")] = False,
) -> Response:
    query = service.TopologyQuery(
        window=window,
        namespace=namespace,
        focus=focus,
        hops=hops,
        group=group or None,
        versions=versions,
        hide_idle=hide_idle,
        hide_healthy=hide_healthy,
    )
    limits = service.thresholds(settings)
    cached = topologies.get(
        (query, limits),
        lambda: service.topology(
            session, query, edge_cache=edge_cache, layouts=layouts, limits=limits
        ),
        later(request, query, edge_cache, layouts, limits),
    )
    # Serialised once by pydantic-core (and kept with the graph): FastAPI would validate the
    # 1,000-edge model again first.
    return Response(cached.json, media_type="application/json")


@router.get(
    "/services/{name}/metrics",
    response_model=schemas.ServiceMetrics,
    tags=["services"],
    summary="Golden metrics of a service: totals, per version, series, callers and callees",
)
def get_service_metrics(
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str, Path(max_length=63, pattern=DNS_NAME)],
    namespace: Annotated[str, Query(max_length=63, pattern=DNS_NAME)] = "default",
    window: WindowQuery = "1h",
    by: Annotated[
        Literal["", "version"], Query(description="`version`: also per destination version.")
    ] = "",
) -> schemas.ServiceMetrics:
    return service.service_metrics(
        session,
        namespace,
        name,
        window_name=window,
        by_version=by == "version",
        limits=service.thresholds(settings),
    )
