"""Window queries over the rollups, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from app.db import Database
from app.telemetry import histogram, read
from app.telemetry.read import EdgeKey, EdgeWindowCache, Figures
from tests.topology.support import insert_rollups, rollup_rows

NOW = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)


def edge(source: str, dest: str, sv: str = "v1", dv: str = "v1") -> EdgeKey:
    return EdgeKey("default" if source else "", source, sv if source else "", "default", dest, dv)


@pytest.mark.parametrize(
    ("name", "resolution", "buckets"),
    [("1m", 10, 6), ("5m", 10, 30), ("1h", 60, 60), ("6h", 60, 360), ("24h", 600, 144)],
)
def test_each_window_reads_one_resolution_and_ends_with_the_current_bucket(
    name: str, resolution: int, buckets: int
) -> None:
    window = read.window_for(name, NOW)
    assert window.resolution_s == resolution
    assert len(window.buckets) == buckets
    assert window.buckets[-1] == read.align(NOW, resolution)
    assert window.buckets[-1] <= NOW < window.buckets[-1] + timedelta(seconds=resolution)


def test_figures_sum_every_bucket_in_the_window_and_nothing_outside(session: Session) -> None:
    window = read.window_for("5m", NOW)
    rows = []
    for minutes in range(5):  # 0..4 minutes ago: inside
        rows += rollup_rows(NOW - timedelta(minutes=minutes), "a", "b", requests=10, failures=1)
    rows += rollup_rows(NOW - timedelta(minutes=6), "a", "b", requests=1000, failures=1000)
    rows += rollup_rows(NOW - timedelta(minutes=1), "", "a", requests=7)
    insert_rollups(session, rows)
    session.commit()

    edges = read.window_edges(session, window)

    assert edges[edge("a", "b")].requests == 50
    assert edges[edge("a", "b")].failures == 5
    assert edges[edge("a", "b")].success_rate == pytest.approx(0.9)
    assert edges[edge("", "a")].requests == 7  # a caller outside the mesh keeps source ""
    golden = edges[edge("a", "b")].golden(window.elapsed_s)
    assert golden.rps == pytest.approx(50 / window.elapsed_s)
    assert 290 <= window.elapsed_s <= 300  # from the first bucket's start to now


def test_no_traffic_means_no_success_rate_and_no_percentiles() -> None:
    golden = Figures().golden(60)
    assert golden.success_rate is None
    assert golden.p50_ms is None and golden.p99_ms is None
    assert golden.rps == 0


def _reference_quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


def _bucket_width(value: float) -> float:
    bounds = (0.0, *histogram.LATENCY_BOUNDS_MS)
    for low, high in itertools.pairwise(bounds):
        if value <= high:
            return high - low
    return 0.0


def test_percentiles_over_a_window_come_from_merged_histograms(session: Session) -> None:
    """Tolerance: the estimate lies within one histogram bucket's width of the quantile of the
    raw samples (the resolution a fixed-bucket histogram can promise), for samples spread over
    30 buckets and two callers, each row holding its own share."""
    rng = random.Random(7)
    samples: list[float] = []
    rows = []
    for step in range(30):
        at = NOW - timedelta(seconds=10 * step)
        for caller in ("a", "c"):
            mine = [rng.lognormvariate(3.2, 0.9) for _ in range(rng.randint(20, 60))]
            samples += mine
            rows += rollup_rows(at, caller, "b", requests=len(mine), latencies_ms=mine)
    insert_rollups(session, rows)
    session.commit()

    window = read.window_for("5m", NOW)
    edges = read.window_edges(session, window)
    merged = Figures.merged(f for k, f in edges.items() if k.dest_service == "b")
    assert merged.requests == len(samples)
    golden = merged.golden(window.elapsed_s)
    for q, estimate in ((0.5, golden.p50_ms), (0.95, golden.p95_ms), (0.99, golden.p99_ms)):
        truth = _reference_quantile(samples, q)
        assert estimate is not None
        assert abs(estimate - truth) <= _bucket_width(truth), (q, estimate, truth)


def test_namespace_keeps_edges_with_either_end_in_it(session: Session) -> None:
    rows = rollup_rows(NOW, "a", "b", requests=1, dest_namespace="shop")
    rows += rollup_rows(NOW, "x", "y", requests=1, source_namespace="shop")
    rows += rollup_rows(NOW, "p", "q", requests=1)
    insert_rollups(session, rows)
    session.commit()

    edges = read.window_edges(session, read.window_for("1m", NOW), namespace="shop")

    assert sorted(k.dest_service for k in edges) == ["b", "y"]


def test_inbound_by_service_answers_for_the_services_asked_in_one_query(
    session: Session,
) -> None:
    rows = rollup_rows(NOW, "a", "b", requests=10, failures=5, dest_version="v1")
    rows += rollup_rows(NOW, "c", "b", requests=10, dest_version="v2")
    rows += rollup_rows(NOW, "a", "d", requests=4)
    insert_rollups(session, rows)
    session.commit()

    found = read.inbound_by_service(
        session, read.window_for("5m", NOW), [("default", "b"), ("default", "zzz")]
    )

    assert set(found) == {("default", "b")}
    assert found["default", "b"].requests == 20
    assert found["default", "b"].success_rate == pytest.approx(0.75)


def test_series_has_one_point_per_bucket_and_neighbours_merge_versions(
    session: Session,
) -> None:
    window = read.window_for("1m", NOW)
    rows = rollup_rows(window.buckets[1], "a", "b", requests=10, dest_version="v1")
    rows += rollup_rows(window.buckets[1], "a", "b", requests=30, dest_version="v2")
    rows += rollup_rows(window.buckets[4], "a", "b", requests=5, dest_version="v2")
    rows += rollup_rows(window.buckets[4], "b", "c", requests=2)
    insert_rollups(session, rows)
    session.commit()

    points = read.service_series(session, window, "default", "b")
    series = read.fill_series(window, points)
    assert [f.requests for f in series] == [0, 40, 0, 0, 5, 0]
    v2 = read.fill_series(window, [p for p in points if p.version == "v2"])
    assert [f.requests for f in v2] == [0, 30, 0, 0, 5, 0]

    callers, callees = read.neighbours(session, window, "default", "b")
    assert [(n.service, n.figures.requests) for n in callers] == [("a", 45)]
    assert [(n.service, n.figures.requests) for n in callees] == [("c", 2)]


def test_cached_window_matches_a_direct_read_before_and_after_buckets_close(
    database: Database,
) -> None:
    cache = EdgeWindowCache(database)
    try:
        with database.session(write=True) as session:
            rows = []
            for step in range(40):
                at = NOW - timedelta(seconds=10 * step)
                rows += rollup_rows(at, "a", "b", requests=step + 1, failures=step % 3)
            insert_rollups(session, rows)
            session.commit()
        with database.session(write=False) as session:
            # Buckets close (the part is slid in the background), then it is too stale.
            for later in (0, 10, 20, 30, 90):
                window = read.window_for("5m", NOW + timedelta(seconds=later))
                for _ in range(2):  # before and after the background slide
                    cached, covered = cache.edges(session, window)
                    direct = read.edge_figures(
                        session, resolution_s=10, since=covered.start, namespace=None
                    )
                    assert cached == direct, later
                    assert covered.start <= window.start
                    assert window.start - covered.start <= timedelta(seconds=30)
                    cache.drain()
                assert covered.start == window.start  # slid up to date
    finally:
        cache.close()


def test_one_walk_percentiles_agree_with_the_histogram_module() -> None:
    rng = random.Random(11)
    shapes = [histogram.empty(), [0] * 13 + [5], [3] + [0] * 13]
    for _ in range(300):
        shapes.append([rng.choice((0, 0, 1, 2, 50)) for _ in range(histogram.BUCKETS)])
    for counts in shapes:
        expected = tuple(histogram.quantile(counts, q) for q in (0.5, 0.95, 0.99))
        assert read.percentiles(counts) == pytest.approx(expected), counts
