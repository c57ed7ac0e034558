"""The rollup writer's group commit: reports that keep coming share a transaction, a lone one
is not held for the whole linger, and rollups read back what was reported, whatever the
buckets already held (the existing rows are found through the unique key's index)."""

from __future__ import annotations

import asyncio
import gzip
import time
from datetime import UTC, datetime

from sqlalchemy import select

from app.db import Database
from app.telemetry import histogram, ingest, otlp
from app.telemetry.models import EdgeRollup
from app.telemetry.receiver import RollupWriter
from tests.telemetry.support import duration_point, metrics_document, metrics_protobuf

BUCKET = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def deltas(source: str, requests: int, *, dest: str = "reviews") -> dict:  # type: ignore[type-arg]
    counts = histogram.empty()
    counts[2] = requests
    found = {}
    for resolution in (10, 60, 600):
        key = (resolution, BUCKET, "shop", source, "v1", "shop", dest, "v1")
        found[key] = ingest.RollupDelta(requests, 1, 4.0 * requests, list(counts))
    return found


def requests_by_source(database: Database, resolution: int) -> dict[str, int]:
    with database.session(write=False) as session:
        rows = session.execute(
            select(EdgeRollup.source_service, EdgeRollup.requests).where(
                EdgeRollup.resolution_s == resolution
            )
        )
        return {source: requests for source, requests in rows}


def test_reports_that_keep_coming_share_one_commit(database: Database) -> None:
    writer = RollupWriter(database, linger_s=60.0, quiet_s=2.0)
    try:
        futures = [writer.submit(deltas(f"svc-{i}", 10)) for i in range(20)]
        for future in futures:
            future.result(timeout=60)
    finally:
        writer.close()
    assert writer.commits == 1
    assert requests_by_source(database, 600) == {f"svc-{i}": 10 for i in range(20)}


def test_a_lone_report_is_written_once_the_queue_is_quiet(database: Database) -> None:
    # A 10-minute linger: only the quiet gap can end it within the generous 60 s waited here.
    writer = RollupWriter(database, linger_s=600.0, quiet_s=0.05)
    try:
        writer.submit(deltas("web", 3)).result(timeout=60)
        writer.submit(deltas("web", 4)).result(timeout=60)
    finally:
        writer.close()
    assert writer.commits == 2
    assert requests_by_source(database, 10) == {"web": 7}


def test_later_reports_add_to_the_rows_already_stored(database: Database) -> None:
    writer = RollupWriter(database, linger_s=0.0, quiet_s=0.0)
    try:
        for _ in range(3):
            writer.submit(deltas("web", 5) | deltas("api", 2, dest="ratings")).result(timeout=60)
    finally:
        writer.close()
    for resolution in (10, 60, 600):
        assert requests_by_source(database, resolution) == {"web": 15, "api": 6}
    with database.session(write=False) as session:
        web = session.scalars(
            select(EdgeRollup).where(
                EdgeRollup.source_service == "web", EdgeRollup.resolution_s == 60
            )
        ).one()
    assert (web.failures, web.latency_sum_ms, web.latency_counts[2]) == (3, 60.0, 15)


def _report_body(source: str, samples: int) -> bytes:
    now = time.time_ns()
    point = duration_point(
        source=source,
        destination="reviews",
        destination_version="v1",
        status_class="2xx",
        samples_ms=[3.0] * samples,
        start_ns=now - 5 * 10**9,
        end_ns=now,
    )
    return metrics_protobuf(metrics_document([point]))


def test_reports_are_decoded_by_the_writer_and_a_malformed_one_fails_alone(
    database: Database,
) -> None:
    """Bodies queued from the event loop: the writer decodes the batch; the malformed one gets
    its own OtlpError (400) and the others of the same transaction are stored."""
    writer = RollupWriter(database, linger_s=60.0, quiet_s=2.0)

    async def send() -> list[object]:
        futures = [
            writer.report(_report_body("web", 2), otlp.PROTOBUF, None),
            writer.report(b"\xff\xff not protobuf", otlp.PROTOBUF, None),
            writer.report(gzip.compress(_report_body("api", 3)), otlp.PROTOBUF, "gzip"),
        ]
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        web, garbage, api = asyncio.run(send())
    finally:
        writer.close()
    assert web == (1, 1, "")
    assert api == (1, 1, "")
    assert isinstance(garbage, otlp.OtlpError)
    assert garbage.status == 400
    assert writer.commits == 1
    assert requests_by_source(database, 10) == {"web": 2, "api": 3}
