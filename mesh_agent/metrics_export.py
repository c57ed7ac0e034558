"""RED metrics to the control plane: OTLP/HTTP protobuf delta histograms every few seconds.

Every ``interval_s`` the exporter copies the agent's cumulative counters (:meth:`Telemetry.
counters`), subtracts the copy it took last time and POSTs the difference as one OTLP metrics
request. Nothing of this runs on the request path: the proxy keeps incrementing plain lists;
the copy is a handful of C-level list copies, the encoding and the POST happen in a worker
thread. Protobuf rather than JSON: the receiver decodes it in C (JSON costs it ~50x more CPU per
request, measured), and the agent loads the same types for its span exporter anyway.

A failed export keeps its delta and adds the next one to it, so a control plane that is away
for a while loses nothing; past ``max_backlog_s`` the backlog is dropped (and logged), because
a delta that old would land in the wrong time bucket and memory must stay bounded.

Wire format (see docs/telemetry.md): histogram ``mesh.request.duration``, unit ms, DELTA
temporality, bounds ``BUCKETS_MS``, one data point per (source, destination, destination
version, status class) with attributes ``mesh.reporter``, ``mesh.source.service``,
``mesh.destination.service``, ``mesh.destination.version``, ``mesh.status_class``; the resource
names this agent (``service.name``, ``service.namespace``, ``service.version``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mesh_agent.telemetry import BUCKETS_MS, RepeatedLogFilter, Telemetry

__all__ = ["METRIC_NAME", "MetricsExporter", "metrics_url"]

log = logging.getLogger(__name__)
log.addFilter(RepeatedLogFilter())

METRIC_NAME = "mesh.request.duration"
_DELTA = 1  # AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_BOUNDS = [float(b) for b in BUCKETS_MS]
_WIDTH = 2 + len(BUCKETS_MS) + 1  # requests, sum (s), buckets…, overflow

Key = tuple[str, str, str, str]
# (url, body, headers, timeout) → HTTP status, or None when no response came back.
Poster = Callable[[str, bytes, Mapping[str, str], float], "int | None"]


def metrics_url(endpoint: str) -> str:
    """`/v1/metrics` beside the span endpoint: base URL or a `/v1/traces` URL both work."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if path.endswith("/v1/traces"):
        path = path[: -len("/v1/traces")]
    if not path.endswith("/v1/metrics"):
        path += "/v1/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int | None:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 (http(s) checked at start-up)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError) as exc:
        log.warning("metrics export to %s failed: %s", url, exc)
        return None


class MetricsExporter:
    def __init__(
        self,
        telemetry: Telemetry,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        interval_s: float = 5.0,
        timeout_s: float = 5.0,
        max_backlog_s: float = 300.0,
        post: Poster = _post,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.telemetry = telemetry
        self.url = metrics_url(endpoint)
        self.headers = {"Content-Type": "application/x-protobuf", **dict(headers or {})}
        # The span exporter has loaded protobuf and these types already whenever there is an
        # endpoint; imported here so an agent without one never pays for them.
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        self._message_type = ExportMetricsServiceRequest
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_backlog_ns = int(max_backlog_s * 1e9)
        self._post = post
        self._clock = clock_ns
        self._last: dict[Key, list[Any]] = {}
        self._pending: dict[Key, list[Any]] = {}
        self._pending_since = clock_ns()
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # guards _pending, _pending_since, _last
        self._send_lock = threading.Lock()
        self.exports = 0  # successful POSTs
        self.failures = 0
        self.dropped_points = 0

    # -- the delta ------------------------------------------------------------------------

    def collect(self) -> None:
        """Add what was counted since the last call to the pending delta.

        Call it from the thread that records (the event loop): a copy taken from another
        thread could catch a request counted but not yet put in its latency bucket."""
        counters = self.telemetry.counters()
        with self._lock:
            self._add_deltas(counters)

    def _add_deltas(self, counters: list[tuple[Key, list[Any]]]) -> None:
        pending = self._pending
        last = self._last
        for key, current in counters:
            previous = last.get(key)
            last[key] = current
            if previous is None:
                delta = current
            else:
                if current[0] == previous[0]:
                    continue
                delta = [c - p for c, p in zip(current, previous, strict=True)]
            if not delta[0]:
                continue
            into = pending.get(key)
            if into is None:
                pending[key] = list(delta)
            else:
                for i in range(_WIDTH):
                    into[i] += delta[i]

    def encode(self, end_ns: int) -> bytes:
        """The pending delta as a protobuf ExportMetricsServiceRequest."""
        with self._lock:
            return self._encode(self._pending, self._pending_since, end_ns)

    def _encode(self, pending: dict[Key, list[Any]], start_ns: int, end_ns: int) -> bytes:
        telemetry = self.telemetry
        own = (telemetry.service, telemetry.version)
        request = self._message_type()
        resource_metrics = request.resource_metrics.add()
        for key, value in (
            ("service.name", telemetry.service),
            ("service.namespace", telemetry.namespace),
            ("service.version", telemetry.version),
        ):
            attribute = resource_metrics.resource.attributes.add()
            attribute.key = key
            attribute.value.string_value = value
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.name = "mesh_agent"
        metric = scope_metrics.metrics.add()
        metric.name = METRIC_NAME
        metric.unit = "ms"
        metric.histogram.aggregation_temporality = _DELTA
        points = metric.histogram.data_points
        for (source, destination, dest_version, status_class), series in pending.items():
            reporter = (
                "destination"
                if (destination, dest_version) == own and source != telemetry.service
                else "source"
            )
            point = points.add()
            for key, value in (
                ("mesh.reporter", reporter),
                ("mesh.source.service", source),
                ("mesh.destination.service", destination),
                ("mesh.destination.version", dest_version),
                ("mesh.status_class", status_class),
            ):
                attribute = point.attributes.add()
                attribute.key = key
                attribute.value.string_value = value
            buckets = series[2:]
            point.start_time_unix_nano = start_ns
            point.time_unix_nano = end_ns
            point.count = sum(buckets)  # consistent with the buckets by construction
            point.sum = series[1] * 1000.0
            point.bucket_counts.extend(buckets)
            point.explicit_bounds.extend(_BOUNDS)
        body: bytes = request.SerializeToString()
        return body

    # -- exporting ------------------------------------------------------------------------

    def export(self) -> bool:
        """Collect and send (blocking): for callers on the recording thread, and tests."""
        self.collect()
        return self.send()

    def send(self) -> bool:
        """POST the pending delta (blocking; any thread). True when there was nothing to send
        or the receiver took it. A failed send puts its delta back, to go with the next one;
        a refusal of the data itself (4xx other than 408/429) drops it, since sending it again
        cannot succeed."""
        with self._send_lock:  # the timer's send and the last one at stop() never overlap
            now = self._clock()
            with self._lock:
                sent, since = self._pending, self._pending_since
                if not sent:
                    self._pending_since = now
                    return True
                if now - since > self.max_backlog_ns:
                    self._drop(sent, "older than the backlog limit")
                    return False
                body = self._encode(sent, since, now)
                self._pending, self._pending_since = {}, now
            status = self._post(self.url, body, self.headers, self.timeout_s)
            if status is not None and 200 <= status < 300:
                self.exports += 1
                return True
            self.failures += 1
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                log.warning(
                    "metrics export to %s refused with HTTP %s; delta dropped", self.url, status
                )
                with self._lock:
                    self._drop(sent, "refused")
                return False
            if status is not None:
                log.warning("metrics export to %s got HTTP %s; will retry", self.url, status)
            with self._lock:  # back in front of whatever was collected meanwhile
                for key, values in self._pending.items():
                    into = sent.get(key)
                    if into is None:
                        sent[key] = values
                    else:
                        for i in range(_WIDTH):
                            into[i] += values[i]
                self._pending, self._pending_since = sent, since
            return False

    def _drop(self, pending: dict[Key, list[Any]], why: str) -> None:
        self.dropped_points += len(pending)
        log.warning("dropping %d unsent metric points (%s)", len(pending), why)
        if pending is self._pending:
            self._pending = {}
            self._pending_since = self._clock()

    def start(self) -> None:
        """Export every ``interval_s`` on the running loop until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.collect()  # here, on the loop the proxy records on
                await loop.run_in_executor(None, self.send)
            except Exception:  # never let a bug here take the exporter (or the agent) down
                log.exception("metrics export failed unexpectedly")

    async def stop(self) -> None:
        """Stop the timer and make one last attempt with what is pending."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.collect()
        await asyncio.get_running_loop().run_in_executor(None, self.send)
