"""Seeding helpers: rollups are inserted directly (SQLAlchemy Core), as the ingest would write
them, at every resolution the window queries read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.db import Database, make_engine
from app.identity.principal import Principal
from app.migrate import upgrade
from app.telemetry import histogram
from app.telemetry.models import RESOLUTIONS_S, EdgeRollup
from app.telemetry.read import align


def rollup_rows(
    at: datetime,
    source: str,
    dest: str,
    *,
    requests: int,
    failures: int = 0,
    latencies_ms: Sequence[float] = (),
    source_version: str = "v1",
    dest_version: str = "v1",
    source_namespace: str = "default",
    dest_namespace: str = "default",
    resolutions: Iterable[int] = RESOLUTIONS_S,
) -> list[dict[str, Any]]:
    """One row per resolution for ``requests`` calls at ``at`` (their latencies cycle through
    ``latencies_ms``, 10 ms when none are given)."""
    counts = histogram.empty()
    samples = list(latencies_ms) or [10.0]
    total_ms = 0.0
    for i in range(requests):
        value = samples[i % len(samples)]
        histogram.observe(counts, value)
        total_ms += value
    return [
        {
            "resolution_s": resolution,
            "bucket_start": align(at, resolution),
            "source_namespace": source_namespace if source else "",
            "source_service": source,
            "source_version": source_version if source else "",
            "dest_namespace": dest_namespace,
            "dest_service": dest,
            "dest_version": dest_version,
            "requests": requests,
            "failures": failures,
            "latency_sum_ms": total_ms,
            "latency_counts": list(counts),
        }
        for resolution in resolutions
    ]


def insert_rollups(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """Insert rows, adding up those that land on the same bucket and edge (as an upsert
    would)."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(
            row[k]
            for k in (
                "resolution_s",
                "bucket_start",
                "source_namespace",
                "source_service",
                "source_version",
                "dest_namespace",
                "dest_service",
                "dest_version",
            )
        )
        found = merged.get(key)
        if found is None:
            merged[key] = dict(row, latency_counts=list(row["latency_counts"]))
            continue
        found["requests"] += row["requests"]
        found["failures"] += row["failures"]
        found["latency_sum_ms"] += row["latency_sum_ms"]
        found["latency_counts"] = histogram.merge([found["latency_counts"], row["latency_counts"]])
    if merged:
        session.execute(insert(EdgeRollup), list(merged.values()))


# outside → productpage → reviews (v1 fine, v2 failing) → ratings; productpage → details.
SERVICES = [
    ("productpage", "web"),
    ("reviews", "books"),
    ("ratings", "books"),
    ("details", "books"),
]


def seed_mesh(url: str) -> None:
    """Migrate the database at ``url`` and seed four catalog services with ~5 minutes of
    traffic ending now."""
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    database = Database(url)
    now = datetime.now(UTC)
    rows = []
    for step in range(1, 30):
        at = now - timedelta(seconds=10 * step)
        rows += rollup_rows(at, "", "productpage", requests=50)
        rows += rollup_rows(at, "productpage", "reviews", requests=30, latencies_ms=[8, 30])
        rows += rollup_rows(
            at, "productpage", "reviews", requests=10, failures=4, dest_version="v2"
        )
        rows += rollup_rows(at, "reviews", "ratings", requests=20)
        rows += rollup_rows(at, "productpage", "details", requests=50)
    with database.session(write=True) as session:
        for name, team in SERVICES:
            data = ServiceCreate(name=name, owner_team=team)
            catalog.create_service(session, Principal.system("seed"), data=data)
        insert_rollups(session, rows)
        session.commit()
    database.dispose()
