"""Stored telemetry. Both tables are written in bulk with SQLAlchemy Core (one INSERT per batch),
never through ORM objects per row: ingest speed decides how much the console can take."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JSONType, UTCDateTime

BigInt = BigInteger().with_variant(Integer(), "sqlite")

# Rollup resolutions in seconds: raw 10 s buckets, rolled up for longer windows.
RESOLUTIONS_S = (10, 60, 600)


class Span(Base):
    """One span, from an agent or any OpenTelemetry client. Times are Unix nanoseconds as sent
    (OTLP's own unit), so nothing is lost to rounding; ``duration_ms`` is kept for the index the
    "slowest traces" and "min duration" queries use."""

    __tablename__ = "spans"
    # The unique (trace_id, span_id) index also serves lookups by trace id: no index of its own
    # (one index fewer to write per stored span).
    __table_args__ = (
        UniqueConstraint("trace_id", "span_id"),
        Index("ix_spans_start_ns", "start_ns"),
        Index("ix_spans_service_start", "service", "start_ns"),
    )

    id: Mapped[int] = mapped_column(BigInt, primary_key=True)
    trace_id: Mapped[str] = mapped_column(String(32))  # lower-case hex
    span_id: Mapped[str] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    name: Mapped[str] = mapped_column(String(255))  # the operation
    kind: Mapped[int] = mapped_column(Integer, default=0)  # OTLP SpanKind
    service: Mapped[str] = mapped_column(String(63))  # resource service.name
    namespace: Mapped[str] = mapped_column(String(63), default="default")
    version: Mapped[str] = mapped_column(String(63), default="")
    start_ns: Mapped[int] = mapped_column(BigInteger)
    end_ns: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[float] = mapped_column(Float)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[bool] = mapped_column(Boolean, default=False)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EdgeRollup(Base):
    """RED figures of one edge (source service/version → destination service/version) in one
    time bucket at one resolution. ``latency_counts`` is a histogram over
    :data:`app.telemetry.histogram.LATENCY_BOUNDS_MS` (plus overflow), mergeable by addition.
    A caller outside the mesh has source service ``""`` (shown as an external node)."""

    __tablename__ = "edge_rollups"
    __table_args__ = (
        UniqueConstraint(
            "resolution_s",
            "bucket_start",
            "source_namespace",
            "source_service",
            "source_version",
            "dest_namespace",
            "dest_service",
            "dest_version",
        ),
        Index("ix_edge_rollups_window", "resolution_s", "bucket_start"),
        Index("ix_edge_rollups_dest", "dest_namespace", "dest_service", "resolution_s"),
    )

    id: Mapped[int] = mapped_column(BigInt, primary_key=True)
    resolution_s: Mapped[int] = mapped_column(Integer)
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime)
    source_namespace: Mapped[str] = mapped_column(String(63))
    source_service: Mapped[str] = mapped_column(String(63))
    source_version: Mapped[str] = mapped_column(String(63))
    dest_namespace: Mapped[str] = mapped_column(String(63))
    dest_service: Mapped[str] = mapped_column(String(63))
    dest_version: Mapped[str] = mapped_column(String(63))
    requests: Mapped[int] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(BigInteger)  # 5xx or no response
    latency_sum_ms: Mapped[float] = mapped_column(Float)
    latency_counts: Mapped[list[int]] = mapped_column(JSONType)
