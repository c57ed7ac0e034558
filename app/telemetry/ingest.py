"""Turning decoded OTLP requests into stored rows: spans, and per-edge RED rollups.

The service layer of telemetry ingest. It validates the whole request before it writes
anything and writes it in the caller's transaction, so a request is stored entirely or not at
all. Telemetry is machine data, not a change made by a person: nothing here is audited.

Metric design (documented for senders in ``docs/telemetry.md``): one histogram,
``mesh.request.duration`` in milliseconds, DELTA temporality, explicit bounds equal to
:data:`app.telemetry.histogram.LATENCY_BOUNDS_MS`, one data point per edge and status class.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from sqlalchemy import Column, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.telemetry import histogram
from app.telemetry.models import RESOLUTIONS_S, EdgeRollup, Span
from app.telemetry.otlp import OtlpError, any_value, attributes

__all__ = [
    "FAILURE_CLASSES",
    "METRIC_NAME",
    "SPAN_COLUMNS",
    "IngestResult",
    "RollupDelta",
    "SpanRow",
    "ingest_metrics",
    "ingest_traces",
    "rollup_deltas",
    "span_rows",
    "store_spans",
]

METRIC_NAME = "mesh.request.duration"
# Linkerd's definition, as the agent counts it: a 5xx or no response at all.
FAILURE_CLASSES = frozenset({"5xx", "none"})
STATUS_CLASSES = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx", "none"})
# The agent's name for a caller that sent no x-mesh-source header: outside the mesh.
UNKNOWN_SOURCES = frozenset({"", "unknown"})

_MAX_INT64 = 2**63 - 1
_STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
# Points further in the future than this are a broken clock, not data to keep for a week.
_MAX_FUTURE_NS = 5 * 60 * 10**9
# One advisory-lock key for all metric writers on PostgreSQL (the ASCII of "meshrlup").
_ROLLUP_LOCK = 0x6D6573_68726C7570
_BOUNDS = [float(b) for b in histogram.LATENCY_BOUNDS_MS]
_DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    rejected: int = 0
    message: str = ""


# ---------------------------------------------------------------------------------------------
# Spans

# A stored span as the INSERT takes it: the spans table's columns but its id, in this order
# (SPAN_COLUMNS), with the attributes already JSON text. Tuples, not dicts: at 20,000 spans a
# second, building a dict per span and processing its parameters by name cost more than
# SQLite's insert (measured, bench/telemetry.py).
SpanRow = tuple[
    str,  # trace_id: lower-case hex
    str,  # span_id
    str | None,  # parent_span_id
    str,  # name
    int,  # kind
    str,  # service
    str,  # namespace
    str,  # version
    int,  # start_ns
    int,  # end_ns
    float,  # duration_ms
    int | None,  # http_status
    bool,  # error
    str,  # attributes, as JSON text
    datetime,  # received_at
]
SPAN_COLUMNS: tuple[str, ...] = tuple(c.name for c in Span.__table__.columns if c.name != "id")
assert SPAN_COLUMNS[-1] == "received_at"  # the SQLite store converts the last field


def span_rows(
    request: ExportTraceServiceRequest, *, max_attribute_bytes: int, received_at: datetime
) -> list[SpanRow]:
    """One insert row per span; raises OtlpError(400) if any span is unusable (ids, times)."""
    rows: list[SpanRow] = []
    append = rows.append
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = _text(resource.get("service.name"), 63) or "unknown_service"
        namespace = _text(resource.get("service.namespace"), 63) or "default"
        version = _text(resource.get("service.version"), 63)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                parent = span.parent_span_id
                if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
                    raise OtlpError(400, "a span has no valid 16-byte trace id", "malformed")
                if len(span_id) != 8 or span_id == _ZERO_SPAN:
                    raise OtlpError(400, "a span has no valid 8-byte span id", "malformed")
                if parent and len(parent) != 8:
                    raise OtlpError(400, "a span's parent id is not 8 bytes", "malformed")
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if start > _MAX_INT64 or end > _MAX_INT64:
                    raise OtlpError(400, "a span's time is out of range", "malformed")
                attrs = _bounded_attributes(span.attributes, max_attribute_bytes)
                http_status = _http_status(attrs)
                status = span.status
                if status.message:
                    attrs["otel.status_description"] = status.message[:512]
                append(
                    (
                        trace_id.hex(),
                        span_id.hex(),
                        parent.hex() if parent and parent != _ZERO_SPAN else None,
                        span.name[:255],
                        span.kind,
                        service,
                        namespace,
                        version,
                        start,
                        end,
                        # A span whose clock ran backwards is stored with no duration, not < 0.
                        (end - start) / 1e6 if end > start else 0.0,
                        http_status,
                        status.code == _STATUS_ERROR
                        or (http_status is not None and http_status >= 500),
                        _json_dumps(attrs),
                        received_at,
                    )
                )
    return rows


def ingest_traces(
    session: Session, request: ExportTraceServiceRequest, *, max_attribute_bytes: int
) -> IngestResult:
    rows = span_rows(request, max_attribute_bytes=max_attribute_bytes, received_at=_now())
    store_spans(session, rows)
    return IngestResult(accepted=len(rows))


def store_spans(session: Session, rows: Sequence[SpanRow]) -> None:
    """Insert the rows in the session's transaction; a span sent twice (an exporter retrying
    after a lost response) is stored once."""
    if not rows:
        return
    # On the raw DBAPI connection, not through SQLAlchemy's parameter processing: per-row
    # processing by column name cost more than the database's own work (measured).
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        _store_spans_sqlite(connection, rows)
        return
    if connection.dialect.driver == "psycopg":
        _store_spans_copy(connection, rows)
        return
    statement = _insert(session, Span).on_conflict_do_nothing(
        index_elements=["trace_id", "span_id"]
    )
    connection.execute(
        statement,
        [
            {**dict(zip(SPAN_COLUMNS, row, strict=True)), "attributes": json.loads(row[-2])}
            for row in rows
        ],
    )


# Column names from the model, not input: the f-strings below are constants (hence noqa).
_COLUMN_LIST = ", ".join(SPAN_COLUMNS)
_SQLITE_INSERT = (
    f"INSERT INTO spans ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(SPAN_COLUMNS))}) "  # noqa: S608
    "ON CONFLICT (trace_id, span_id) DO NOTHING"
)


def _store_spans_sqlite(connection: Connection, rows: Sequence[SpanRow]) -> None:
    """executemany of one prepared INSERT … ON CONFLICT DO NOTHING with the tuples as they
    are; received_at, the one column that needs a conversion, is converted once per value
    (a request's rows share it) by the column's own type."""
    convert = _bind_processor(connection, cast(Table, Span.__table__).c.received_at)
    last: datetime | None = None
    stamp: Any = None
    params: list[tuple[Any, ...]] = []
    append = params.append
    for row in rows:
        at = row[-1]  # received_at
        if at is not last:
            last, stamp = at, convert(at)
        append((*row[:-1], stamp))
    connection.exec_driver_sql(_SQLITE_INSERT, params)


def _bind_processor(connection: Connection, column: Column[Any]) -> Callable[[Any], Any]:
    """Python value → what ``column`` stores, as SQLAlchemy would convert it (the decorator's
    and its impl's conversion: text on SQLite, an aware datetime for psycopg); one per dialect
    and column, for the bulk paths that go straight to the driver."""
    key = (id(connection.dialect), column.table.name, column.name)
    processor = _BIND_PROCESSORS.get(key)
    if processor is None:
        dialect = connection.dialect
        processor = column.type.dialect_impl(dialect).bind_processor(dialect) or _identity
        _BIND_PROCESSORS[key] = processor
    return processor


_BIND_PROCESSORS: dict[tuple[int, str, str], Callable[[Any], Any]] = {}

# PostgreSQL: COPY straight into spans, in a savepoint. COPY cannot skip a span that is already
# stored, so when one is (an exporter retried a batch whose answer it lost), the savepoint is
# rolled back and the batch goes the slow way: COPY into a per-connection staging table, then
# INSERT … SELECT … ON CONFLICT DO NOTHING. The staging round trip cost the database about as
# much again as the COPY itself, for every batch (measured); now only retried batches pay it.
_DIRECT_COPY = f"COPY spans ({_COLUMN_LIST}) FROM STDIN"
_STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS mesh_spans_in ON COMMIT DELETE ROWS AS "  # noqa: S608
    f"SELECT {_COLUMN_LIST} FROM spans WITH NO DATA"
)
_STAGING_COPY = f"COPY mesh_spans_in ({_COLUMN_LIST}) FROM STDIN"
_STAGING_MOVE = (
    f"INSERT INTO spans ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM mesh_spans_in "  # noqa: S608
    "ON CONFLICT (trace_id, span_id) DO NOTHING"
)


def _store_spans_copy(connection: Connection, rows: Sequence[SpanRow]) -> None:
    """The same INSERT … ON CONFLICT DO NOTHING as the generic path, fed by COPY (psycopg
    formats COPY rows in C)."""
    from psycopg.errors import UniqueViolation  # only ever imported with psycopg in use

    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor:
        cursor.execute("SAVEPOINT mesh_spans")
        try:
            with cursor.copy(_DIRECT_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
        except UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT mesh_spans")
        else:
            cursor.execute("RELEASE SAVEPOINT mesh_spans")
            return
        cursor.execute(_STAGING_DDL)
        with cursor.copy(_STAGING_COPY) as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(_STAGING_MOVE)
        # Emptied now, not only at commit: a caller may store twice in one transaction.
        cursor.execute("DELETE FROM mesh_spans_in")


def _identity(value: Any) -> Any:
    return value


_encode_json = json.JSONEncoder(ensure_ascii=False).encode


def _json_dumps(value: Any) -> str:
    return _encode_json(value)


def _bounded_attributes(pairs: Sequence[Any], max_bytes: int) -> dict[str, Any]:
    """Attributes as a dict of at most about ``max_bytes`` of JSON: long strings are cut, and
    past the budget the remaining keys are dropped and ``mesh.truncated`` says so.

    Written for speed (it runs for every attribute of every span): a non-empty string, the
    common case, is read straight off the protobuf without asking which kind the value is
    (WhichOneof cost more than the rest of the loop, measured); only nested values take the
    general path."""
    out: dict[str, Any] = {}
    budget = max_bytes
    longest = max(64, max_bytes // 4)
    for kv in pairs:
        key = kv.key
        wrapped = kv.value
        value: Any = wrapped.string_value
        if value:
            if len(value) > longest:
                value = value[:longest] + "…"
            budget -= len(key) + len(value) + 8
        else:
            kind = wrapped.WhichOneof("value")
            if kind == "string_value":
                budget -= len(key) + 8
            elif kind == "int_value" or kind == "bool_value" or kind == "double_value":
                value = getattr(wrapped, kind)
                budget -= len(key) + 24
            else:
                value = any_value(wrapped)
                if isinstance(value, list | dict):
                    encoded = json.dumps(value, default=str)
                    if len(encoded) > longest:
                        value = encoded[:longest] + "…"
                    budget -= len(key) + min(len(encoded), longest) + 8
                else:
                    budget -= len(key) + (len(value) if isinstance(value, str) else 24)
        if budget < 0:
            out["mesh.truncated"] = True
            break
        out[key if len(key) <= 255 else key[:255]] = value
    return out


def _http_status(attrs: dict[str, Any]) -> int | None:
    value = attrs.get("http.response.status_code", attrs.get("http.status_code"))
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 999:
        return value
    return None


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


# ---------------------------------------------------------------------------------------------
# Metrics → edge rollups

# (resolution_s, bucket_start, source ns, source service, source version,
#  dest ns, dest service, dest version): the rollup table's unique key, in column order.
RollupKey = tuple[int, datetime, str, str, str, str, str, str]


@dataclass
class RollupDelta:
    requests: int = 0
    failures: int = 0
    latency_sum_ms: float = 0.0
    latency_counts: list[int] = field(default_factory=histogram.empty)

    def add(self, requests: int, failures: int, sum_ms: float, counts: Sequence[int]) -> None:
        self.requests += requests
        self.failures += failures
        self.latency_sum_ms += sum_ms
        self.latency_counts = list(map(operator.add, self.latency_counts, counts))


@dataclass
class MetricsBatch:
    deltas: dict[RollupKey, RollupDelta]
    points: int  # data points received
    stored: int  # of which added to the rollups
    skipped: int  # of which deliberately not stored
    message: str


def rollup_deltas(request: ExportMetricsServiceRequest, *, now_ns: int) -> MetricsBatch:
    """The request's mesh.request.duration points, summed per rollup key at every resolution.

    Raises OtlpError(400) when a mesh.request.duration point cannot be used (cumulative
    temporality, foreign bounds, counts that do not add up, missing attributes). Other metrics
    are skipped and reported back as rejected in the partial success.
    """
    # (middle of the interval in s, source ns, service, version, dest ns, service, version)
    edges: dict[tuple[int, str, str, str, str, str, str], RollupDelta] = {}
    points = stored = skipped = 0
    notes: list[str] = []
    bounds = _BOUNDS
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        own_service = _text(resource.get("service.name"), 63)
        own_namespace = _text(resource.get("service.namespace"), 63) or "default"
        own_version = _text(resource.get("service.version"), 63)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                data = metric.WhichOneof("data")
                if metric.name != METRIC_NAME:
                    count = _point_count(metric, data)
                    points += count
                    skipped += count
                    if count and "other" not in notes:
                        notes.append("other")
                    continue
                if data != "histogram":
                    raise OtlpError(400, f"{METRIC_NAME} must be a histogram", "metric_shape")
                hist = metric.histogram
                if hist.aggregation_temporality != _DELTA:
                    raise OtlpError(
                        400,
                        f"{METRIC_NAME} must use DELTA temporality; convert cumulative series "
                        "first (e.g. the Collector's cumulativetodelta processor)",
                        "temporality",
                    )
                for point in hist.data_points:
                    points += 1
                    # Compared as the repeated field (a list copy per point cost more).
                    if point.explicit_bounds != bounds:
                        raise OtlpError(
                            400,
                            f"{METRIC_NAME} explicit bounds must be "
                            f"{list(histogram.LATENCY_BOUNDS_MS)} (ms)",
                            "metric_shape",
                        )
                    counts = list(point.bucket_counts)
                    count = point.count
                    if len(counts) != histogram.BUCKETS or sum(counts) != count:
                        raise OtlpError(
                            400,
                            f"{METRIC_NAME} bucket counts must be {histogram.BUCKETS} and add "
                            "up to count",
                            "metric_shape",
                        )
                    # Every attribute used here is read as a string (anything else counts as
                    # missing), so the string value is read straight off the protobuf: the
                    # general any_value() per attribute was half of what a report cost.
                    attrs = {kv.key: kv.value.string_value for kv in point.attributes}
                    status_class = attrs.get("mesh.status_class")
                    if status_class not in STATUS_CLASSES:
                        raise OtlpError(
                            400,
                            f"{METRIC_NAME} points need mesh.status_class, one of "
                            f"{sorted(STATUS_CLASSES)}",
                            "metric_shape",
                        )
                    # (Every value in attrs is a str: the protobuf's string_value, "" if unset.)
                    reporter = attrs.get("mesh.reporter", "source")
                    source = attrs.get("mesh.source.service", "")[:63]
                    if reporter == "destination":
                        if source not in UNKNOWN_SOURCES:
                            # The calling agent reports this request too, with both versions:
                            # keeping both views would count every meshed request twice.
                            skipped += 1
                            continue
                        source = ""
                        source_namespace = attrs.get("mesh.source.namespace", "")[:63]
                        source_version = ""
                        dest = attrs.get("mesh.destination.service", "")[:63] or own_service
                        dest_version = attrs.get("mesh.destination.version", "")[:63] or own_version
                    else:
                        source = source or own_service
                        source_namespace = (
                            attrs.get("mesh.source.namespace", "")[:63] or own_namespace
                        )
                        source_version = attrs.get("mesh.source.version", "")[:63] or own_version
                        dest = attrs.get("mesh.destination.service", "")[:63]
                        dest_version = attrs.get("mesh.destination.version", "")[:63]
                    dest_namespace = (
                        attrs.get("mesh.destination.namespace", "")[:63] or own_namespace
                    )
                    if not dest:
                        raise OtlpError(
                            400,
                            f"{METRIC_NAME} points need mesh.destination.service",
                            "metric_shape",
                        )
                    end = point.time_unix_nano or now_ns
                    start = point.start_time_unix_nano or end
                    if end > now_ns + _MAX_FUTURE_NS or start > end:
                        skipped += 1
                        if "time" not in notes:
                            notes.append("time")
                        continue
                    # The interval's midpoint: a 5 s delta straddling a 10 s boundary lands in
                    # the bucket that holds most of it.
                    middle_s = (start + end) // 2 // 1_000_000_000
                    failures = count if status_class in FAILURE_CLASSES else 0
                    total_ms = point.sum if point.HasField("sum") else 0.0
                    # An edge's status classes (2xx, 5xx, ...) are summed here once, not once
                    # per resolution; the resolutions' buckets are filled from the sums below.
                    edge = (
                        middle_s,
                        source_namespace,
                        source,
                        source_version,
                        dest_namespace,
                        dest,
                        dest_version,
                    )
                    summed = edges.get(edge)
                    if summed is None:
                        edges[edge] = RollupDelta(count, failures, total_ms, counts)
                    else:
                        summed.add(count, failures, total_ms, counts)
                    stored += 1
    deltas: dict[RollupKey, RollupDelta] = {}
    # A request's points mostly share their interval: each bucket's datetime is made once.
    bucket_times: dict[int, datetime] = {}
    for edge, summed in edges.items():
        middle_s = edge[0]
        for resolution in RESOLUTIONS_S:
            start_s = middle_s - middle_s % resolution
            bucket = bucket_times.get(start_s)
            if bucket is None:
                bucket = bucket_times[start_s] = datetime.fromtimestamp(start_s, UTC)
            key: RollupKey = (resolution, bucket, *edge[1:])
            delta = deltas.get(key)
            if delta is None:
                # Most keys are new in a request: made whole, not added to zeros (each with
                # its own list: no two deltas share one).
                deltas[key] = RollupDelta(
                    summed.requests,
                    summed.failures,
                    summed.latency_sum_ms,
                    summed.latency_counts[:],
                )
            else:
                delta.add(
                    summed.requests, summed.failures, summed.latency_sum_ms, summed.latency_counts
                )
    messages = {
        "other": f"only {METRIC_NAME} is stored; other metrics were dropped",
        "time": "points with a start after their end or a time in the future were dropped",
    }
    return MetricsBatch(deltas, points, stored, skipped, "; ".join(messages[n] for n in notes))


def ingest_metrics(session: Session, request: ExportMetricsServiceRequest) -> MetricsBatch:
    batch = rollup_deltas(request, now_ns=_now_ns())
    if batch.deltas:
        add_to_rollups(session, batch.deltas)
    return batch


def add_to_rollups(session: Session, deltas: dict[RollupKey, RollupDelta]) -> None:
    """Add the deltas to the stored rollups: insert new rows, add to existing ones.

    The histogram is a JSON array, added element-wise by the upsert itself with the database's
    JSON functions, so concurrent writers add up exactly. Writers are serialised all the same
    (SQLite's write transactions begin with the database lock; on PostgreSQL a
    transaction-scoped advisory lock): two of them upserting the same rows in another order
    would deadlock. Reads never wait for it.

    The statement goes to the DBAPI cursor with positional tuples: SQLAlchemy's processing of
    every parameter and every result value by name (datetimes, JSON) cost more than the
    database's work (measured, bench/telemetry.py).
    """
    if not deltas:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_ROLLUP_LOCK)))
    placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
    if placeholder == "%s" and dialect.driver != "psycopg":  # pragma: no cover
        raise RuntimeError(f"no rollup writer for {dialect.name}+{dialect.driver}")
    bucket_value = _bind_processor(connection, cast(Table, EdgeRollup.__table__).c.bucket_start)
    by_stored_key: dict[tuple[Any, ...], RollupDelta] = {}
    converted: dict[datetime, Any] = {}
    for key, delta in deltas.items():
        start = key[1]
        stored = converted.get(start)
        if stored is None:
            stored = converted[start] = bucket_value(start)
        by_stored_key[(key[0], stored, *key[2:])] = delta
    # The upsert adds to the stored row itself, the histogram element by element with the
    # database's JSON functions: no read of the stored rows first (finding them, fetching and
    # parsing them and merging here cost more than the upsert's additions, measured).
    connection.exec_driver_sql(
        _SQLITE_ADDING_UPSERT if placeholder == "?" else _POSTGRESQL_ADDING_UPSERT,
        [
            (
                *key,
                delta.requests,
                delta.failures,
                delta.latency_sum_ms,
                _encode_counts(delta.latency_counts),
            )
            for key, delta in by_stored_key.items()
        ],
    )


def _encode_counts(counts: list[int]) -> str:
    """A histogram's counts as the JSON array text json.dumps would give (compact): integers
    only, so joined directly; json.dumps cost several times as much per row (measured)."""
    return "[" + ",".join(map(str, counts)) + "]"


_ROLLUP_KEY_NAMES = (
    "resolution_s",
    "bucket_start",
    "source_namespace",
    "source_service",
    "source_version",
    "dest_namespace",
    "dest_service",
    "dest_version",
)
_ROLLUP_VALUE_NAMES = ("requests", "failures", "latency_sum_ms", "latency_counts")
_ROLLUP_COLUMN_LIST = ", ".join(_ROLLUP_KEY_NAMES + _ROLLUP_VALUE_NAMES)


def _adding_upsert(placeholder: str, element: str) -> str:
    """Insert, or add to the stored row; ``element`` is the SQL of a histogram element (with
    {table}, {i}), an element missing on either side counting as 0."""
    counts = ", ".join(
        f"coalesce({element.format(table='edge_rollups', i=i)}, 0) + "
        f"coalesce({element.format(table='excluded', i=i)}, 0)"
        for i in range(histogram.BUCKETS)
    )
    values = ", ".join([placeholder] * (len(_ROLLUP_KEY_NAMES) + len(_ROLLUP_VALUE_NAMES)))
    return (
        f"INSERT INTO edge_rollups ({_ROLLUP_COLUMN_LIST}) "  # noqa: S608 (column names only)
        f"VALUES ({values}) "
        f"ON CONFLICT ({', '.join(_ROLLUP_KEY_NAMES)}) DO UPDATE SET "
        "requests = edge_rollups.requests + excluded.requests, "
        "failures = edge_rollups.failures + excluded.failures, "
        "latency_sum_ms = edge_rollups.latency_sum_ms + excluded.latency_sum_ms, "
        f"latency_counts = {'json_array' if placeholder == '?' else 'jsonb_build_array'}({counts})"
    )


# The JSON text of the counts goes into a JSON column on SQLite and, cast by the server, a
# JSONB one on PostgreSQL.
_SQLITE_ADDING_UPSERT = _adding_upsert("?", "json_extract({table}.latency_counts, '$[{i}]')")
_POSTGRESQL_ADDING_UPSERT = _adding_upsert("%s", "({table}.latency_counts ->> {i})::bigint")


def _point_count(metric: Any, data: str | None) -> int:
    if data is None:
        return 0
    return len(getattr(metric, data).data_points)


def _insert(session: Session, model: type[Span] | type[EdgeRollup]) -> Any:
    table = cast(Table, model.__table__)
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _now() -> datetime:
    return datetime.now(UTC)


def _now_ns() -> int:
    return time.time_ns()
