"""The OTLP receiver's moving parts behind the routes: guards, decoding, and the writers.

Both kinds of export are group committed: a transaction costs about as much as the rows in it
(SQLite's commit writes and syncs every page it touched; PostgreSQL's syncs its WAL), so
requests that arrive while the previous transaction is being written share the next one.

Spans are decoded and stored in a worker process (``MESH_OTLP_WORKER_PROCESSES``). It takes
every export that arrived while it wrote the last transaction, decodes and checks each one on
its own (a malformed one gets its 400 and stores nothing), stores the rows of all the others
in one transaction, and each request is answered once that commits.

Metric requests are small and frequent (1,000 agents every 10 s are 100 a second): each hands
its body to one writer thread and waits for the transaction that stores it; the writer takes
everything queued while reports keep coming (up to 250 ms after the first), decodes it (a
malformed report gets its 400 and stores nothing) and writes the rest in one transaction.

Either way a request is answered only once its data is committed, and a failed transaction
fails every request in it (they retry), so nothing is half stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from app import metrics
from app.config import Settings
from app.db import Database, session_scope
from app.telemetry import ingest, otlp
from app.telemetry.throttle import ClientRateLimiter, IngestSlots

__all__ = ["Receiver", "RollupWriter", "SpanWorker"]

log = logging.getLogger(__name__)

_transaction = contextmanager(session_scope)


# What a metrics report gets back from the writer: (points received, points stored, message
# for OTLP's partial success).
ReportResult = tuple[int, int, str]


class _Report:
    """One metrics report in the writer's queue: a body still to decode (the receiver's) or
    deltas already made (:meth:`RollupWriter.submit`), and whom to tell when it is stored."""

    __slots__ = ("body", "content_encoding", "deltas", "encoding", "future", "loop", "now_ns")

    def __init__(self) -> None:
        self.body = b""
        self.encoding: otlp.Encoding = "application/x-protobuf"
        self.content_encoding: str | None = None
        self.now_ns = 0
        self.deltas: dict[ingest.RollupKey, ingest.RollupDelta] | None = None
        # Either an asyncio future of ``loop`` (the receiver's requests), settled on the loop,
        # or a concurrent one (submit()), settled from the writer's thread.
        self.future: asyncio.Future[ReportResult] | concurrent.futures.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class RollupWriter:
    """One thread that decodes queued metric reports and adds them to the rollups, many
    reports per commit.

    The event loop only queues a report's body and awaits its answer: decoding happens here,
    a whole batch in a row. A report decoded on the loop ran after the loop had slept, with
    caches cold, and cost about three times what the same decode costs in a run of them
    (bench/telemetry.py, profiled). Queueing wakes this thread only for the first report of
    a batch, and the batch's answers reach the loop in one call, not one wake-up per report.
    A malformed report is refused on its own (its 400 comes with the batch's answers); the
    others are stored.
    """

    def __init__(
        self,
        database: Database,
        *,
        linger_s: float = 0.25,
        quiet_s: float = 0.05,
        max_batch: int = 500,
        max_bytes: int = 8 * 1024 * 1024,
        store: bool = True,
    ) -> None:
        self._database = database
        self.linger_s = linger_s
        self.quiet_s = quiet_s
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.store = store
        self._lock = threading.Lock()
        self._pending: list[_Report] = []
        self._arrived = threading.Event()  # set while _pending holds reports
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.commits = 0

    def submit(
        self, deltas: dict[ingest.RollupKey, ingest.RollupDelta]
    ) -> concurrent.futures.Future[None]:
        """A future that completes when the deltas are committed (or fails with the error)."""
        report = _Report()
        report.deltas = deltas
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        report.future = future
        self._put(report)
        return future

    def report(
        self, body: bytes, encoding: otlp.Encoding, content_encoding: str | None
    ) -> asyncio.Future[ReportResult]:
        """On the event loop: a future of the report's (points, stored, message) once it is
        decoded and committed; it fails with OtlpError for a report refused whole."""
        loop = asyncio.get_running_loop()
        report = _Report()
        report.body = body
        report.encoding = encoding
        report.content_encoding = content_encoding
        report.now_ns = time.time_ns()
        future: asyncio.Future[ReportResult] = loop.create_future()
        report.future = future
        report.loop = loop
        self._put(report)
        return future

    def _put(self, report: _Report) -> None:
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="rollup-writer", daemon=True)
                self._thread.start()
            self._pending.append(report)
            if len(self._pending) == 1:
                self._arrived.set()

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._arrived.set()
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self._arrived.wait()
            # Linger for more while more keep coming: up to 250 ms while reports arrive less
            # than 50 ms apart, so 100 reports a second make transactions of about 25 (each
            # report cost half as much as in transactions of 5, measured), and a lone report
            # waits 50 ms at most. Agents do not mind the wait; the database minds the commits.
            # The queue is looked at every quiet_s, not woken for every report.
            deadline = time.monotonic() + self.linger_s
            seen = -1
            while True:
                with self._lock:
                    queued, stopping = len(self._pending), self._stopping
                if stopping or queued == seen or queued >= self.max_batch:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                seen = queued
                time.sleep(min(self.quiet_s, remaining))
            with self._lock:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                if not self._pending:
                    self._arrived.clear()
                leave = self._stopping and not self._pending
            if batch:
                self._write(batch)
            if leave:
                return

    def _write(self, batch: list[_Report]) -> None:
        answers: list[tuple[_Report, ReportResult | BaseException]] = []
        stored: list[tuple[_Report, ReportResult]] = []
        # The reports' own deltas are merged into (each report's are its own and not read
        # again): a key seen once, most of them, costs no copy.
        merged: dict[ingest.RollupKey, ingest.RollupDelta] = {}
        for report in batch:
            deltas = report.deltas
            result: ReportResult = (0, 0, "")
            if deltas is None:
                try:
                    decoded = self._decode(report)
                except otlp.OtlpError as exc:
                    answers.append((report, exc))
                    continue
                except Exception as exc:  # a bug: that report fails (500), the others go on
                    log.exception("decoding a metrics report failed")
                    answers.append((report, RuntimeError(f"metrics report failed: {exc!r}")))
                    continue
                deltas = decoded.deltas
                result = (decoded.points, decoded.stored, decoded.message)
            if self.store:
                for key, delta in deltas.items():
                    into = merged.get(key)
                    if into is None:
                        merged[key] = delta
                    else:
                        into.add(
                            delta.requests,
                            delta.failures,
                            delta.latency_sum_ms,
                            delta.latency_counts,
                        )
            stored.append((report, result))
        failure: BaseException | None = None
        if merged:
            try:
                with _transaction(self._database, write=True) as session:
                    ingest.add_to_rollups(session, merged)
                self.commits += 1
            except Exception as exc:
                failure = exc
        for report, result in stored:
            answers.append((report, failure if failure is not None else result))
        self._answer(answers)

    def _decode(self, report: _Report) -> ingest.MetricsBatch:
        data = otlp.decompress(report.body, report.content_encoding, self.max_bytes)
        request = otlp.decode_metrics(data, report.encoding)
        return ingest.rollup_deltas(request, now_ns=report.now_ns)

    @staticmethod
    def _answer(answers: list[tuple[_Report, ReportResult | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for report, outcome in answers:
            future = report.future
            if report.loop is not None:
                by_loop.setdefault(report.loop, []).append((future, outcome))
            elif isinstance(future, concurrent.futures.Future):
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(None)
        for loop, settled in by_loop.items():
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[ReportResult], Any]]) -> None:
    """On the loop: the batch's answers, all at once."""
    for future, outcome in settled:
        if future.done():  # the request was cancelled (its client went away)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Receiver:
    """Per-app state of the OTLP receiver."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.limiter = ClientRateLimiter(settings.otlp_rate_per_s, settings.otlp_burst)
        self.slots = IngestSlots(settings.otlp_max_concurrent, settings.otlp_max_waiting)
        self.writer = RollupWriter(
            database, max_bytes=settings.otlp_max_bytes, store=settings.otlp_store
        )
        self._workers = [
            SpanWorker(database.url, settings) for _ in range(settings.otlp_worker_processes)
        ]

    def close(self) -> None:
        self.writer.close()
        for worker in self._workers:
            worker.close()

    async def store_traces(
        self, body: bytes, encoding: otlp.Encoding, content_encoding: str | None
    ) -> bytes:
        """Decode and store one trace export; the response body. In a worker process when
        there is one, else in a thread; either way this coroutine only waits."""
        limiter = self.slots.limiter
        if self._workers:
            async with limiter:
                worker = min(self._workers, key=lambda w: w.pending)
                future = worker.submit((body, encoding, content_encoding))
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
        """Queue one metrics export for the writer, which decodes it with the others of its
        batch and commits them, and wait for it without a thread; the response body."""
        started = time.perf_counter()
        points, stored, message = await self.writer.report(body, encoding, content_encoding)
        metrics.METRIC_POINTS_RECEIVED.inc(points)
        if self.settings.otlp_store:
            metrics.METRIC_POINTS_STORED.inc(stored)
        _METRICS_SECONDS.observe(time.perf_counter() - started)
        return otlp.encode_response(encoding, "metrics", points - stored, message)


_METRICS_SECONDS = metrics.INGEST_SECONDS.labels("metrics")


TraceExport = tuple[bytes, otlp.Encoding, str | None]  # body, encoding, content encoding
# (response body, spans received, spans stored, seconds taken)
TraceResult = tuple[bytes, int, int, float]


def _store_traces(
    database: Database,
    settings: Settings,
    body: bytes,
    encoding: otlp.Encoding,
    content_encoding: str | None,
) -> TraceResult:
    """One export decoded and stored in its own transaction; raises OtlpError."""
    started = time.perf_counter()
    rows, result = _decode_traces(settings, (body, encoding, content_encoding), datetime.now(UTC))
    if rows and settings.otlp_store:
        with _transaction(database, write=True) as session:
            ingest.store_spans(session, rows)
    return result[0], result[1], result[2], time.perf_counter() - started


def _decode_traces(
    settings: Settings, export: TraceExport, received_at: datetime
) -> tuple[list[ingest.SpanRow], TraceResult]:
    """The export's rows and its result once they are stored; raises OtlpError (400, 413,
    415) for an export that must be refused whole."""
    started = time.perf_counter()
    body, encoding, content_encoding = export
    data = otlp.decompress(body, content_encoding, settings.otlp_max_bytes)
    request = otlp.decode_traces(data, encoding)
    rows = ingest.span_rows(
        request, max_attribute_bytes=settings.span_attributes_max_bytes, received_at=received_at
    )
    stored = len(rows) if settings.otlp_store else 0
    response = otlp.encode_response(encoding, "traces")
    return rows, (response, len(rows), stored, time.perf_counter() - started)


# -- the worker process ------------------------------------------------------------------------
#
# A pipe, not a process pool: a pool's worker takes one call at a time, and each call was one
# transaction. Every span stored dirties a page of each index (ids are random), and a commit
# writes every page it dirtied to the WAL: one export per transaction wrote about 4.3 KiB per
# span, four exports per transaction 2.5 KiB, and ran almost twice as fast (measured). The
# worker takes everything the console sent while it was writing and stores it in one
# transaction.

WorkerReply = tuple[int, TraceResult | Exception]


class SpanWorker:
    """The console's end of one span worker process: started by the first export (most apps
    a test suite creates never receive one, and spawning costs a second or more), started
    again by the next export if it died. Thread-safe."""

    def __init__(self, database_url: str, settings: Settings) -> None:
        self._database_url = database_url
        self._settings = settings.model_dump(mode="json")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._channel: _Channel | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        channel = self._channel
        return len(channel.pending) if channel is not None else 0

    def submit(self, export: TraceExport) -> concurrent.futures.Future[TraceResult]:
        future: concurrent.futures.Future[TraceResult] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the span worker is shut down")
            channel = self._channel
            if channel is None or not channel.open:
                channel = _Channel(self._database_url, self._settings, self._lock)
                self._channel = channel
            request_id = next(self._ids)
            channel.pending[request_id] = future
        channel.outbox.put((request_id, export))
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


class _Channel:
    """One worker process and the two threads that talk to it over its pipe."""

    def __init__(self, database_url: str, settings: dict[str, Any], lock: threading.Lock) -> None:
        self._lock = lock  # the SpanWorker's: guards open and pending
        context = multiprocessing.get_context("spawn")  # not fork: the console has threads
        self._connection, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, database_url, settings, os.getpid()),
            name="mesh-otlp-worker",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.open = True
        self.pending: dict[int, concurrent.futures.Future[TraceResult]] = {}
        self.outbox: queue.SimpleQueue[tuple[int, TraceExport] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="otlp-worker-send", daemon=True)
        self._receiver = threading.Thread(
            target=self._receive, name="otlp-worker-receive", daemon=True
        )
        self._sender.start()
        self._receiver.start()

    def _send(self) -> None:
        while True:
            item = self.outbox.get()
            try:
                # None too: it tells the worker to store what it has and leave. (Closing the
                # pipe would not: the receiving thread's recv() keeps the socket open.)
                self._connection.send(item)
            except (OSError, ValueError):  # the worker is gone; _receive fails the futures
                return
            if item is None:
                return

    def _receive(self) -> None:
        while True:
            try:
                request_id, result = self._connection.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self.pending.pop(request_id, None)
            if future is None or future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._connection.close()
        with self._lock:
            self.open = False
            orphans = list(self.pending.values())
            self.pending.clear()
        gone = otlp.OtlpError(503, "the span worker restarted; retry later", "worker_restart")
        for future in orphans:
            if not future.done():
                future.set_exception(gone)

    def close(self) -> None:
        self.outbox.put(None)
        self._sender.join(timeout=10)
        self.process.join(timeout=30)  # it commits what it holds first; slow on a busy machine
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self._receiver.join(timeout=5)


def _worker_main(
    connection: multiprocessing.connection.Connection,
    database_url: str,
    settings_fields: dict[str, Any],
    parent: int,
) -> None:
    # The console's process handles Ctrl-C and shuts its worker down; the worker must not die
    # half-way through a transaction because the terminal's SIGINT reached it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pages before spans: when the two want the same core, the scheduler gives the console
    # about three times the worker's share (nice 5). Spans wait a little longer in the pipe;
    # a person's page does not wait behind a batch of them. No effect on an idle core.
    with suppress(OSError):
        os.nice(5)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    settings = Settings(**settings_fields)
    database = Database(database_url)
    checkpoints = _tune_sqlite(database)

    def reply(message: WorkerReply) -> None:
        with suppress(OSError):  # the console is gone
            connection.send(message)

    leaving = False
    while not leaving:
        # Everything that came in while the last transaction was written goes in the next.
        batch: list[tuple[int, TraceExport]] = []
        try:
            while True:
                message = connection.recv()
                if message is None:  # the console shuts down: store what came, then leave
                    leaving = True
                    break
                batch.append(message)
                if len(batch) >= MAX_EXPORTS_PER_TRANSACTION or not connection.poll():
                    break
        except (EOFError, OSError):
            leaving = True
        if batch:
            _store_batch(database, settings, batch, reply)
            if checkpoints is not None:
                checkpoints.kick()
    database.dispose()


# Exports stored in one transaction at most: bounds the rows held and a commit's latency.
MAX_EXPORTS_PER_TRANSACTION = 16


def _store_batch(
    database: Database,
    settings: Settings,
    batch: list[tuple[int, TraceExport]],
    reply: Callable[[WorkerReply], None],
) -> None:
    """Each export decoded and checked on its own (a refused one is answered at once and
    stores nothing), the rows of all the others stored in one transaction.

    Decoding and storing take turns in one thread, on purpose: in two threads the decoder
    (pure Python) held the interpreter lock while the writer needed it back between every
    row it inserted, and both ran at half speed (measured)."""
    received_at = datetime.now(UTC)
    accepted: list[tuple[int, TraceResult]] = []
    rows: list[ingest.SpanRow] = []
    for request_id, export in batch:
        try:
            export_rows, result = _decode_traces(settings, export, received_at)
        except otlp.OtlpError as exc:
            reply((request_id, exc))
            continue
        except Exception as exc:  # a bug: that export fails (500), the others go on
            log.exception("decoding a span export failed")
            reply((request_id, RuntimeError(f"span export failed: {exc!r}")))
            continue
        rows += export_rows
        accepted.append((request_id, result))
    if not accepted:
        return
    started = time.perf_counter()
    failure: Exception | None = None
    if rows and settings.otlp_store:
        try:
            with _transaction(database, write=True) as session:
                ingest.store_spans(session, rows)
        except OperationalError:
            # Database errors do not all survive pickling; what the sender needs is "retry".
            failure = otlp.OtlpError(503, "the database is busy; retry later", "database_busy")
        except Exception as exc:
            log.exception("storing spans failed")
            failure = RuntimeError(f"storing spans failed: {exc!r}")
    took = time.perf_counter() - started
    for request_id, result in accepted:
        if failure is not None:
            reply((request_id, failure))
        else:
            reply((request_id, (result[0], result[1], result[2], result[3] + took)))


def _tune_sqlite(database: Database) -> _Checkpointer | None:
    """The worker's own SQLite connections: a page cache that holds the span indexes' hot
    pages (64 MiB, not 2), and WAL checkpoints moved off the commit path.

    A commit that pushes the WAL past ``wal_autocheckpoint`` pages copies it into the database
    and syncs it before the commit returns; with spans' random index pages that happened every
    second commit or two and halved ingest (measured). A thread of the worker checkpoints after
    each commit instead (PASSIVE: it never blocks the writer or readers; SQLite works without
    the interpreter lock), while the next exports are being decoded; the WAL then restarts
    from its beginning at the next write.
    The writer still checkpoints by itself past 16,384 pages (64 MiB), should the thread fall
    behind. Durability is unchanged (WAL, synchronous=NORMAL, as everywhere)."""
    if database.dialect != "sqlite":
        return None

    @event.listens_for(database.engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.execute("PRAGMA wal_autocheckpoint=16384")
        cursor.close()

    return _Checkpointer(database)


class _Checkpointer:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._wanted = threading.Event()
        threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True).start()

    def kick(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                with self._database.engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception:  # the writer checkpoints by itself when this cannot
                log.debug("background WAL checkpoint failed", exc_info=True)


def _exit_with_parent(parent: int) -> None:
    """A console killed outright (SIGKILL, OOM) cannot shut its worker down; it would live on
    as an orphan. The worker leaves when its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
