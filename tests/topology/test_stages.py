"""Each topology stage on its own, over hand-made inputs (no database)."""

from __future__ import annotations

import pytest

from app.telemetry import histogram
from app.telemetry.read import EdgeKey, Figures
from app.topology import stages
from app.topology.stages import (
    EXTERNAL,
    CatalogEntry,
    GraphInputs,
    GraphOptions,
    Thresholds,
)


def figures(requests: int, failures: int = 0) -> Figures:
    counts = histogram.empty()
    histogram.observe(counts, 20.0, requests)
    return Figures(requests, failures, 20.0 * requests, counts)


def key(source: str, dest: str, sv: str = "v1", dv: str = "v1", sns: str = "default",
        dns: str = "default") -> EdgeKey:  # fmt: skip
    return EdgeKey(sns if source else "", source, sv if source else "", dns, dest, dv)


def build(
    edges: dict[EdgeKey, Figures],
    catalog: list[CatalogEntry] | None = None,
    upto: str = "failing_paths",
    **options: object,
) -> stages.Graph:
    names = [stage.__name__ for stage in stages.STAGES]
    chosen = stages.STAGES[: names.index(upto) + 1]
    return stages.build(
        GraphInputs(edges, catalog or []),
        GraphOptions(**options),  # type: ignore[arg-type]
        chosen,
    )


# A small mesh: outside → frontend → reviews (v1, v2) → ratings; frontend → details.
MESH = {
    key("", "frontend"): figures(100),
    key("frontend", "reviews", dv="v1"): figures(60),
    key("frontend", "reviews", dv="v2"): figures(20, 10),
    key("reviews", "ratings", sv="v1"): figures(30),
    key("reviews", "ratings", sv="v2"): figures(10),
    key("frontend", "details"): figures(40),
}


def test_base_traffic_makes_a_node_per_service_and_sums_versions_on_edges() -> None:
    graph = build(MESH, upto="base_traffic")

    assert set(graph.nodes) == {
        EXTERNAL,
        "default/frontend",
        "default/reviews",
        "default/ratings",
        "default/details",
    }
    assert graph.nodes[EXTERNAL]["label"] == "unknown"
    assert graph.nodes[EXTERNAL]["kind"] == "external"
    reviews = graph.edges["default/frontend", "default/reviews"]["figures"]
    assert (reviews.requests, reviews.failures) == (80, 10)
    assert graph.nodes["default/reviews"]["inbound"].requests == 80
    assert graph.nodes["default/reviews"]["outbound"].requests == 40


def test_versions_as_nodes_show_where_a_canarys_traffic_goes() -> None:
    graph = build(MESH, upto="health", versions=True)

    assert graph.has_edge("default/frontend@v1", "default/reviews@v2")
    canary = graph.edges["default/frontend@v1", "default/reviews@v2"]
    assert canary["figures"].requests == 20
    assert canary["health"] == "failing"  # 50 % errors on the canary only
    assert graph.edges["default/frontend@v1", "default/reviews@v1"]["health"] == "healthy"
    assert graph.nodes["default/reviews@v2"]["label"] == "reviews v2"


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        (0, "healthy"),
        (1, "healthy"),  # 0.1 % exactly: not above the threshold
        (2, "degraded"),  # 0.2 %
        (200, "degraded"),  # 20 % exactly
        (201, "failing"),
        (1000, "failing"),
    ],
)
def test_health_is_classified_at_the_thresholds(failures: int, expected: str) -> None:
    graph = build({key("a", "b"): figures(1000, failures)}, upto="health")

    assert graph.edges["default/a", "default/b"]["health"] == expected
    assert graph.nodes["default/b"]["health"] == expected


def test_health_thresholds_are_configurable() -> None:
    strict = Thresholds(degraded=0.0, failing=0.001)
    graph = build({key("a", "b"): figures(1000, 2)}, upto="health", thresholds=strict)
    assert graph.edges["default/a", "default/b"]["health"] == "failing"


def test_a_node_nobody_calls_is_judged_by_what_it_sends_and_quiet_is_idle() -> None:
    graph = build(
        {key("a", "b"): figures(10, 5), key("c", "d"): figures(0)},
        upto="health",
    )
    assert graph.nodes["default/a"]["health"] == "failing"
    assert graph.nodes["default/d"]["health"] == "idle"


def test_idle_adds_catalog_services_without_traffic_or_hides_everything_quiet() -> None:
    edges = {key("a", "b"): figures(10), key("c", "d"): figures(0)}
    catalog = [
        CatalogEntry("default", "a", "team-x"),
        CatalogEntry("default", "lonely", "team-y"),
        CatalogEntry("other", "elsewhere", "team-y"),
    ]

    shown = build(edges, catalog, upto="idle", namespace="default")
    assert "default/lonely" in shown
    assert shown.nodes["default/lonely"]["health"] == "idle"
    assert shown.nodes["default/lonely"]["team"] == "team-y"
    assert "other/elsewhere" not in shown  # another namespace than the one viewed

    hidden = build(edges, catalog, upto="idle", hide_idle=True)
    assert set(hidden.nodes) == {"default/a", "default/b"}
    assert not hidden.has_edge("default/c", "default/d")


def test_hide_healthy_keeps_only_what_has_errors() -> None:
    graph = build(MESH, upto="hide_healthy", hide_healthy=True)

    assert list(graph.edges) == [("default/frontend", "default/reviews")]
    assert set(graph.nodes) == {"default/frontend", "default/reviews"}


def test_focus_keeps_n_hops_upstream_and_downstream() -> None:
    one = build(MESH, upto="focus", focus=("default", "reviews"), hops=1)
    assert set(one.nodes) == {"default/frontend", "default/reviews", "default/ratings"}
    assert "default/details" not in one  # a sibling, not on a path through reviews

    two = build(MESH, upto="focus", focus=("default", "reviews"), hops=2)
    assert set(two.nodes) == {EXTERNAL, "default/frontend", "default/reviews", "default/ratings"}


def test_focus_takes_every_version_of_the_service() -> None:
    graph = build(MESH, upto="focus", versions=True, focus=("default", "ratings"), hops=1)
    assert set(graph.nodes) == {
        "default/ratings@v1",
        "default/reviews@v1",
        "default/reviews@v2",
    }


def test_filters_never_remove_the_focused_service() -> None:
    graph = build(MESH, upto="focus", hide_healthy=True, focus=("default", "details"), hops=1)
    assert set(graph.nodes) == {"default/details"}


def test_grouping_by_namespace_collapses_services_and_sums_edges() -> None:
    edges = {
        key("", "web", dns="shop"): figures(100),
        key("web", "cart", sns="shop", dns="shop"): figures(50),
        key("web", "pay", sns="shop", dns="payments"): figures(30, 15),
        key("cart", "pay", sns="shop", dns="payments"): figures(10),
        key("pay", "bank", sns="payments", dns="payments"): figures(40),
    }
    graph = build(edges, upto="grouping", group="namespace")

    assert set(graph.nodes) == {EXTERNAL, "namespace:shop", "namespace:payments"}
    between = graph.edges["namespace:shop", "namespace:payments"]["figures"]
    assert (between.requests, between.failures) == (40, 15)
    assert graph.nodes["namespace:payments"]["members"] == 2
    # All traffic the payments services receive (80 requests, 15 failed): degraded, not failing.
    assert graph.nodes["namespace:payments"]["inbound"].requests == 80
    assert graph.nodes["namespace:payments"]["health"] == "degraded"
    assert graph.edges["namespace:shop", "namespace:payments"]["health"] == "failing"


def test_grouping_by_team_uses_the_catalog_owner() -> None:
    catalog = [
        CatalogEntry("default", "frontend", "web"),
        CatalogEntry("default", "reviews", "books"),
        CatalogEntry("default", "ratings", "books"),
    ]
    graph = build(MESH, catalog, upto="grouping", group="team")

    assert set(graph.nodes) == {EXTERNAL, "team:web", "team:books", "team:(no team)"}
    assert graph.nodes["team:books"]["members"] == 2
    assert graph.has_edge("team:web", "team:books")


def test_failing_paths_mark_the_calls_leading_to_a_failing_call() -> None:
    edges = {
        key("", "web"): figures(100),
        key("web", "api"): figures(100),
        key("api", "db"): figures(100, 50),
        key("web", "static"): figures(100),
    }
    graph = build(edges)

    marked = {(u, v) for u, v, d in graph.edges(data=True) if d["on_failing_path"]}
    assert marked == {
        (EXTERNAL, "default/web"),
        ("default/web", "default/api"),
        ("default/api", "default/db"),
    }
    assert not graph.nodes["default/static"]["on_failing_path"]
    assert graph.nodes["default/db"]["on_failing_path"]
