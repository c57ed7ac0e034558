"""Window queries over the edge rollups: what the topology and the service pages read.

Windows and the resolution each reads (the coarsest whose bucket count stays readable, and the
finest that keeps the row count of a window bounded):

| window | resolution | buckets |
|---|---|---|
| 1m, 5m | 10 s | 6, 30 |
| 1h, 6h | 60 s | 60, 360 |
| 24h | 600 s | 144 |

A window covers the ``N = window / resolution`` most recent buckets, the last of which is still
filling; rates divide by the time actually covered (from the first bucket's start to now), so a
half-full current bucket does not halve the rate. Percentiles always come from the sum of the
buckets' histograms (:mod:`app.telemetry.histogram`), never from averaged percentiles. Success
rate is successes / (successes + failures), ``None`` without traffic.

This module assumes the writer keeps every resolution up to date (a point lands in its 10 s,
60 s and 600 s buckets), so that each window reads one resolution only.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, tuple_
from sqlalchemy.orm import Session

from app.db import Database
from app.telemetry import histogram
from app.telemetry.models import EdgeRollup

__all__ = [
    "WINDOWS",
    "EdgeKey",
    "EdgeWindowCache",
    "Figures",
    "Golden",
    "SeriesPoint",
    "Window",
    "align",
    "edge_figures",
    "fill_series",
    "inbound_by_service",
    "neighbours",
    "percentiles",
    "service_series",
    "window_edges",
    "window_for",
]

WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "1h": 3600, "6h": 21600, "24h": 86400}


def resolution_for(seconds: int) -> int:
    if seconds <= 300:
        return 10
    if seconds <= 21600:
        return 60
    return 600


@dataclass(frozen=True)
class Window:
    name: str
    seconds: int
    resolution_s: int
    start: datetime
    """Start of the first bucket in the window (inclusive)."""
    now: datetime

    @property
    def elapsed_s(self) -> float:
        """Seconds the buckets of this window cover up to now: the divisor of every rate."""
        return max((self.now - self.start).total_seconds(), 1.0)

    @property
    def buckets(self) -> list[datetime]:
        step = timedelta(seconds=self.resolution_s)
        count = self.seconds // self.resolution_s
        return [self.start + step * i for i in range(count)]


def align(moment: datetime, resolution_s: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % resolution_s, tz=UTC)


def window_for(name: str, now: datetime | None = None) -> Window:
    """The window called ``name`` (a key of :data:`WINDOWS`) ending now."""
    seconds = WINDOWS[name]
    resolution = resolution_for(seconds)
    now = now or datetime.now(UTC)
    current = align(now, resolution)
    start = current - timedelta(seconds=seconds - resolution)
    return Window(name, seconds, resolution, start, now)


class EdgeKey(NamedTuple):
    source_namespace: str
    source_service: str
    source_version: str
    dest_namespace: str
    dest_service: str
    dest_version: str


@dataclass(frozen=True)
class Golden:
    """The numbers people read: rate, success rate and latency percentiles."""

    requests: int
    failures: int
    rps: float
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass
class Figures:
    """Additive RED figures: the sum of any set of rollup rows."""

    requests: int = 0
    failures: int = 0
    latency_sum_ms: float = 0.0
    counts: list[int] = field(default_factory=histogram.empty)

    def add(self, other: Figures) -> None:
        self.requests += other.requests
        self.failures += other.failures
        self.latency_sum_ms += other.latency_sum_ms
        self.counts = list(map(operator.add, self.counts, other.counts))

    @classmethod
    def merged(cls, parts: Iterable[Figures]) -> Figures:
        total = cls()
        for part in parts:
            total.add(part)
        return total

    @property
    def success_rate(self) -> float | None:
        if self.requests <= 0:
            return None
        return max(0.0, (self.requests - self.failures) / self.requests)

    @property
    def error_rate(self) -> float | None:
        # failures / requests, not 1 - success rate: thresholds compare exactly (0.1 % of 1,000
        # is 1 failure, not 1.0000000000000009).
        if self.requests <= 0:
            return None
        return min(1.0, self.failures / self.requests)

    def golden(self, elapsed_s: float) -> Golden:
        p50, p95, p99 = percentiles(self.counts)
        return Golden(
            requests=self.requests,
            failures=self.failures,
            rps=self.requests / elapsed_s if elapsed_s > 0 else 0.0,
            success_rate=self.success_rate,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
        )


_GOLDEN_QUANTILES = (0.50, 0.95, 0.99)


def percentiles(counts: Sequence[int]) -> tuple[float | None, ...]:
    """p50, p95 and p99 of a histogram in one walk over its buckets: the same answers as
    :func:`app.telemetry.histogram.quantile` for each (a topology asks for 3,600 of them)."""
    total = sum(counts)
    if total == 0:
        return (None, None, None)
    bounds = histogram.LATENCY_BOUNDS_MS
    top = len(bounds)
    found: list[float] = []
    wanted = iter(_GOLDEN_QUANTILES)
    rank = next(wanted) * total
    seen = 0
    for i, count in enumerate(counts):
        if not count:
            continue
        upto = seen + count
        while upto >= rank:
            if i >= top:
                found.append(bounds[-1])
            else:
                lower = bounds[i - 1] if i else 0.0
                found.append(lower + (bounds[i] - lower) * ((rank - seen) / count))
            q = next(wanted, None)
            if q is None:
                return tuple(found)
            rank = q * total
        seen = upto
    found += [bounds[-1]] * (len(_GOLDEN_QUANTILES) - len(found))
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------

_R = EdgeRollup
_EDGE_COLUMNS = (
    _R.source_namespace,
    _R.source_service,
    _R.source_version,
    _R.dest_namespace,
    _R.dest_service,
    _R.dest_version,
)


def _figure_columns() -> list[Any]:
    # Summing the histogram in SQL (one JSON index per bound) reads a 24 h window several times
    # faster than decoding every row's JSON in Python.
    return [
        func.coalesce(func.sum(_R.requests), 0),
        func.coalesce(func.sum(_R.failures), 0),
        func.coalesce(func.sum(_R.latency_sum_ms), 0.0),
        *(
            func.coalesce(func.sum(_R.latency_counts[i].as_integer()), 0)
            for i in range(histogram.BUCKETS)
        ),
    ]


def _figures(row: Sequence[Any], offset: int) -> Figures:
    values = row[offset:]
    return Figures(
        requests=int(values[0]),
        failures=int(values[1]),
        latency_sum_ms=float(values[2]),
        counts=[int(v) for v in values[3 : 3 + histogram.BUCKETS]],
    )


def _in_range(
    resolution_s: int, since: datetime, until: datetime | None
) -> list[ColumnElement[bool]]:
    conditions = [_R.resolution_s == resolution_s, _R.bucket_start >= since]
    if until is not None:
        conditions.append(_R.bucket_start < until)
    return conditions


def edge_figures(
    session: Session,
    *,
    resolution_s: int,
    since: datetime,
    until: datetime | None = None,
    namespace: str | None = None,
    dest: tuple[str, str] | None = None,
    source: tuple[str, str] | None = None,
) -> dict[EdgeKey, Figures]:
    """Figures per edge (service and version on both ends) over ``[since, until)``.

    ``namespace`` keeps edges with either end in it (a namespace's graph shows who calls in and
    what it calls out); ``dest``/``source`` keep the edges into/out of one ``(namespace, name)``.
    """
    query: Select[Any] = select(*_EDGE_COLUMNS, *_figure_columns()).where(
        *_in_range(resolution_s, since, until)
    )
    if namespace is not None:
        query = query.where(or_(_R.source_namespace == namespace, _R.dest_namespace == namespace))
    if dest is not None:
        query = query.where(_R.dest_namespace == dest[0], _R.dest_service == dest[1])
    if source is not None:
        query = query.where(_R.source_namespace == source[0], _R.source_service == source[1])
    query = query.group_by(*_EDGE_COLUMNS)
    return {EdgeKey(*row[:6]): _figures(row, 6) for row in session.execute(query)}


def window_edges(
    session: Session, window: Window, *, namespace: str | None = None
) -> dict[EdgeKey, Figures]:
    return edge_figures(
        session, resolution_s=window.resolution_s, since=window.start, namespace=namespace
    )


def inbound_by_service(
    session: Session, window: Window, services: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Figures]:
    """Inbound figures of each ``(namespace, name)`` given, in one query (the catalog list)."""
    if not services:
        return {}
    query = (
        select(_R.dest_namespace, _R.dest_service, *_figure_columns())
        .where(
            *_in_range(window.resolution_s, window.start, None),
            tuple_(_R.dest_namespace, _R.dest_service).in_(list(services)),
        )
        .group_by(_R.dest_namespace, _R.dest_service)
    )
    return {(row[0], row[1]): _figures(row, 2) for row in session.execute(query)}


@dataclass(frozen=True)
class SeriesPoint:
    at: datetime
    version: str
    figures: Figures


def service_series(
    session: Session, window: Window, namespace: str, name: str
) -> list[SeriesPoint]:
    """Inbound figures of one service per bucket and destination version, oldest first.

    Buckets without traffic are absent; :func:`fill_series` lays them on the window's grid.
    """
    query = (
        select(_R.bucket_start, _R.dest_version, *_figure_columns())
        .where(
            *_in_range(window.resolution_s, window.start, None),
            _R.dest_namespace == namespace,
            _R.dest_service == name,
        )
        .group_by(_R.bucket_start, _R.dest_version)
        .order_by(_R.bucket_start, _R.dest_version)
    )
    return [SeriesPoint(row[0], row[1], _figures(row, 2)) for row in session.execute(query)]


def fill_series(window: Window, points: Iterable[SeriesPoint]) -> list[Figures]:
    """One Figures per bucket of the window (empty where nothing was recorded)."""
    by_bucket: dict[datetime, Figures] = {}
    for point in points:
        by_bucket.setdefault(point.at, Figures()).add(point.figures)
    return [by_bucket.get(bucket, Figures()) for bucket in window.buckets]


class Neighbour(NamedTuple):
    namespace: str
    service: str
    figures: Figures


def neighbours(
    session: Session, window: Window, namespace: str, name: str
) -> tuple[list[Neighbour], list[Neighbour]]:
    """(callers, callees) of one service, versions merged, busiest first."""
    where = and_(
        *_in_range(window.resolution_s, window.start, None),
        or_(
            and_(_R.dest_namespace == namespace, _R.dest_service == name),
            and_(_R.source_namespace == namespace, _R.source_service == name),
        ),
    )
    query = select(*_EDGE_COLUMNS, *_figure_columns()).where(where).group_by(*_EDGE_COLUMNS)
    callers: dict[tuple[str, str], Figures] = {}
    callees: dict[tuple[str, str], Figures] = {}
    for row in session.execute(query):
        key = EdgeKey(*row[:6])
        figures = _figures(row, 6)
        if (key.dest_namespace, key.dest_service) == (namespace, name):
            peer = (key.source_namespace, key.source_service)
            callers.setdefault(peer, Figures()).add(figures)
        if (key.source_namespace, key.source_service) == (namespace, name):
            peer = (key.dest_namespace, key.dest_service)
            callees.setdefault(peer, Figures()).add(figures)

    def ranked(found: dict[tuple[str, str], Figures]) -> list[Neighbour]:
        items = [Neighbour(ns, svc, fig) for (ns, svc), fig in found.items()]
        return sorted(items, key=lambda n: (-n.figures.requests, n.namespace, n.service))

    return ranked(callers), ranked(callees)


# ---------------------------------------------------------------------------------------------
# Cache for the whole-mesh query
# ---------------------------------------------------------------------------------------------

# Buckets that ended this long ago are taken as complete: agents report every few seconds.
CLOSED_GRACE_S = 30
# A closed part this many buckets behind is recomputed before answering instead of slid.
MAX_STALE_BUCKETS = 3
# Slides between two full recomputes, which pick up points that arrived after the grace.
SLIDES_PER_RECOMPUTE = 60


@dataclass(frozen=True)
class _ClosedPart:
    start: datetime
    until: datetime
    edges: dict[EdgeKey, Figures]
    slides: int = 0


def _minus(total: Figures, part: Figures) -> Figures:
    return Figures(
        requests=max(0, total.requests - part.requests),
        failures=max(0, total.failures - part.failures),
        latency_sum_ms=max(0.0, total.latency_sum_ms - part.latency_sum_ms),
        counts=[max(0, a - b) for a, b in zip(total.counts, part.counts, strict=True)],
    )


class EdgeWindowCache:
    """Per-edge figures of a window, split into closed buckets (cached) and open ones (read).

    A 24 h window sums ~150,000 rows at 1,000 edges; rereading them every few seconds for a
    refreshing topology would cost a core. The buckets that can no longer change are summed
    once per (window, namespace) and kept; each request only reads the open tail. When buckets
    close, a background thread slides the closed part (adds the buckets that closed, subtracts
    those that left the window: the figures are sums, so both are exact) while requests keep
    using the previous part with a longer tail, so the figures never skip a bucket. Every
    :data:`SLIDES_PER_RECOMPUTE` slides the part is summed afresh instead.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str | None], _ClosedPart] = {}
        self._pending: dict[tuple[str, str | None], Future[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-cache")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def drain(self) -> None:
        """Wait for the background refreshes under way (tests, benchmarks)."""
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.result()

    def edges(
        self, session: Session, window: Window, *, namespace: str | None = None
    ) -> tuple[dict[EdgeKey, Figures], Window]:
        """Figures per edge (shared: do not change them), and the window they actually cover
        (its start may be a few buckets earlier than asked while the closed part slides)."""
        resolution = timedelta(seconds=window.resolution_s)
        closed_until = align(window.now - timedelta(seconds=CLOSED_GRACE_S), window.resolution_s)
        closed_until = max(closed_until, window.start)
        key = (window.name, namespace)
        with self._lock:
            part = self._parts.get(key)
        usable = (
            part is not None
            and part.start <= window.start
            and window.start - part.start <= resolution * MAX_STALE_BUCKETS
            and part.until <= closed_until
        )
        if part is None or not usable:
            part = self._compute(session, window, namespace, closed_until)
            with self._lock:
                self._parts[key] = part
        elif part.until < closed_until:
            self._refresh_later(key, window, namespace, closed_until)
        tail = edge_figures(
            session,
            resolution_s=window.resolution_s,
            since=part.until,
            namespace=namespace,
        )
        # The cached Figures are shared with the caller, read-only; an edge with a tail gets a
        # fresh sum instead of an update in place.
        edges = dict(part.edges)
        for k, figures in tail.items():
            cached = edges.get(k)
            edges[k] = Figures.merged([cached, figures]) if cached else figures
        covered = Window(window.name, window.seconds, window.resolution_s, part.start, window.now)
        return edges, covered

    def _compute(
        self, session: Session, window: Window, namespace: str | None, until: datetime
    ) -> _ClosedPart:
        edges = edge_figures(
            session,
            resolution_s=window.resolution_s,
            since=window.start,
            until=until,
            namespace=namespace,
        )
        return _ClosedPart(window.start, until, edges)

    def _slide(
        self,
        session: Session,
        old: _ClosedPart,
        window: Window,
        namespace: str | None,
        until: datetime,
    ) -> _ClosedPart:
        if old.slides >= SLIDES_PER_RECOMPUTE or old.start > window.start:
            return self._compute(session, window, namespace, until)
        resolution = window.resolution_s
        added = edge_figures(
            session, resolution_s=resolution, since=old.until, until=until, namespace=namespace
        )
        left = edge_figures(
            session,
            resolution_s=resolution,
            since=old.start,
            until=window.start,
            namespace=namespace,
        )
        edges = dict(old.edges)
        for k, figures in added.items():
            cached = edges.get(k)
            edges[k] = Figures.merged([cached, figures]) if cached else figures
        for k, figures in left.items():
            cached = edges.get(k)
            if cached is None:
                continue
            remaining = _minus(cached, figures)
            if remaining.requests or any(remaining.counts):
                edges[k] = remaining
            else:
                del edges[k]
        return _ClosedPart(window.start, until, edges, old.slides + 1)

    def _refresh_later(
        self, key: tuple[str, str | None], window: Window, namespace: str | None, until: datetime
    ) -> None:
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and not pending.done():
                return

            def refresh() -> None:
                with self._lock:
                    old = self._parts.get(key)
                with self._database.session(write=False) as session:
                    if old is None or old.until > until:
                        return
                    part = self._slide(session, old, window, namespace, until)
                with self._lock:
                    self._parts[key] = part

            with contextlib.suppress(RuntimeError):  # shut down: the app is stopping
                self._pending[key] = self._executor.submit(refresh)
