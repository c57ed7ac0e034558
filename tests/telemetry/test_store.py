"""Storing span rows (ingest.store_spans), on both databases: PostgreSQL takes its COPY path."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from app.db import Database
from app.telemetry import ingest
from app.telemetry.models import Span
from tests.telemetry.support import span_row

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def span(trace: int, span_id: int, **changes: Any) -> ingest.SpanRow:
    row = {
        "trace_id": f"{trace:032x}",
        "span_id": f"{span_id:016x}",
        "parent_span_id": None,
        "name": "GET /items",
        "kind": 2,
        "service": "web",
        "namespace": "shop",
        "version": "v1",
        "start_ns": 1_700_000_000 * 10**9,
        "end_ns": 1_700_000_000 * 10**9 + 2_500_000,
        "duration_ms": 2.5,
        "http_status": 503,
        "error": True,
        "attributes": {"url.path": "/items/7", "naïve": "ünïcode", "nested": {"a": [1, 2]}},
        "received_at": NOW,
    }
    return span_row(row | changes)


def stored(database: Database) -> list[Span]:
    with database.session(write=False) as session:
        return list(session.scalars(select(Span).order_by(Span.trace_id, Span.span_id)))


def test_every_column_comes_back_as_sent(database: Database) -> None:
    with database.session(write=True) as session:
        ingest.store_spans(session, [span(1, 1), span(1, 2, parent_span_id=f"{1:016x}")])
        session.commit()
    first, second = stored(database)
    assert (first.trace_id, first.span_id, first.parent_span_id) == (f"{1:032x}", f"{1:016x}", None)
    assert second.parent_span_id == f"{1:016x}"
    assert (first.name, first.kind, first.service, first.namespace, first.version) == (
        "GET /items", 2, "web", "shop", "v1",
    )  # fmt: skip
    assert (first.start_ns, first.end_ns, first.duration_ms) == (
        1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + 2_500_000, 2.5,
    )  # fmt: skip
    assert (first.http_status, first.error) == (503, True)
    assert first.attributes == {"url.path": "/items/7", "naïve": "ünïcode", "nested": {"a": [1, 2]}}
    assert first.received_at == NOW


def test_two_stores_in_one_transaction_and_repeats_keep_one_copy(database: Database) -> None:
    with database.session(write=True) as session:
        ingest.store_spans(session, [span(2, 1), span(2, 2)])
        ingest.store_spans(session, [span(2, 2), span(2, 3), span(2, 3)])
        session.commit()
    with database.session(write=True) as session:
        ingest.store_spans(session, [span(2, 1), span(2, 4)])
        session.commit()
    assert [s.span_id for s in stored(database)] == [f"{i:016x}" for i in (1, 2, 3, 4)]


def test_a_rolled_back_store_leaves_nothing_behind(database: Database) -> None:
    with database.session(write=True) as session:
        ingest.store_spans(session, [span(3, 1)])
        session.rollback()
    with database.session(write=True) as session:
        ingest.store_spans(session, [span(3, 2)])
        session.commit()
    assert [s.span_id for s in stored(database)] == [f"{2:016x}"]
