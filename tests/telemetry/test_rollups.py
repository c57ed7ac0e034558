"""RED metrics into edge rollups: bucket placement, percentile accuracy, exact sums under
concurrent writers, and what is refused."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import Database
from app.telemetry import histogram, ingest
from app.telemetry.models import EdgeRollup
from app.telemetry.otlp import decode_metrics
from tests.telemetry.support import PROTOBUF, duration_point, metrics_document, metrics_protobuf

# 2026-11-29 10:00:00 UTC, a round minute and ten minutes.
T0 = int(datetime(2026, 11, 29, 10, 0, tzinfo=UTC).timestamp()) * 10**9
S = 10**9


def rows(database: Database, resolution: int) -> list[EdgeRollup]:
    with database.session(write=False) as session:
        return list(
            session.scalars(
                select(EdgeRollup)
                .where(EdgeRollup.resolution_s == resolution)
                .order_by(EdgeRollup.bucket_start, EdgeRollup.dest_version)
            )
        )


def post(client: TestClient, points: list[dict], **resource: str) -> None:  # type: ignore[type-arg]
    response = client.post("/v1/metrics", json=metrics_document(points, **resource))
    assert response.status_code == 200, response.text


def point(
    end_ns: int, samples: list[float], status_class: str = "2xx", version: str = "v2", **kw: str
) -> dict:  # type: ignore[type-arg]
    return duration_point(
        source=kw.get("source", "web"),
        destination=kw.get("destination", "reviews"),
        destination_version=version,
        status_class=status_class,
        samples_ms=samples,
        start_ns=end_ns - 5 * S,
        end_ns=end_ns,
        reporter=kw.get("reporter", "source"),
    )


@pytest.fixture(autouse=True)
def _frozen_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # Points "in the future" are dropped; the tests' fixed T0 must count as the past.
    monkeypatch.setattr(time, "time_ns", lambda: T0 + 3600 * S)


def test_a_point_lands_in_one_bucket_per_resolution_with_the_edge_and_failures(
    client: TestClient, database: Database
) -> None:
    post(
        client,
        [
            point(T0 + 7 * S, [3, 40, 40], "2xx"),
            point(T0 + 7 * S, [900], "5xx"),
            point(T0 + 7 * S, [5000], "none"),
        ],
    )
    for resolution in (10, 60, 600):
        (row,) = rows(database, resolution)
        assert row.bucket_start == datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
        assert (row.source_namespace, row.source_service, row.source_version) == (
            "shop",
            "web",
            "v1",
        )
        assert (row.dest_namespace, row.dest_service, row.dest_version) == ("shop", "reviews", "v2")
        assert (row.requests, row.failures) == (5, 2)  # 5xx and "no response" are failures
        assert row.latency_sum_ms == pytest.approx(3 + 40 + 40 + 900 + 5000)
        assert sum(row.latency_counts) == 5


def test_points_of_one_minute_add_up_in_the_coarser_buckets(
    client: TestClient, database: Database
) -> None:
    # Six 10 s intervals of the same edge: six 10 s rows, one 60 s row, one 600 s row.
    for i in range(6):
        post(client, [point(T0 + (i * 10 + 10) * S, [10.0] * (i + 1))])
    fine = rows(database, 10)
    assert [r.requests for r in fine] == [1, 2, 3, 4, 5, 6]
    assert [r.bucket_start.second for r in fine] == [0, 10, 20, 30, 40, 50]
    (minute,) = rows(database, 60)
    (ten,) = rows(database, 600)
    assert minute.requests == ten.requests == 21
    assert minute.latency_counts == histogram.merge(r.latency_counts for r in fine)
    # A window query over the 10 s buckets equals the coarser bucket it falls in.
    assert sum(r.latency_sum_ms for r in fine) == pytest.approx(minute.latency_sum_ms)


def test_percentiles_from_merged_histograms_are_within_one_bucket_of_the_raw_samples(
    client: TestClient, database: Database
) -> None:
    """Tolerance: the estimate lies inside the histogram bucket that holds the true value
    (the bucketing cannot know more); checked at p50, p95, p99."""
    rng = random.Random(7)
    samples: list[float] = []
    for i in range(30):  # 30 exports spread over 5 minutes, each a lognormal latency mix
        batch = [min(rng.lognormvariate(3.2, 1.0), 9000.0) for _ in range(rng.randint(20, 80))]
        samples += batch
        post(client, [point(T0 + (i * 10 + 5) * S, batch)])
    merged = histogram.merge(r.latency_counts for r in rows(database, 10))
    assert sum(merged) == len(samples)
    ordered = sorted(samples)
    bounds = (0.0, *histogram.LATENCY_BOUNDS_MS)
    for q in (0.5, 0.95, 0.99):
        true = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        estimate = histogram.quantile(merged, q)
        assert estimate is not None
        i = next(k for k, b in enumerate(histogram.LATENCY_BOUNDS_MS) if true <= b)
        assert bounds[i] <= estimate <= bounds[i + 1], (q, true, estimate)


def test_the_destination_view_of_a_meshed_call_is_not_counted_twice(
    client: TestClient, database: Database
) -> None:
    # web's agent reports web → reviews; reviews' agent reports the same requests inbound, and
    # a caller from outside the mesh (no x-mesh-source) that only reviews' agent sees.
    post(client, [point(T0 + 5 * S, [5, 5])])
    post(
        client,
        [
            point(T0 + 5 * S, [6, 6], reporter="destination", source="web", destination="reviews"),
            point(T0 + 5 * S, [7], reporter="destination", source="unknown", destination="reviews"),
        ],
        service="reviews",
        version="v2",
    )
    edges = {
        (r.source_service, r.source_version, r.dest_service, r.dest_version): r.requests
        for r in rows(database, 10)
    }
    assert edges == {("web", "v1", "reviews", "v2"): 2, ("", "", "reviews", "v2"): 1}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda d: d["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"].update(
                aggregationTemporality=2
            ),
            "DELTA",
        ),
        (
            lambda d: d["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"][
                "dataPoints"
            ][0].update(explicitBounds=[1.0, 10.0]),
            "bounds",
        ),
        (
            lambda d: d["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"][
                "dataPoints"
            ][0].update(count="99"),
            "add up",
        ),
        (
            lambda d: d["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"][
                "dataPoints"
            ][0]["attributes"].pop(),
            "status_class",
        ),
    ],
    ids=["cumulative", "foreign-bounds", "count-mismatch", "no-status-class"],
)
def test_unusable_points_are_refused_with_a_reason_and_nothing_is_stored(
    client: TestClient,
    database: Database,
    change,
    says: str,  # type: ignore[no-untyped-def]
) -> None:
    document = metrics_document([point(T0 + 5 * S, [1.0]), point(T0 + 5 * S, [2.0], "4xx")])
    change(document)
    response = client.post("/v1/metrics", json=document)
    assert response.status_code == 400
    assert says in response.json()["message"]
    assert rows(database, 10) == []


def test_other_metrics_are_acknowledged_as_partially_rejected(
    client: TestClient, database: Database
) -> None:
    document = metrics_document([point(T0 + 5 * S, [1.0])])
    document["resourceMetrics"][0]["scopeMetrics"][0]["metrics"].append(
        {
            "name": "http.server.duration",
            "sum": {"aggregationTemporality": 2, "dataPoints": [{"asInt": "3"}]},
        }
    )
    response = client.post("/v1/metrics", content=metrics_protobuf(document), headers=PROTOBUF)
    assert response.status_code == 200
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceResponse,
    )

    partial = ExportMetricsServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_data_points == 1
    assert "only mesh.request.duration" in partial.error_message
    assert rows(database, 10)[0].requests == 1


def test_concurrent_writers_add_up_exactly(database: Database) -> None:
    """Eight writers, each adding 25 deltas to the same two edges in the same buckets: every
    request and every histogram count arrives (no lost update on SQLite or PostgreSQL)."""
    document = metrics_document(
        [point(T0 + 5 * S, [3.0, 30.0, 300.0]), point(T0 + 5 * S, [3000.0], "5xx", version="v3")]
    )
    request = decode_metrics(metrics_protobuf(document), "application/x-protobuf")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer() -> None:
        try:
            start.wait()
            for _ in range(25):
                batch = ingest.rollup_deltas(request, now_ns=T0 + 3600 * S)
                with database.session(write=True) as session:
                    ingest.add_to_rollups(session, batch.deltas)
                    session.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for resolution in (10, 60, 600):
        v2, v3 = rows(database, resolution)
        assert (v2.requests, v2.failures, v3.requests, v3.failures) == (600, 0, 200, 200)
        assert sum(v2.latency_counts) == 600
        assert v2.latency_counts[histogram.LATENCY_BOUNDS_MS.index(5)] == 200
        assert v2.latency_sum_ms == pytest.approx(200 * 333.0)
