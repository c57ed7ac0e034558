"""The OTLP receiver's moving parts behind the routes: guards, decoding, and the writers.

Both kinds of export are group committed: a transaction costs about as much as the rows in it
(SQLite's commit writes and syncs every page it touched; PostgreSQL's syncs its WAL), so
requests that arrive while the previous transaction is being written share the next one.

Spans are decoded and stored in a worker process (``MESH_OTLP_WORKER_PROCESSES``). Span exports
that arrive while the worker is busy are sent to it together, as one call: it decodes and
checks each one on its own (a malformed one gets its 400 and stores nothing), stores the rows
of all the others in one transaction, and each request is answered once that commits.

Metric requests are small and frequent (1,000 agents every 10 s are 100 a second): each hands
its decoded deltas to one writer thread and waits for the transaction that stores them; the
writer takes everything queued while reports keep coming (up to 250 ms after the first) and
writes it in one transaction.

Either way a request is answered only once its data is committed, and a failed transaction
fails every request in it (they retry), so nothing is half stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
from sqlalchemy.exc import OperationalError

from app import metrics
from app.config import Settings
from app.db import Database, session_scope
from app.telemetry import ingest, otlp
from app.telemetry.throttle import ClientRateLimiter, IngestSlots

__all__ = ["Receiver", "RollupWriter", "SpanBatcher"]

log = logging.getLogger(__name__)

_transaction = contextmanager(session_scope)

# Metrics bodies up to this size are decoded on the event loop (see Receiver.store_metrics).
INLINE_DECODE_MAX_BYTES = 16 * 1024


class RollupWriter:
    """One thread that adds queued metric deltas to the rollups, many requests per commit."""

    def __init__(
        self,
        database: Database,
        *,
        linger_s: float = 0.25,
        quiet_s: float = 0.05,
        max_batch: int = 500,
    ) -> None:
        self._database = database
        self.linger_s = linger_s
        self.quiet_s = quiet_s
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[
            tuple[dict[ingest.RollupKey, ingest.RollupDelta], concurrent.futures.Future[None]]
            | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.commits = 0

    def submit(
        self, deltas: dict[ingest.RollupKey, ingest.RollupDelta]
    ) -> concurrent.futures.Future[None]:
        """A future that completes when the deltas are committed (or fails with the error)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rollup-writer", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((deltas, future))
        return future

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            # Linger for more while more keep coming: up to 250 ms while reports arrive less
            # than 50 ms apart, so 100 reports a second make transactions of about 25 (each
            # report cost half as much as in transactions of 5, measured), and a lone report
            # waits 50 ms at most. Agents do not mind the wait; the database minds the commits.
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch:
                remaining = min(deadline - time.monotonic(), self.quiet_s)
                try:
                    more = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._write(batch)
            if stop:
                return

    def _write(
        self,
        batch: list[
            tuple[dict[ingest.RollupKey, ingest.RollupDelta], concurrent.futures.Future[None]]
        ],
    ) -> None:
        merged: dict[ingest.RollupKey, ingest.RollupDelta] = {}
        for deltas, _ in batch:
            for key, delta in deltas.items():
                into = merged.get(key)
                if into is None:
                    merged[key] = into = ingest.RollupDelta()
                into.add(delta.requests, delta.failures, delta.latency_sum_ms, delta.latency_counts)
        try:
            with _transaction(self._database, write=True) as session:
                ingest.add_to_rollups(session, merged)
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        self.commits += 1
        for _, future in batch:
            future.set_result(None)


class Receiver:
    """Per-app state of the OTLP receiver."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.limiter = ClientRateLimiter(settings.otlp_rate_per_s, settings.otlp_burst)
        self.slots = IngestSlots(settings.otlp_max_concurrent, settings.otlp_max_waiting)
        self.writer = RollupWriter(database)
        self._processes: ProcessPoolExecutor | None = None
        self._span_batches: SpanBatcher | None = None
        if settings.otlp_worker_processes:
            self._processes = ProcessPoolExecutor(
                max_workers=settings.otlp_worker_processes,
                # Not fork: the console's process has threads (and locks held by them).
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(database.url, settings.model_dump(mode="json")),
            )
            # Started by the first span export, not here: most apps a test suite creates
            # never receive one, and spawning costs a second or more.
            self._span_batches = SpanBatcher(self._processes, settings.otlp_worker_processes)

    def close(self) -> None:
        self.writer.close()
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)

    async def store_traces(
        self, body: bytes, encoding: otlp.Encoding, content_encoding: str | None
    ) -> bytes:
        """Decode and store one trace export; the response body. In a worker process when
        there is one, else in a thread; either way this coroutine only waits."""
        limiter = self.slots.limiter
        if self._span_batches is not None:
            async with limiter:
                future = self._span_batches.submit((body, encoding, content_encoding))
                response, received, stored, seconds = await asyncio.wrap_future(future)
        else:
            work = partial(
                _store_traces, self.database, self.settings, body, encoding, content_encoding
            )
            response, received, stored, seconds = await anyio.to_thread.run_sync(
                work, limiter=limiter
            )
        metrics.SPANS_RECEIVED.inc(received)
        metrics.SPANS_STORED.inc(stored)
        metrics.INGEST_SECONDS.labels("traces").observe(seconds)
        return response

    async def store_metrics(
        self, body: bytes, encoding: otlp.Encoding, content_encoding: str | None
    ) -> bytes:
        """Decode one metrics export (in an ingest thread: it is cheap) and wait, without a
        thread, for the writer's commit that stores it; the response body."""
        started = time.perf_counter()
        if len(body) <= INLINE_DECODE_MAX_BYTES and not content_encoding:
            # An agent's report (a few edges, ~1 KiB) decodes in less time than the hop to a
            # thread and back costs; only larger or compressed bodies leave the event loop.
            batch = self._decode_metrics(body, encoding, content_encoding)
        else:
            decode = partial(self._decode_metrics, body, encoding, content_encoding)
            batch = await anyio.to_thread.run_sync(decode, limiter=self.slots.limiter)
        metrics.METRIC_POINTS_RECEIVED.inc(batch.points)
        if batch.deltas and self.settings.otlp_store:
            await asyncio.wrap_future(self.writer.submit(batch.deltas))
            metrics.METRIC_POINTS_STORED.inc(batch.stored)
        metrics.INGEST_SECONDS.labels("metrics").observe(time.perf_counter() - started)
        return otlp.encode_response(encoding, "metrics", batch.points - batch.stored, batch.message)

    def _decode_metrics(
        self, body: bytes, encoding: otlp.Encoding, content_encoding: str | None
    ) -> ingest.MetricsBatch:
        data = otlp.decompress(body, content_encoding, self.settings.otlp_max_bytes)
        return ingest.rollup_deltas(otlp.decode_metrics(data, encoding), now_ns=time.time_ns())


TraceExport = tuple[bytes, otlp.Encoding, str | None]  # body, encoding, content encoding
# (response body, spans received, spans stored, seconds taken)
TraceResult = tuple[bytes, int, int, float]
Waiting = list[tuple[TraceExport, concurrent.futures.Future[TraceResult]]]


def _store_traces(
    database: Database,
    settings: Settings,
    body: bytes,
    encoding: otlp.Encoding,
    content_encoding: str | None,
) -> TraceResult:
    """One export decoded and stored in its own transaction; raises OtlpError."""
    (result,) = _store_trace_batch(database, settings, [(body, encoding, content_encoding)])
    if isinstance(result, Exception):
        raise result
    return result


def _store_trace_batch(
    database: Database, settings: Settings, exports: Sequence[TraceExport]
) -> list[TraceResult | Exception]:
    """Each export decoded and checked on its own, the rows of all good ones stored in one
    transaction: per export its result, or the OtlpError it is refused with (an export that
    is refused stores nothing; a failed transaction fails them all)."""
    results: list[TraceResult | Exception] = []
    batch: list[ingest.SpanRow] = []
    received_at = datetime.now(UTC)
    for body, encoding, content_encoding in exports:
        started = time.perf_counter()
        try:
            data = otlp.decompress(body, content_encoding, settings.otlp_max_bytes)
            request = otlp.decode_traces(data, encoding)
            rows = ingest.span_rows(
                request,
                max_attribute_bytes=settings.span_attributes_max_bytes,
                received_at=received_at,
            )
        except otlp.OtlpError as exc:
            results.append(exc)
            continue
        batch += rows
        stored = len(rows) if settings.otlp_store else 0
        response = otlp.encode_response(encoding, "traces")
        results.append((response, len(rows), stored, time.perf_counter() - started))
    if batch and settings.otlp_store:
        started = time.perf_counter()
        with _transaction(database, write=True) as session:
            ingest.store_spans(session, batch)
        shared = time.perf_counter() - started
        results = [
            (r[0], r[1], r[2], r[3] + shared) if not isinstance(r, Exception) else r
            for r in results
        ]
    return results


class SpanBatcher:
    """Sends span exports to the worker processes, those that wait as one call.

    At most one call per worker process is in flight; exports that arrive meanwhile queue
    here and go together in the next call, which the worker stores in one transaction (up to
    ``max_batch`` exports: bounded memory and latency). Thread-safe: futures complete from
    the pool's own thread, and each request awaits its own concurrent future."""

    def __init__(self, pool: ProcessPoolExecutor, in_flight: int, *, max_batch: int = 16) -> None:
        self._pool = pool
        self._max_in_flight = in_flight
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: Waiting = []
        self._in_flight = 0
        self.calls = 0

    def submit(self, export: TraceExport) -> concurrent.futures.Future[TraceResult]:
        future: concurrent.futures.Future[TraceResult] = concurrent.futures.Future()
        with self._lock:
            self._waiting.append((export, future))
            batch = self._take()
        if batch:
            self._send(batch)
        return future

    def _take(self) -> Waiting:
        """The next batch to send, if a call may start now (called with the lock held)."""
        if not self._waiting or self._in_flight >= self._max_in_flight:
            return []
        batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
        self._in_flight += 1
        self.calls += 1
        return batch

    def _send(self, batch: Waiting) -> None:
        try:
            call = self._pool.submit(_store_traces_in_worker, [export for export, _ in batch])
        except Exception as exc:  # the pool is shut down or broken
            self._finish(batch, exc, [])
            return
        call.add_done_callback(partial(self._done, batch))

    def _done(
        self,
        batch: Waiting,
        call: concurrent.futures.Future[list[TraceResult | Exception]],
    ) -> None:
        if call.cancelled():
            self._finish(batch, concurrent.futures.CancelledError(), [])
            return
        error = call.exception()
        self._finish(batch, error, [] if error is not None else call.result())

    def _finish(
        self,
        batch: Waiting,
        error: BaseException | None,
        results: list[TraceResult | Exception],
    ) -> None:
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            outcome = error if error is not None else results[i]
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        with self._lock:
            self._in_flight -= 1
            following = self._take()
        if following:
            self._send(following)


# -- the worker process ------------------------------------------------------------------------

_worker: tuple[Database, Settings] | None = None


def _start_worker(database_url: str, settings: dict[str, Any]) -> None:
    global _worker
    # The console's process handles Ctrl-C and shuts the pool down; the worker must not die
    # half-way through a transaction because the terminal's SIGINT reached it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = (Database(database_url), Settings(**settings))
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A console killed outright (SIGKILL, OOM) cannot shut its pool down; its workers would
    live on as orphans. Each one leaves when its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _store_traces_in_worker(exports: list[TraceExport]) -> list[TraceResult | Exception]:
    assert _worker is not None
    database, settings = _worker
    try:
        return _store_trace_batch(database, settings, exports)
    except OperationalError:
        # Database errors do not all survive pickling; what the sender needs is "retry".
        busy = otlp.OtlpError(503, "the database is busy; retry later", "database_busy")
        return [busy] * len(exports)
