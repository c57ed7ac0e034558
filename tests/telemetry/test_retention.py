"""Retention: spans by age and by count, rollups by age per resolution, in small batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.telemetry import histogram, ingest
from app.telemetry.models import EdgeRollup, Span
from app.telemetry.retention import prune
from tests.telemetry.support import span_row

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def add_spans(database: Database, starts: list[datetime], tag: str) -> None:
    rows = [
        span_row(
            {
                "trace_id": f"{i:030x}{tag}",
                "span_id": f"{i:016x}",
                "parent_span_id": None,
                "name": "op",
                "kind": 2,
                "service": "web",
                "namespace": "default",
                "version": "v1",
                "start_ns": int(start.timestamp()) * 10**9,
                "end_ns": int(start.timestamp()) * 10**9 + 1000,
                "duration_ms": 0.001,
                "http_status": 200,
                "error": False,
                "attributes": {},
                "received_at": NOW,
            }
        )
        for i, start in enumerate(starts)
    ]
    with database.session(write=True) as session:
        ingest.store_spans(session, rows)
        session.commit()


def span_tags(database: Database) -> dict[str, int]:
    with database.session(write=False) as session:
        result = session.execute(select(Span.trace_id)).scalars()
        tags: dict[str, int] = {}
        for trace_id in result:
            tags[trace_id[-2:]] = tags.get(trace_id[-2:], 0) + 1
        return tags


def settings(tmp_path: Path, db_url: str, **overrides: float) -> Settings:
    return Settings(  # type: ignore[arg-type]
        data_dir=tmp_path, database_url=db_url, allowed_hosts=["testserver"], **overrides
    )


def test_spans_older_than_the_retention_go_in_batches(
    database: Database, db_url: str, tmp_path: Path
) -> None:
    add_spans(database, [NOW - timedelta(hours=80)] * 25, "aa")  # older than 72 h
    add_spans(database, [NOW - timedelta(hours=1)] * 5, "bb")
    deleted = prune(database, settings(tmp_path, db_url), now=NOW, batch=7)
    assert deleted["spans_age"] == 25
    assert span_tags(database) == {"bb": 5}


def test_past_the_count_limit_the_earliest_received_spans_go(
    database: Database, db_url: str, tmp_path: Path
) -> None:
    add_spans(database, [NOW - timedelta(minutes=5)] * 1200, "aa")
    add_spans(database, [NOW - timedelta(minutes=6)] * 300, "bb")  # received later, older clock
    deleted = prune(database, settings(tmp_path, db_url, span_max_count=1000), now=NOW, batch=250)
    assert deleted["spans_count"] == 500
    assert span_tags(database) == {"aa": 700, "bb": 300}


def test_each_rollup_resolution_keeps_its_own_history(
    database: Database, db_url: str, tmp_path: Path
) -> None:
    ages = [timedelta(minutes=30), timedelta(hours=2), timedelta(hours=30), timedelta(days=8)]
    with database.session(write=True) as session:
        for resolution in (10, 60, 600):
            for age in ages:
                ingest.add_to_rollups(
                    session,
                    {
                        (
                            resolution,
                            NOW - age,
                            "default",
                            "web",
                            "v1",
                            "default",
                            "reviews",
                            "v1",
                        ): ingest.RollupDelta(1, 0, 1.0, histogram.empty())
                    },
                )
        session.commit()
    prune(database, settings(tmp_path, db_url), now=NOW)
    with database.session(write=False) as session:
        kept = {
            (r, round((NOW - b).total_seconds() / 3600, 1))
            for r, b in session.execute(select(EdgeRollup.resolution_s, EdgeRollup.bucket_start))
        }
        total = session.scalar(select(func.count()).select_from(EdgeRollup))
    # 10 s: about an hour; 60 s: about a day; 600 s: about a week.
    assert kept == {(10, 0.5), (60, 0.5), (60, 2.0), (600, 0.5), (600, 2.0), (600, 30.0)}
    assert total == 6


def test_the_app_prunes_in_the_background(database: Database, db_url: str, tmp_path: Path) -> None:
    import time

    from fastapi.testclient import TestClient

    from app.main import create_app

    add_spans(database, [datetime.now(UTC) - timedelta(hours=100)] * 3, "aa")
    add_spans(database, [datetime.now(UTC)] * 2, "bb")
    app = create_app(
        settings(tmp_path, db_url, retention_interval_s=0.05, otlp_worker_processes=0), database
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while span_tags(database) != {"bb": 2}:  # the pruner has no event to wait on
            assert time.monotonic() < deadline, "the background pruner did not run"
            time.sleep(0.05)
        assert (
            'mesh_telemetry_pruned_rows_total{rule="age",table="spans"}'
            in client.get("/metrics").text
        )
