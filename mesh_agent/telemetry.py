"""What the agent sees: W3C trace context, spans exported over OTLP/HTTP, RED metrics.

The proxy calls into this module on every request, so the per-request paths (`record`,
`start_span` when unsampled, `outgoing_traceparent`) use plain dicts, lists and one regex, and
the OTLP message types are imported only when spans have somewhere to go (an OTLP endpoint).
Without an endpoint a sampled request still gets fresh span ids, so trace ids and the sampled
flag keep flowing across hops even if this agent exports nothing.

Prometheus text is rendered here rather than through a prometheus_client custom collector: the
scrape runs on the event loop, between requests, and for 200 series the collector path took
~33 ms against ~1 ms here (measured), which would show up directly in the proxy's p99.

Not thread-safe by design: call everything from the event loop thread. A scrape from another
thread sees a consistent-enough copy (each series is copied before it is rendered).
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from mesh_agent.ids import (
    ZERO_SPAN_ID,
    ZERO_TRACE_ID,
    new_span_id,
    new_trace_id,
    new_unsampled_traceparent,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BUCKETS_MS",
    "MAX_SOURCES",
    "OTHER_SOURCE",
    "Span",
    "Telemetry",
    "TraceContext",
    "parse_traceparent",
    "status_class",
]

#: Upper bounds of the latency histogram buckets, in milliseconds (an implicit +Inf follows).
BUCKETS_MS: Final[tuple[int, ...]] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_BOUNDS_S: Final[tuple[float, ...]] = tuple(b / 1000 for b in BUCKETS_MS)
_LE: Final[tuple[str, ...]] = (*(repr(b) for b in _BOUNDS_S), "+Inf")

# A hostile or buggy caller could mint endless label values (e.g. a spoofed source name); past
# this many series new edges are folded into one, so memory and scrape size stay bounded.
MAX_SERIES = 10_000  # not Final: tests lower it (read only when a series is new)
_OVERFLOW: Final = "_overflow"

# The source label comes from the caller's `x-mesh-source` header, which anyone can set: only
# names shaped like a service name get a label of their own, and only the first MAX_SOURCES of
# them; every other value is counted under OTHER_SOURCE, so spoofing cannot crowd out real edges.
MAX_SOURCES = 256  # not Final: tests lower it (read only when a source is new)
OTHER_SOURCE: Final = "other"
_SOURCE_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# Layout of a series as `counters` and `_rows` hand it out: [requests, duration sum (s),
# per-bucket count x len(_BOUNDS_S), +Inf count]. Buckets are kept non-cumulative so that
# `record` touches one slot; scrapes accumulate.
_REQ: Final = 0
_SUM: Final = 1
_BUCKET0: Final = 2

# Index by status code: one list lookup instead of arithmetic and branches per request.
# Codes below 100 cannot come from a valid response; count them with the failures.
_CLASS_BY_STATUS: Final[tuple[str, ...]] = tuple(
    "5xx" if code < 100 else f"{code // 100}xx" for code in range(600)
)
_FAILURE_CLASSES: Final = frozenset({"5xx", "none"})


def status_class(status: int | None) -> str:
    """`2xx` … `5xx` for a response status, `none` when no response arrived."""
    if status is None:
        return "none"
    if 0 <= status < 600:
        return _CLASS_BY_STATUS[status]
    return "5xx"


# ---------------------------------------------------------------------------------------------
# W3C trace context


class TraceContext:
    """A parsed, valid `traceparent`: lowercase hex ids as bytes, flags as an int.

    A plain class, not a NamedTuple: compiled, it is made without a Python-level ``__new__``
    (an inbound agent makes one per request)."""

    __slots__ = ("flags", "parent_id", "trace_id")

    def __init__(self, trace_id: bytes, parent_id: bytes, flags: int) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.flags = flags

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceContext):
            return NotImplemented
        return (self.trace_id, self.parent_id, self.flags) == (
            other.trace_id,
            other.parent_id,
            other.flags,
        )

    def __hash__(self) -> int:
        return hash((self.trace_id, self.parent_id, self.flags))

    def __repr__(self) -> str:
        return f"TraceContext({self.trace_id!r}, {self.parent_id!r}, {self.flags})"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)


# version-traceid-parentid-flags; versions after 00 may append "-more" that we must ignore.
_TRACEPARENT: Final = re.compile(
    rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\r\n]*)?"
)
_LOWER_HEX_AND_DASH: Final = b"0123456789abcdef-"
_FLAGS: Final = {b"%02x" % flags: flags for flags in range(256)}


def parse_traceparent(value: bytes | None) -> TraceContext | None:
    """Parse a `traceparent` header value; None when absent or invalid (W3C Trace Context §3.2).

    Invalid means: not `2hex-32hex-16hex-2hex` in lowercase, version `ff`, all-zero trace or
    parent id, or a version-00 value with anything after the flags.
    """
    if not value:
        return None
    if (
        len(value) == 55
        and value[2] == 0x2D
        and value[35] == 0x2D
        and value[52] == 0x2D
        and value.count(b"-") == 3
        and not value.translate(None, _LOWER_HEX_AND_DASH)
    ):
        # The form every hop of this mesh sends (version 00, nothing after the flags), checked
        # without the regex: an inbound agent parses one per request.
        version = value[0:2]
        trace_id = value[3:35]
        parent_id = value[36:52]
        if version == b"ff" or trace_id == ZERO_TRACE_ID or parent_id == ZERO_SPAN_ID:
            return None
        return TraceContext(trace_id, parent_id, _FLAGS[value[53:55]])
    match = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == b"ff" or (rest is not None and version == b"00"):
        return None
    if trace_id == ZERO_TRACE_ID or parent_id == ZERO_SPAN_ID:
        return None
    return TraceContext(trace_id, parent_id, int(flags, 16))


_random: Final = random.random


# ---------------------------------------------------------------------------------------------
# Spans


class Span:
    """One sampled hop. `traceparent()` is the header to send upstream (a child of this span)."""

    __slots__ = ("_header", "_record", "_tracing", "span_id", "trace_id")

    def __init__(
        self,
        trace_id: bytes,
        span_id: bytes,
        record: list[Any] | None = None,
        tracing: _Tracing | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self._header = b"00-" + trace_id + b"-" + span_id + b"-01"
        self._record = record  # what the exporter sends once the span ends
        self._tracing = tracing

    def traceparent(self) -> bytes:
        return self._header

    def describe(self, name: str, attributes: dict[str, str]) -> None:
        """Name the span and give it its attributes (after ``Telemetry.begin``, which leaves
        them out so that an unsampled request never builds them)."""
        record = self._record
        if record is not None:
            record[0] = name
            record[6] = attributes

    def end(self, status: int | None) -> None:
        """Close the span; `status` None means no response arrived. Safe to call twice."""
        record, self._record = self._record, None
        if record is not None and self._tracing is not None:
            self._tracing.end(record, status)


class RepeatedLogFilter(logging.Filter):
    """Lets one record of each kind through per interval and counts the rest.

    With the collector down, the OTLP exporter logs a warning for every batch (once a second);
    an operator needs to know the export fails, not to read it 3,600 times an hour.
    """

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval = interval_s
        self._clock = clock
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like this suppressed)"
        return True


_log = logging.getLogger(__name__)
_log.addFilter(RepeatedLogFilter())

# The attributes of a span begun but not yet described (never mutated: ``describe`` replaces it).
_UNDESCRIBED: Final[dict[str, str]] = {}
_SPAN_KIND: Final = {"server": 2, "client": 3}  # opentelemetry.proto.trace.v1.Span.SpanKind
_STATUS_ERROR: Final = 2  # opentelemetry.proto.trace.v1.Status.StatusCode.STATUS_CODE_ERROR
_MAX_QUEUED_SPANS: Final = 4096
_EXPORT_BATCH: Final = 512  # a batch this big is sent at once rather than after the delay


class _Tracing:
    """Finished spans, batched and sent over OTLP/HTTP (protobuf) from one daemon thread.

    The messages are built with the official OTLP types (``opentelemetry-proto``, which the
    metrics exporter loads anyway) rather than through the OpenTelemetry SDK: the SDK and its
    HTTP exporter (requests, urllib3) cost ~8 MB of RSS (measured) and an object graph per span,
    for what is a list of finished spans and a POST. Export never pushes back on the proxy: the
    queue is bounded and drops when full. Imported only when there is an endpoint.
    """

    def __init__(
        self,
        *,
        service: str,
        version: str,
        namespace: str,
        endpoint: str,
        batch_delay_ms: int,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2

        # Any: compiled (mypyc) classes cannot hold a module-typed attribute
        self._pb_trace: Any = trace_pb2
        self._pb_common: Any = common_pb2
        self._request_type = trace_service_pb2.ExportTraceServiceRequest
        self._resource = resource_pb2.Resource(
            attributes=[
                self._attribute(k, v)
                for k, v in (
                    ("service.name", service),
                    ("service.version", version),
                    ("service.namespace", namespace),
                )
            ]
        )
        self._scope = common_pb2.InstrumentationScope(name="mesh_agent")
        self._url = _traces_url(endpoint)
        self._headers = {"Content-Type": "application/x-protobuf", **dict(headers or {})}
        self._timeout_s = timeout_s
        self._delay_s = batch_delay_ms / 1000.0
        self._lock = threading.Lock()  # guards _queue (the loop appends, the thread takes)
        self._queue: list[list[Any]] = []
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self._exporter_thread = threading.Thread(
            target=self._run, name="mesh-agent-spans", daemon=True
        )
        self._exporter_thread.start()

    def _attribute(self, key: str, value: str | int) -> Any:
        common = self._pb_common
        if isinstance(value, int):
            return common.KeyValue(key=key, value=common.AnyValue(int_value=value))
        return common.KeyValue(key=key, value=common.AnyValue(string_value=value))

    def start(
        self, name: str, kind: str, parent: TraceContext | None, attributes: Mapping[str, str]
    ) -> Span:
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        span_id = new_span_id()
        parent_id = parent.parent_id if parent is not None else None
        # [name, kind, trace id, span id, parent id, start ns, attributes, end ns, status]
        record: list[Any] = [name, kind, trace_id, span_id, parent_id, time.time_ns(), attributes]
        return Span(trace_id, span_id, record, self)

    def end(self, record: list[Any], status: int | None) -> None:
        record += (time.time_ns(), status)
        with self._lock:
            if len(self._queue) >= _MAX_QUEUED_SPANS:
                self.dropped += 1
                return
            self._queue.append(record)
            full = len(self._queue) >= _EXPORT_BATCH
        if full:
            self._wake.set()

    def _message(self, batch: list[list[Any]]) -> bytes:
        trace = self._pb_trace
        spans = []
        for name, kind, trace_id, span_id, parent_id, start_ns, attributes, end_ns, status in batch:
            attrs = [self._attribute(k, v) for k, v in attributes.items()]
            if status is not None:
                attrs.append(self._attribute("http.response.status_code", status))
            spans.append(
                trace.Span(
                    trace_id=bytes.fromhex(trace_id.decode()),
                    span_id=bytes.fromhex(span_id.decode()),
                    parent_span_id=bytes.fromhex(parent_id.decode()) if parent_id else b"",
                    name=name,
                    kind=_SPAN_KIND[kind],
                    start_time_unix_nano=start_ns,
                    end_time_unix_nano=end_ns,
                    attributes=attrs,
                    status=trace.Status(code=_STATUS_ERROR)
                    if status is None or status >= 500
                    else None,
                )
            )
        request = self._request_type(
            resource_spans=[
                trace.ResourceSpans(
                    resource=self._resource,
                    scope_spans=[trace.ScopeSpans(scope=self._scope, spans=spans)],
                )
            ]
        )
        body: bytes = request.SerializeToString()
        return body

    def _send(self, batch: list[list[Any]]) -> None:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(  # noqa: S310 (http(s) checked at start-up)
            self._url, data=self._message(batch), headers=self._headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            _log.warning("span export to %s got HTTP %s", self._url, exc.code)
        except (OSError, ValueError) as exc:
            _log.warning("span export to %s failed: %s", self._url, exc)

    def _take(self) -> list[list[Any]]:
        with self._lock:
            batch, self._queue = self._queue, []
        return batch

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            stopping = self._stopping
            batch = self._take()
            while batch:
                try:
                    self._send(batch[:_EXPORT_BATCH])
                except Exception:  # never let a bug here end the export for good
                    _log.exception("span export failed unexpectedly")
                batch = batch[_EXPORT_BATCH:]
            if stopping:
                return

    def shutdown(self) -> None:
        """Send what is queued (blocks up to the export timeout per batch) and stop."""
        self._stopping = True
        self._wake.set()
        self._exporter_thread.join()


def _traces_url(endpoint: str) -> str:
    """Accept a collector base URL (`http://host:4318`) or the full `/v1/traces` URL."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


# ---------------------------------------------------------------------------------------------
# Prometheus text exposition


def _escape(value: str) -> str:
    # Text format 0.0.4: inside label values only backslash, double quote and newline escape.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _edge_labels(source: str, destination: str, destination_version: str) -> str:
    return (
        f'source="{_escape(source)}",destination="{_escape(destination)}",'
        f'destination_version="{_escape(destination_version)}"'
    )


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# ---------------------------------------------------------------------------------------------


class _Series:
    """One edge's counters. A class, not a list: compiled, each update in `Telemetry.record`
    is a field or list-slot add on known types rather than a generic one."""

    __slots__ = ("buckets", "requests", "sum_s")

    def __init__(self) -> None:
        self.requests = 0
        self.sum_s = 0.0
        self.buckets = [0] * (len(_BOUNDS_S) + 1)  # non-cumulative; the last one is +Inf

    def copy(self) -> list[Any]:
        """[requests, duration sum (s), the buckets...] (the layout `counters` hands out)."""
        return [self.requests, self.sum_s, *self.buckets]


class Telemetry:
    """Traces and RED metrics for one agent (one service instance)."""

    def __init__(
        self,
        *,
        service: str,
        version: str,
        namespace: str,
        sampling_ratio: float,
        otlp_endpoint: str | None,
        batch_delay_ms: int = 1000,
        otlp_headers: Mapping[str, str] | None = None,
    ) -> None:
        """`sampling_ratio` in [0, 1] applies only to requests that arrive without a decision.

        `otlp_endpoint` is a collector base URL or the full `/v1/traces` URL; None exports
        nothing (ids are still propagated). `batch_delay_ms` is how long finished spans may wait
        before a batch is sent. `otlp_headers` go with every export (e.g. `Authorization`).
        """
        if not 0.0 <= sampling_ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"sampling_ratio must be within [0, 1], got {sampling_ratio!r}")
        if error := _check_endpoint(otlp_endpoint):
            raise ValueError(error)
        self.service = service
        self.version = version
        self.namespace = namespace
        self.sampling_ratio = sampling_ratio
        self.otlp_endpoint = otlp_endpoint
        self.otlp_headers: dict[str, str] = dict(otlp_headers or {})
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._sources: set[str] = {service}
        self._tracing: _Tracing | None = None
        # The proxy asks start_span, then (unsampled) outgoing_traceparent about the same
        # header: the second call reuses the first one's parse.
        self._parsed_header: bytes | None = None
        self._parsed_context: TraceContext | None = None
        if otlp_endpoint:
            self._tracing = _Tracing(
                service=service,
                version=version,
                namespace=namespace,
                endpoint=otlp_endpoint,
                batch_delay_ms=batch_delay_ms,
                headers=self.otlp_headers,
            )

    # -- metrics --------------------------------------------------------------------------

    def record(
        self,
        source: str,
        destination: str,
        destination_version: str,
        status: int | None,
        duration_s: float,
    ) -> None:
        """Count one finished request. `status` None means no response arrived (a failure)."""
        if status is None:
            cls = "none"
        elif 0 <= status < 600:
            cls = _CLASS_BY_STATUS[status]
        else:
            cls = "5xx"
        if source not in self._sources:
            source = self._admit_source(source)
        key = (source, destination, destination_version, cls)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        if duration_s < 0.0:  # a clock that stepped back must not corrupt the sum
            duration_s = 0.0
        series.requests += 1
        series.sum_s += duration_s
        # The first bound >= the duration (bisect_left), found by a compiled loop: most
        # requests land in the first buckets, and calling bisect cost more than the loop.
        bucket = 0
        for bound in _BOUNDS_S:
            if duration_s <= bound:
                break
            bucket += 1
        series.buckets[bucket] += 1

    def _admit_source(self, source: str) -> str:
        if len(self._sources) >= MAX_SOURCES or not _SOURCE_NAME.fullmatch(source):
            return OTHER_SOURCE
        self._sources.add(source)
        return source

    def _new_series(self, key: tuple[str, str, str, str]) -> _Series:
        if len(self._series) >= MAX_SERIES:
            key = (_OVERFLOW, _OVERFLOW, _OVERFLOW, key[3])
            existing = self._series.get(key)
            if existing is not None:
                return existing
        series = self._series[key] = _Series()
        return series

    def _rows(self) -> list[tuple[tuple[str, str, str, str], list[Any]]]:
        # list() is a single C call, so a concurrent `record` cannot make iteration fail; the
        # rollup is then computed from copies (compiled, a copy is not interrupted by `record`).
        return sorted((key, series.copy()) for key, series in list(self._series.items()))

    def counters(self) -> list[tuple[tuple[str, str, str, str], list[Any]]]:
        """Copies of the cumulative counters, one per (source, destination, destination_version,
        status_class): ``[requests, duration sum (s), one count per bucket of BUCKETS_MS, the
        count above the last bound]`` (buckets not cumulative). For exporters taking deltas."""
        return self._rows()

    def snapshot(self) -> list[dict[str, Any]]:
        """The RED rollup, one dict per (source, destination, destination_version, status_class).

        Counters are cumulative since this object was created, like Prometheus counters; the
        receiver takes differences between two snapshots to get a window. Shape (JSON-ready)::

            {"source": "web", "destination": "reviews", "destination_version": "v2",
             "status_class": "2xx",            # 1xx..5xx, or "none" when no response arrived
             "requests": 120,
             "failures": 0,                    # requests with status >= 500 or no response
             "latency": {"buckets_ms": [1, 2, 5, ..., 10000],   # upper bounds (le)
                         "cumulative": [3, 40, ..., 120],       # requests <= each bound
                         "count": 120,                          # the +Inf bucket
                         "sum_s": 0.84}}
        """
        out: list[dict[str, Any]] = []
        for (source, destination, dest_version, cls), series in self._rows():
            requests = series[_REQ]
            cumulative: list[int] = []
            running = 0
            for count in series[_BUCKET0 : _BUCKET0 + len(_BOUNDS_S)]:
                running += count
                cumulative.append(running)
            out.append(
                {
                    "source": source,
                    "destination": destination,
                    "destination_version": dest_version,
                    "status_class": cls,
                    "requests": requests,
                    "failures": requests if cls in _FAILURE_CLASSES else 0,
                    "latency": {
                        "buckets_ms": list(BUCKETS_MS),
                        "cumulative": cumulative,
                        "count": requests,
                        "sum_s": series[_SUM],
                    },
                }
            )
        return out

    def prometheus_text(self) -> bytes:
        """Prometheus text exposition format 0.0.4 (`text/plain; version=0.0.4`)."""
        rows = self._rows()
        requests: list[str] = []
        failures: dict[str, int] = {}
        histogram: list[str] = []
        for (source, destination, dest_version, cls), series in rows:
            edge = _edge_labels(source, destination, dest_version)
            labels = f'{edge},status_class="{cls}"'
            count = series[_REQ]
            requests.append(f"mesh_requests_total{{{labels}}} {count}\n")
            # Every edge gets a failures sample, zero included, so rate() ratios work at once.
            failures[edge] = failures.get(edge, 0) + (count if cls in _FAILURE_CLASSES else 0)
            running = 0
            for le, bucket in zip(_LE, series[_BUCKET0:], strict=True):
                running += bucket
                histogram.append(
                    f'mesh_request_duration_seconds_bucket{{{labels},le="{le}"}} {running}\n'
                )
            histogram.append(
                f"mesh_request_duration_seconds_sum{{{labels}}} {_number(series[_SUM])}\n"
            )
            histogram.append(f"mesh_request_duration_seconds_count{{{labels}}} {count}\n")
        info = (
            f'service="{_escape(self.service)}",version="{_escape(self.version)}",'
            f'namespace="{_escape(self.namespace)}"'
        )
        parts = [
            "# HELP mesh_agent_info The service instance this agent serves.\n",
            "# TYPE mesh_agent_info gauge\n",
            f"mesh_agent_info{{{info}}} 1\n",
            "# HELP mesh_requests_total Requests proxied, by edge and status class"
            " (none = no response).\n",
            "# TYPE mesh_requests_total counter\n",
            *requests,
            "# HELP mesh_request_failures_total Failed requests (5xx or no response), by edge.\n",
            "# TYPE mesh_request_failures_total counter\n",
            *(f"mesh_request_failures_total{{{edge}}} {n}\n" for edge, n in failures.items()),
            "# HELP mesh_request_duration_seconds Request latency as seen by the agent.\n",
            "# TYPE mesh_request_duration_seconds histogram\n",
            *histogram,
        ]
        return "".join(parts).encode()

    # -- tracing --------------------------------------------------------------------------

    def start_span(
        self,
        *,
        name: str,
        kind: str,
        traceparent: bytes | None,
        attributes: dict[str, str],
    ) -> Span | None:
        """Start this hop's span, or return None when the request is not sampled.

        A valid incoming `traceparent` decides (flag 01 → span, 00 → none) and becomes the
        parent, so the trace id is kept; otherwise (absent or malformed) the head-sampling ratio
        decides and a sampled span starts a new trace. `kind` is "server" or "client".
        """
        if kind not in ("server", "client"):
            raise ValueError(f"span kind must be 'server' or 'client', got {kind!r}")
        parent = None
        if traceparent:
            parent = parse_traceparent(traceparent)
            self._parsed_header = traceparent
            self._parsed_context = parent
        if parent is not None:
            if not parent.flags & 0x01:
                return None
        else:
            ratio = self.sampling_ratio
            if ratio <= 0.0 or (ratio < 1.0 and _random() >= ratio):
                return None
        if self._tracing is not None:
            return self._tracing.start(name, kind, parent, attributes)
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        return Span(trace_id, new_span_id())

    def begin(self, kind: str, traceparent: bytes | None) -> tuple[Span | None, bytes | None]:
        """For the proxy, once per hop: this hop's span (None when not sampled), unnamed and
        without attributes until ``Span.describe``, and the ``traceparent`` to send upstream
        (``Span.traceparent`` or ``outgoing_traceparent``)."""
        span = self.start_span(name="", kind=kind, traceparent=traceparent, attributes=_UNDESCRIBED)
        if span is not None:
            return span, span.traceparent()
        return None, self.outgoing_traceparent(traceparent)

    def outgoing_traceparent(self, incoming: bytes | None) -> bytes | None:
        """The `traceparent` to send upstream for a request without a span of ours.

        A valid incoming value passes through with its trace id, parent id and decision (this
        agent adds no span, so the caller's span stays the parent); a later version is rewritten
        as version 00. Absent or malformed → a new trace id, flag 00 (not sampled), so the hops
        downstream still share one id. Never None today; None is reserved for "send nothing".
        """
        if not incoming:
            return new_unsampled_traceparent()
        if incoming is self._parsed_header:
            parent = self._parsed_context
        else:
            parent = parse_traceparent(incoming)
        if parent is None:
            return new_unsampled_traceparent()
        if parent.flags <= 0x01 and len(incoming) == 55 and incoming[:3] == b"00-":
            return incoming  # already exactly what we would send
        return b"00-%b-%b-%02x" % (parent.trace_id, parent.parent_id, parent.flags & 0x01)

    def shutdown(self) -> None:
        """Flush and stop the span exporter (blocks up to its timeout). Idempotent."""
        tracing, self._tracing = self._tracing, None
        if tracing is not None:
            tracing.shutdown()


def _check_endpoint(endpoint: str | None) -> str | None:
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"otlp_endpoint must be an http(s) URL, got {endpoint!r}"
    return None
