"""JSON shapes of the topology and service-metrics API (stable; documented in the OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.telemetry.read import Golden

HealthName = Literal["healthy", "degraded", "failing", "idle", "external"]
WindowName = Literal["1m", "5m", "1h", "6h", "24h"]


class GoldenRead(BaseModel):
    """Golden metrics over a window. Rates and percentiles are ``null`` without traffic."""

    requests: int
    failures: int
    rps: float = Field(description="requests per second over the window")
    success_rate: float | None = Field(description="successes / requests, 0..1")
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, golden: Golden) -> GoldenRead:
        return cls.model_validate(golden_dict(golden))


def golden_dict(golden: Golden) -> dict[str, Any]:
    return {
        "requests": golden.requests,
        "failures": golden.failures,
        "rps": round(golden.rps, 4),
        "success_rate": None if golden.success_rate is None else round(golden.success_rate, 6),
        "p50_ms": _ms(golden.p50_ms),
        "p95_ms": _ms(golden.p95_ms),
        "p99_ms": _ms(golden.p99_ms),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class WindowRead(BaseModel):
    name: WindowName
    resolution_s: int
    start: datetime = Field(description="start of the first bucket read")
    end: datetime


class TopologyNode(BaseModel):
    id: str
    kind: Literal["service", "external", "group"]
    label: str
    namespace: str
    service: str
    version: str | None
    team: str
    health: HealthName
    members: int = Field(description="services in a group node; 1 otherwise")
    metrics: GoldenRead = Field(description="inbound traffic (outbound for a node nobody calls)")
    on_failing_path: bool
    x: float
    y: float
    url: str | None = Field(description="the console page of this node, if it has one")


class TopologyEdge(BaseModel):
    id: str
    source: str
    target: str
    health: HealthName
    error_pct: float | None
    metrics: GoldenRead
    on_failing_path: bool
    traces_url: str | None


class Topology(BaseModel):
    window: WindowRead
    nodes: list[TopologyNode]
    edges: list[TopologyEdge]


class SeriesRead(BaseModel):
    """One point per bucket of the window, oldest first (``t`` = bucket start)."""

    t: list[datetime]
    rps: list[float]
    success_rate: list[float | None]
    p50_ms: list[float | None]
    p95_ms: list[float | None]
    p99_ms: list[float | None]


class VersionMetrics(BaseModel):
    version: str
    totals: GoldenRead
    series: SeriesRead


class PeerMetrics(BaseModel):
    namespace: str
    service: str = Field(description='"" for callers outside the mesh')
    health: HealthName
    metrics: GoldenRead


class ServiceMetrics(BaseModel):
    namespace: str
    service: str
    window: WindowRead
    health: HealthName
    totals: GoldenRead
    series: SeriesRead
    versions: list[VersionMetrics] = Field(description="with by=version; empty otherwise")
    callers: list[PeerMetrics]
    callees: list[PeerMetrics]
