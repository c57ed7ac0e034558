"""Response shapes of the traces API (``/api/v1/traces``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SpanRead", "TraceList", "TraceRead", "TraceSummary"]


class TraceSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    trace_id: str = Field(description="32 lower-case hex digits")
    root_name: str = Field(
        description="Operation of the root span (the earliest span without a parent in the trace)"
    )
    root_service: str
    services: list[str] = Field(description="Services with spans in the trace, sorted")
    span_count: int
    error_count: int = Field(description="Spans with status ERROR or an HTTP status >= 500")
    error: bool
    duration_ms: float = Field(description="Latest span end minus earliest span start")
    start: datetime = Field(description="Earliest span start (UTC)")


class TraceList(BaseModel):
    items: list[TraceSummary] = Field(description="Newest first")
    limit: int


class SpanRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    trace_id: str
    span_id: str = Field(description="16 lower-case hex digits")
    parent_span_id: str | None
    name: str = Field(description="The operation")
    kind: str = Field(description="unspecified, internal, server, client, producer or consumer")
    service: str
    namespace: str
    version: str
    start: datetime
    start_ns: int = Field(description="Unix nanoseconds, as the sender's clock had it")
    end_ns: int
    duration_ms: float
    http_status: int | None
    error: bool
    attributes: dict[str, Any]


class TraceRead(BaseModel):
    trace_id: str
    spans: list[SpanRead] = Field(description="Ordered by start time")
    services: list[str]
    span_count: int
    error: bool
    duration_ms: float
    start: datetime
