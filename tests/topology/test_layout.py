"""The layered layout: call depth left to right, cycles survived, positions stable."""

from __future__ import annotations

import random

from app.topology.layout import X_GAP, LayoutCache, layered_layout


def layer(positions: dict[str, tuple[float, float]], node: str) -> int:
    return round(positions[node][0] / X_GAP)


def test_callers_sit_left_of_what_they_call_by_longest_path() -> None:
    edges = [("web", "api"), ("api", "db"), ("web", "db"), ("web", "cache")]
    positions = layered_layout({n for e in edges for n in e}, edges)

    assert layer(positions, "web") == 0
    assert layer(positions, "api") == 1
    assert layer(positions, "cache") == 1
    assert layer(positions, "db") == 2  # longest path web → api → db, not the direct call

    # The shallow caller of the deep node is seen last: its depth must not win.
    edges = [("r", "x"), ("x", "y"), ("y", "z"), ("q", "z")]
    positions = layered_layout({n for e in edges for n in e}, edges)
    assert [layer(positions, n) for n in ("q", "r", "x", "y", "z")] == [0, 0, 1, 2, 3]


def test_nodes_in_a_layer_do_not_overlap_and_lone_nodes_go_right() -> None:
    edges = [("root", f"leaf-{i}") for i in range(5)]
    nodes = {"root", "lone-b", "lone-a"} | {f"leaf-{i}" for i in range(5)}
    positions = layered_layout(nodes, edges)

    leaves = [positions[f"leaf-{i}"] for i in range(5)]
    assert len({y for _, y in leaves}) == 5
    assert [positions["lone-a"][0], positions["lone-b"][0]] == [2 * X_GAP, 2 * X_GAP]
    assert positions["lone-a"][1] < positions["lone-b"][1]  # by name


def test_cycles_are_laid_out_without_looping() -> None:
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("x", "x")]
    positions = layered_layout({"a", "b", "c", "d", "x"}, edges)

    assert set(positions) == {"a", "b", "c", "d", "x"}
    assert layer(positions, "d") > layer(positions, "c")
    assert len({positions[n] for n in positions}) == 5


def test_positions_do_not_depend_on_the_order_things_arrive_in() -> None:
    rng = random.Random(3)
    nodes = [f"svc-{i:03d}" for i in range(200)]
    edges = list({(rng.choice(nodes), rng.choice(nodes)) for _ in range(1000)})
    first = layered_layout(nodes, edges)
    rng.shuffle(nodes)
    rng.shuffle(edges)
    assert layered_layout(nodes, edges) == first


def test_cache_answers_a_refresh_with_the_same_structure_without_recomputing() -> None:
    cache = LayoutCache(size=2)
    edges = [("a", "b"), ("b", "c")]
    first = cache.get(["a", "b", "c"], edges)
    again = cache.get(["c", "b", "a"], list(reversed(edges)))

    assert again is first
    assert (cache.hits, cache.misses) == (1, 1)
    grown = cache.get(["a", "b", "c", "d"], [*edges, ("c", "d")])
    assert grown["a"] == first["a"] and grown["c"] == first["c"]  # old nodes stay put
