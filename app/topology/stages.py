"""The topology graph, built in small ordered stages over one networkx DiGraph.

After Kiali's appenders: each stage is a small function that reads the graph and the request's
options and returns the graph it leaves for the next one, so each can be tested on its own.
:data:`STAGES` is the order; it matters:

1. :func:`base_traffic`: a node per service (or per service version) seen in the window's
   rollups, an edge per caller → callee with its figures. Callers outside the mesh (source
   service ``""``) become one external node, ``unknown``.
2. :func:`health`: every edge and node classified from its error rate (node: its inbound
   traffic; a node nobody calls is judged by what it sends).
3. :func:`idle`: catalog services without traffic are added as idle nodes, or, with
   ``hide_idle``, every edge and node without traffic is removed.
4. :func:`hide_healthy`: with ``hide_healthy``, healthy edges go, and nodes left with nothing.
5. :func:`focus`: only the nodes within N hops of one service, upstream (its callers, theirs…)
   and downstream (its callees…). Runs before grouping, which would merge the service away.
6. :func:`grouping`: nodes collapsed into one per namespace or per owner team, edges summed.
7. :func:`failing_paths`: marks failing edges and every edge on a path leading to one, for the
   "highlight failing paths" view.

Stages that remove things never remove the focused service: a focus on a quiet or healthy
service still shows it.

Health thresholds are on the error rate (failures / requests; Kiali's defaults): ``healthy`` at
or below 0.1 %, ``degraded`` above it, ``failing`` above 20 %; ``idle`` without traffic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx

from app.telemetry.read import EdgeKey, Figures

__all__ = [
    "EXTERNAL",
    "STAGES",
    "CatalogEntry",
    "GraphOptions",
    "Thresholds",
    "base_traffic",
    "build",
    "classify",
    "failing_paths",
    "focus",
    "grouping",
    "health",
    "hide_healthy",
    "idle",
]

if TYPE_CHECKING:
    Graph = nx.DiGraph[str]
else:
    Graph = nx.DiGraph
Health = Literal["healthy", "degraded", "failing", "idle", "external"]
GroupBy = Literal["namespace", "team"]

EXTERNAL = "~external"
"""Node id of callers outside the mesh; ``~`` cannot start a service name, so it never clashes."""
EXTERNAL_LABEL = "unknown"
NO_TEAM = "(no team)"


@dataclass(frozen=True)
class Thresholds:
    """Error-rate thresholds (fractions, not percent): above ``degraded`` a node is degraded,
    above ``failing`` it is failing."""

    degraded: float = 0.001
    failing: float = 0.20


@dataclass(frozen=True)
class CatalogEntry:
    namespace: str
    name: str
    team: str


@dataclass(frozen=True)
class GraphOptions:
    versions: bool = False
    hide_idle: bool = False
    hide_healthy: bool = False
    focus: tuple[str, str] | None = None
    """``(namespace, name)`` of the service to centre on."""
    hops: int = 1
    group: GroupBy | None = None
    thresholds: Thresholds = Thresholds()
    namespace: str | None = None
    """The namespace the view is about: idle catalog services are added from it only."""


@dataclass(frozen=True)
class GraphInputs:
    edges: Mapping[EdgeKey, Figures]
    catalog: Sequence[CatalogEntry]


Stage = Callable[[Graph, GraphInputs, GraphOptions], Graph]


def classify(figures: Figures, thresholds: Thresholds) -> Health:
    rate = figures.error_rate
    if rate is None:
        return "idle"
    if rate > thresholds.failing:
        return "failing"
    if rate > thresholds.degraded:
        return "degraded"
    return "healthy"


def node_id(namespace: str, service: str, version: str | None = None) -> str:
    if not service:
        return EXTERNAL
    base = f"{namespace}/{service}"
    return f"{base}@{version}" if version is not None else base


def _is_focus(graph: Graph, node: str, options: GraphOptions) -> bool:
    data = graph.nodes[node]
    return options.focus is not None and (data["namespace"], data["service"]) == options.focus


def _add_service_node(graph: Graph, namespace: str, service: str, version: str | None) -> str:
    nid = node_id(namespace, service, version)
    if nid not in graph:
        external = nid == EXTERNAL
        graph.add_node(
            nid,
            kind="external" if external else "service",
            namespace="" if external else namespace,
            service="" if external else service,
            version=None if external else version,
            label=EXTERNAL_LABEL if external else service + (f" {version}" if version else ""),
            inbound=Figures(),
            outbound=Figures(),
            health="idle",
            members=1,
            team="",
        )
    return nid


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def base_traffic(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    for key, figures in inputs.edges.items():
        source = _add_service_node(
            graph,
            key.source_namespace,
            key.source_service,
            key.source_version if options.versions else None,
        )
        dest = _add_service_node(
            graph,
            key.dest_namespace,
            key.dest_service,
            key.dest_version if options.versions else None,
        )
        # Input figures are shared with the window cache: summed into new objects, never
        # changed in place.
        if graph.has_edge(source, dest):
            data = graph.edges[source, dest]
            data["figures"] = Figures.merged([data["figures"], figures])
        else:
            graph.add_edge(source, dest, figures=figures)
        graph.nodes[source]["outbound"].add(figures)
        graph.nodes[dest]["inbound"].add(figures)
    teams = {(entry.namespace, entry.name): entry.team for entry in inputs.catalog}
    for _, data in graph.nodes(data=True):
        data["team"] = teams.get((data["namespace"], data["service"]), "")
    return graph


def health(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    for _, _, data in graph.edges(data=True):
        data["health"] = classify(data["figures"], options.thresholds)
    for _, data in graph.nodes(data=True):
        data["health"] = _node_health(data, options.thresholds)
    return graph


def _node_health(data: Mapping[str, Any], thresholds: Thresholds) -> Health:
    if data["kind"] == "external":
        return "external"
    inbound: Figures = data["inbound"]
    return classify(inbound if inbound.requests else data["outbound"], thresholds)


def idle(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    if not options.hide_idle:
        seen = {(data["namespace"], data["service"]) for _, data in graph.nodes(data=True)}
        for entry in inputs.catalog:
            if options.namespace is not None and entry.namespace != options.namespace:
                continue
            if (entry.namespace, entry.name) not in seen:
                nid = _add_service_node(graph, entry.namespace, entry.name, None)
                graph.nodes[nid]["team"] = entry.team
        return graph
    quiet = [(u, v) for u, v, data in graph.edges(data=True) if data["figures"].requests == 0]
    graph.remove_edges_from(quiet)
    _drop_isolated(graph, options, keep=lambda data: data["health"] != "idle")
    return graph


def hide_healthy(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    if not options.hide_healthy:
        return graph
    calm = [(u, v) for u, v, data in graph.edges(data=True) if data["health"] == "healthy"]
    graph.remove_edges_from(calm)
    _drop_isolated(graph, options, keep=lambda data: data["health"] in ("degraded", "failing"))
    return graph


def _drop_isolated(
    graph: Graph, options: GraphOptions, keep: Callable[[Mapping[str, Any]], bool]
) -> None:
    lonely = [
        node
        for node, data in graph.nodes(data=True)
        if graph.degree(node) == 0 and not keep(data) and not _is_focus(graph, node, options)
    ]
    graph.remove_nodes_from(lonely)


def focus(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    if options.focus is None:
        return graph
    centre = [node for node in graph if _is_focus(graph, node, options)]
    kept = set(centre)
    kept |= _within(centre, options.hops, graph.successors)
    kept |= _within(centre, options.hops, graph.predecessors)
    return graph.subgraph(kept).copy()


def _within(start: Iterable[str], hops: int, step: Callable[[str], Iterable[str]]) -> set[str]:
    """Nodes reachable from ``start`` in at most ``hops`` steps (breadth-first, one direction)."""
    depth = dict.fromkeys(start, 0)
    queue = deque(depth)
    while queue:
        node = queue.popleft()
        if depth[node] == hops:
            continue
        for neighbour in step(node):
            if neighbour not in depth:
                depth[neighbour] = depth[node] + 1
                queue.append(neighbour)
    return set(depth)


def grouping(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    if options.group is None:
        return graph
    by = options.group

    def group_of(data: Mapping[str, Any]) -> str:
        if data["kind"] == "external":
            return EXTERNAL
        value = data["namespace"] if by == "namespace" else (data["team"] or NO_TEAM)
        return f"{by}:{value}"

    grouped: Graph = nx.DiGraph()
    for node, data in graph.nodes(data=True):
        gid = group_of(data)
        if gid not in grouped:
            external = gid == EXTERNAL
            name = gid.split(":", 1)[1] if not external else EXTERNAL_LABEL
            grouped.add_node(
                gid,
                kind="external" if external else "group",
                namespace=name if by == "namespace" and not external else "",
                service="",
                version=None,
                label=name,
                inbound=Figures(),
                outbound=Figures(),
                health="idle",
                members=0,
                team=name if by == "team" and not external else "",
                services=[],
            )
        group = grouped.nodes[gid]
        group["members"] += 1
        group["services"].append(node)
        # A group's health is that of all the traffic its services receive, from inside or out.
        group["inbound"].add(data["inbound"])
        group["outbound"].add(data["outbound"])
    for source, dest, data in graph.edges(data=True):
        gs, gd = group_of(graph.nodes[source]), group_of(graph.nodes[dest])
        if gs == gd:
            continue
        if grouped.has_edge(gs, gd):
            grouped.edges[gs, gd]["figures"].add(data["figures"])
        else:
            grouped.add_edge(gs, gd, figures=Figures.merged([data["figures"]]))
    return health(grouped, inputs, options)


def failing_paths(graph: Graph, inputs: GraphInputs, options: GraphOptions) -> Graph:
    failing = [(u, v) for u, v, data in graph.edges(data=True) if data["health"] == "failing"]
    upstream = _within((u for u, _ in failing), len(graph), graph.predecessors)
    for _, v, data in graph.edges(data=True):
        data["on_failing_path"] = v in upstream or data["health"] == "failing"
    on_path = upstream | {v for _, v in failing}
    for node, data in graph.nodes(data=True):
        data["on_failing_path"] = node in on_path
    return graph


STAGES: tuple[Stage, ...] = (
    base_traffic,
    health,
    idle,
    hide_healthy,
    focus,
    grouping,
    failing_paths,
)


def build(inputs: GraphInputs, options: GraphOptions, stages: Sequence[Stage] = STAGES) -> Graph:
    graph: Graph = nx.DiGraph()
    for stage in stages:
        graph = stage(graph, inputs, options)
    return graph
