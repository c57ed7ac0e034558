"""Bounded telemetry storage: spans by age and by count, rollups by age per resolution.

Runs in a background thread started with the app. Every delete removes at most ``batch`` rows
in its own short transaction, so an ingest request waits for one small delete at most, never
for a whole sweep (on SQLite a writer holds the database lock for its transaction).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from app import metrics
from app.config import Settings
from app.db import Database
from app.telemetry.models import EdgeRollup, Span

__all__ = ["Pruner", "prune"]

log = logging.getLogger(__name__)

BATCH = 2_000


def prune(
    database: Database, settings: Settings, *, now: datetime | None = None, batch: int = BATCH
) -> dict[str, int]:
    """One sweep; rows deleted per rule (``spans_age``, ``spans_count``, ``rollups_<res>s``)."""
    now = now or datetime.now(UTC)
    deleted: dict[str, int] = {}
    cutoff_ns = int((now - timedelta(hours=settings.span_retention_hours)).timestamp() * 1e9)
    deleted["spans_age"] = _delete_batches(
        database, Span, Span.start_ns < cutoff_ns, batch, "spans", "age"
    )
    deleted["spans_count"] = _prune_span_count(database, settings.span_max_count, batch)
    for resolution, hours in (
        (10, settings.rollup_10s_retention_hours),
        (60, settings.rollup_60s_retention_hours),
        (600, settings.rollup_600s_retention_hours),
    ):
        cutoff = now - timedelta(hours=hours)
        deleted[f"rollups_{resolution}s"] = _delete_batches(
            database,
            EdgeRollup,
            (EdgeRollup.resolution_s == resolution) & (EdgeRollup.bucket_start < cutoff),
            batch,
            "edge_rollups",
            f"age_{resolution}s",
        )
    return deleted


def _prune_span_count(database: Database, max_count: int, batch: int) -> int:
    """Keep the ``max_count`` most recently received spans (ids grow with every insert)."""
    with database.session(write=False) as session:
        threshold = session.scalar(
            select(Span.id).order_by(Span.id.desc()).offset(max_count).limit(1)
        )
    if threshold is None:
        return 0
    return _delete_batches(database, Span, Span.id <= threshold, batch, "spans", "count")


def _delete_batches(
    database: Database,
    model: type[Span] | type[EdgeRollup],
    condition: object,
    batch: int,
    table: str,
    rule: str,
) -> int:
    total = 0
    while True:
        with database.session(write=True) as session:
            ids = select(model.id).where(condition).limit(batch).scalar_subquery()  # type: ignore[arg-type]
            result = session.execute(delete(model).where(model.id.in_(ids)))
            session.commit()
        count = max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
        total += count
        if count:
            metrics.PRUNED_ROWS.labels(table, rule).inc(count)
        if count < batch:
            return total


class Pruner:
    """Calls :func:`prune` every ``settings.retention_interval_s`` until stopped."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-pruner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.retention_interval_s):
            started = time.monotonic()
            try:
                deleted = prune(self._database, self._settings)
            except Exception:  # a busy or unreachable database: try again next round
                log.warning("telemetry pruning failed; retrying next interval", exc_info=True)
                continue
            if any(deleted.values()):
                log.info(
                    "pruned telemetry in %.0f ms: %s",
                    (time.monotonic() - started) * 1000,
                    deleted,
                )
