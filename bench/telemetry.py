"""Telemetry ingest benchmark: OTLP spans and agent metrics into a real ``meshctl serve``.

    .venv/bin/python bench/telemetry.py [--json out.json] [--batches N] [--clients C]
                                        [--backends sqlite,postgresql] [--agents 1000]
                                        [--parts spans,metrics] [--profile DIR]

Rows:

- spans/s: ``--batches`` OTLP/HTTP protobuf requests of 512 distinct spans each (agent-like: six
  attributes, a server and a client span per hop), posted by ``--clients`` concurrent keep-alive
  connections. Measured on SQLite and PostgreSQL, and against the peer: the same server with
  ``MESH_OTLP_STORE=false`` (decode, validate, respond; store nothing), which shows what storage
  costs. "per core" divides by the server's CPU seconds (from /proc: the console process, which
  also renders the sampled catalog pages, plus its span worker process); "per worker" by the
  worker's alone, where all span decoding and storing happens. The
  issue's reference: an OpenTelemetry Collector does about 12,000 spans/s per core.
- catalog p95: ``GET /services`` (1,000 seeded services) on one connection, a person's pace
  (every 0.1 s at rest, every 0.5 s during the span ingest above, so that its own CPU hardly
  counts in the ingest's figures). Target: during <= 2x at rest.
- agent metrics: ``--agents`` simulated agents, each posting the agent's own OTLP protobuf (built by
  ``mesh_agent.metrics_export``: 3 edges x 2 status classes) every 10 s, i.e. agents/10 requests
  per second, open loop, for ``--metrics-seconds``. Reports metric points/s and the server's CPU
  share (100 % = one core), beside the peer with ``MESH_OTLP_STORE=false`` (HTTP, auth,
  decoding; no rollup writes). Target: ≤ 10 % of one core for 1,000 agents.

Each server is measured once its start-up work is done (its CPU quiet for a second): the push
hub's first compile of the 1,000 seeded services used to land in the first measurement.
``--parts spans`` or ``--parts metrics`` measures one half (short runs while iterating);
``--profile DIR`` has py-spy (``pip install py-spy``) record each metrics server's stacks
(``-f raw``, folded) into DIR.

Everything shares the machine's cores with the client; read ratios against the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import catalog as catalog_bench  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from sqlalchemy import text  # noqa: E402

from app.agents.token import JoinToken  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from mesh_agent.metrics_export import MetricsExporter  # noqa: E402
from mesh_agent.telemetry import Telemetry  # noqa: E402

SPANS_PER_BATCH = 512
TARGET_SPANS_S = 20_000
COLLECTOR_SPANS_S_PER_CORE = 12_000
TARGET_CATALOG_RATIO = 2.0
TARGET_METRICS_CPU = 0.10
CATALOG_PAUSE_S = 0.1
# Slower while ingest runs, so the pages' own CPU hardly counts in the ingest's "per core".
CATALOG_PAUSE_DURING_INGEST_S = 0.5
SERVICES = ["frontend", "cart", "checkout", "payments", "reviews", "ratings", "search", "ads"]


# ---------------------------------------------------------------------------------------------
# Payloads


def span_batches(count: int, seed: int = 1) -> list[bytes]:
    """``count`` protobuf requests of 512 spans with ids unique across the whole run."""
    rng = random.Random(seed)
    now = time.time_ns()
    bodies = []
    for b in range(count):
        request = ExportTraceServiceRequest()
        service = SERVICES[b % len(SERVICES)]
        resource_spans = request.resource_spans.add()
        for key, value in (
            ("service.name", service),
            ("service.namespace", "shop"),
            ("service.version", f"v{b % 3 + 1}"),
        ):
            attribute = resource_spans.resource.attributes.add()
            attribute.key = key
            attribute.value.string_value = value
        scope = resource_spans.scope_spans.add()
        scope.scope.name = "mesh_agent"
        for i in range(SPANS_PER_BATCH // 2):
            trace_id = rng.getrandbits(128).to_bytes(16, "big")
            server_id = rng.getrandbits(64).to_bytes(8, "big")
            start = now - rng.randint(0, 60 * 10**9)
            duration = int(rng.lognormvariate(16, 1))
            destination = SERVICES[(b + i) % len(SERVICES)]
            status = 503 if rng.random() < 0.02 else 200
            for kind, span_id, parent, offset in (
                (2, server_id, b"", 0),
                (3, rng.getrandbits(64).to_bytes(8, "big"), server_id, duration // 10),
            ):
                span = scope.spans.add()
                span.trace_id = trace_id
                span.span_id = span_id
                span.parent_span_id = parent
                span.name = f"GET /{destination}/items"
                span.kind = kind  # type: ignore[assignment]
                span.start_time_unix_nano = start + offset
                span.end_time_unix_nano = start + duration - offset
                for key, value in (
                    ("http.request.method", "GET"),
                    ("url.path", f"/{destination}/items/{i}"),
                    ("server.address", destination),
                    ("mesh.route", "default"),
                    ("mesh.destination.version", "v1"),
                ):
                    attribute = span.attributes.add()
                    attribute.key = key
                    attribute.value.string_value = value
                attribute = span.attributes.add()
                attribute.key = "http.response.status_code"
                attribute.value.int_value = status
                if status >= 500:
                    span.status.code = 2  # type: ignore[assignment]
        bodies.append(request.SerializeToString())
    return bodies


def agent_bodies(agents: int) -> list[bytes]:
    """One OTLP metrics request per agent, encoded by the agent's own exporter."""
    bodies = []
    for a in range(agents):
        telemetry = Telemetry(
            service=f"svc-{a:04d}",
            version="v1",
            namespace="shop",
            sampling_ratio=0.0,
            otlp_endpoint=None,
        )
        exporter = MetricsExporter(telemetry, "http://unused:1")
        for e in range(3):
            for status, n in ((200, 40), (503, 1)):
                for _ in range(n):
                    telemetry.record(
                        source=telemetry.service,
                        destination=f"svc-{(a + e + 1) % agents:04d}",
                        destination_version="v1",
                        status=status,
                        duration_s=random.lognormvariate(-4, 1),
                    )
        exporter.collect()
        bodies.append(exporter.encode(time.time_ns()))
    return bodies


# ---------------------------------------------------------------------------------------------
# Server and measurements


def join_token(workdir: Path) -> str:
    """The mesh join token the server in ``workdir`` accepts (senders present it as agents do)."""
    return JoinToken(workdir / "join-token").ensure()


@contextlib.contextmanager
def serve(url: str, workdir: Path, **env: str) -> Iterator[tuple[int, int]]:
    """(port, pid) of a ``meshctl serve`` with OTLP rate limits out of the benchmark's way."""
    port = catalog_bench.free_port()
    join_token(workdir)  # created before the server starts, so both read the same file
    environment = {
        **os.environ,
        "MESH_DATABASE_URL": url,
        "MESH_DATA_DIR": str(workdir),
        "MESH_OTLP_RATE_PER_S": "100000",
        "MESH_OTLP_BURST": "100000",
        **env,
    }
    log = (workdir / f"server-{port}.log").open("wb")
    meshctl = Path(sys.executable).with_name("meshctl")
    process = subprocess.Popen(
        [str(meshctl), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"meshctl serve exited; see {log.name}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    connection.close()
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("meshctl serve did not start within 60 s") from None
                time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of the server process and of its children (span workers)."""
    totals = [0.0, 0.0]
    pending = [(pid, 0)]
    while pending:
        current, slot = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        totals[slot] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            pending.extend((int(child), 1) for child in task.read_text().split())
    return totals[0], totals[1]


def settle(pid: int, *, below: float = 0.05, window_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Wait until the server's start-up work is done (its CPU over ``window_s`` under ``below``
    of a core, or ``limit_s`` passed): the push hub's first compile of the 1,000 seeded
    services took seconds of CPU after /healthz answered, and landed in whichever measurement
    came first (profiled: ~3 % of a core in a 15 s metrics run)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid))
        time.sleep(window_s)
        if sum(cpu_seconds(pid)) - before < below * window_s:
            return


def post_all(
    port: int, bodies: list[bytes], clients: int, path: str, content_type: str, token: str
) -> tuple[float, dict[int, int]]:
    """Post every body once over ``clients`` keep-alive connections; (seconds, status counts)."""
    queue = list(enumerate(bodies))
    lock = threading.Lock()
    statuses: dict[int, int] = {}

    def worker(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {
            "Content-Type": content_type,
            "Authorization": f"Bearer {token}",
            "X-Mesh-Agent": f"bench-{n}",
        }
        while True:
            with lock:
                if not queue:
                    break
                _, body = queue.pop()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began, statuses


def page_latencies(
    port: int, stop: threading.Event | None, requests: int, pause_s: float = 0.0
) -> list[float]:
    """Catalog page times (ms), one request every ``pause_s`` at most: a person browsing, not
    a load generator (which would mostly measure its own load on the console)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    samples = []
    for i in range(requests + 5):
        if stop is not None and stop.wait(pause_s):
            break
        began = time.perf_counter()
        connection.request("GET", "/services")
        response = connection.getresponse()
        response.read()
        if i >= 5:
            samples.append((time.perf_counter() - began) * 1000)
    connection.close()
    return samples


@dataclass
class SpanRow:
    backend: str
    spans: int
    seconds: float
    spans_per_s: float
    server_cpu_s: float
    worker_cpu_s: float
    spans_per_core_s: float
    spans_per_worker_core_s: float
    statuses: dict[int, int]
    catalog_p95_rest_ms: float | None = None
    catalog_p95_ingest_ms: float | None = None
    catalog_samples_ingest: int = 0


@dataclass
class MetricsRow:
    backend: str
    agents: int
    requests: int
    points_per_s: float
    server_cpu_share: float
    statuses: dict[int, int] = field(default_factory=dict)


def p95(samples: list[float]) -> float:
    return catalog_bench.percentile(samples, 0.95) if samples else float("nan")


def measure_spans(
    backend: str,
    url: str,
    workdir: Path,
    bodies: list[bytes],
    clients: int,
    *,
    store: bool,
    catalog: bool,
) -> SpanRow:
    env = {} if store else {"MESH_OTLP_STORE": "false"}
    with serve(url, workdir, **env) as (port, pid):
        token = join_token(workdir)
        rest: list[float] = []
        settle(pid)  # the pages at rest too: not beside the hub's first compile
        if catalog:
            rest = page_latencies(port, threading.Event(), 100, CATALOG_PAUSE_S)
        # warm the receiver (imports, connection pools) outside the timed run
        post_all(port, bodies[:2], 1, "/v1/traces", "application/x-protobuf", token)
        settle(pid)
        cpu0 = cpu_seconds(pid)
        during: list[float] = []
        stop = threading.Event()
        sampler = None
        if catalog:
            sampler = threading.Thread(
                target=lambda: during.extend(
                    page_latencies(port, stop, 10_000, CATALOG_PAUSE_DURING_INGEST_S)
                )
            )
            sampler.start()
        seconds, statuses = post_all(
            port, bodies[2:], clients, "/v1/traces", "application/x-protobuf", token
        )
        stop.set()
        if sampler is not None:
            sampler.join()
        main1, workers1 = cpu_seconds(pid)
    main, workers = main1 - cpu0[0], workers1 - cpu0[1]
    cpu = main + workers
    # Only accepted requests count: a refusal (401, 429, 503) is fast and stores nothing.
    spans = statuses.get(200, 0) * SPANS_PER_BATCH
    return SpanRow(
        backend=backend if store else "no-op peer (decode, no store)",
        spans=spans,
        seconds=seconds,
        spans_per_s=spans / seconds,
        server_cpu_s=cpu,
        worker_cpu_s=workers,
        spans_per_core_s=spans / cpu if cpu else float("nan"),
        spans_per_worker_core_s=spans / workers if workers else float("nan"),
        statuses=statuses,
        catalog_p95_rest_ms=p95(rest) if catalog else None,
        catalog_p95_ingest_ms=p95(during) if catalog else None,
        catalog_samples_ingest=len(during),
    )


def measure_metrics(
    backend: str,
    url: str,
    workdir: Path,
    bodies: list[bytes],
    seconds: float,
    *,
    store: bool = True,
    profile: Path | None = None,
) -> MetricsRow:
    """Open loop: request i is due at i / rate, sent by whichever of 16 connections is free,
    so a slow answer does not lower the offered rate."""
    rate = len(bodies) / 10.0  # every agent once per 10 s
    total = int(rate * seconds)
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    next_index = [0]
    env = {} if store else {"MESH_OTLP_STORE": "false"}
    with serve(url, workdir, **env) as (port, pid):
        token = join_token(workdir)
        post_all(port, bodies[:2], 1, "/v1/metrics", "application/x-protobuf", token)  # warm up
        settle(pid)
        cpu0 = cpu_seconds(pid)
        began = time.perf_counter()
        spy = None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-p",
                    str(pid),
                    "-f",
                    "raw",
                    "-r",
                    "200",
                    "-d",
                    str(int(seconds)),
                    "-o",
                    str(profile / f"metrics-{backend}-{'store' if store else 'peer'}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        def sender() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= total:
                    break
                delay = began + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                agent = i % len(bodies)
                connection.request(
                    "POST",
                    "/v1/metrics",
                    body=bodies[agent],
                    headers={
                        "Content-Type": "application/x-protobuf",
                        "Authorization": f"Bearer {token}",
                        "X-Mesh-Agent": f"agent-{agent}",
                    },
                )
                response = connection.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            connection.close()

        threads = [threading.Thread(target=sender) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        cpu = sum(cpu_seconds(pid)) - sum(cpu0)
        if spy is not None:
            spy.wait()
    points = statuses.get(200, 0) * 6
    return MetricsRow(
        backend=backend if store else "no-op peer (store off)",
        agents=len(bodies),
        requests=total,
        points_per_s=points / elapsed,
        server_cpu_share=cpu / elapsed,
        statuses=statuses,
    )


def prepared_database(backend: str, workdir: Path) -> contextlib.AbstractContextManager[str]:
    return catalog_bench.database(backend, workdir)


def migrate_and_seed(url: str) -> None:
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    upgrade(engine)
    catalog_bench.seed(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300, help="span requests of 512 per run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--metrics-seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--parts",
        default="spans,metrics",
        help="which rows to measure: spans, metrics or both (short runs while iterating)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="directory: py-spy records each metrics server (raw folded stacks) into it",
    )
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    print(
        f"mesh telemetry benchmark: {args.batches} x {SPANS_PER_BATCH} spans, {args.clients} "
        f"clients; {args.agents} agents every 10 s for {args.metrics_seconds:.0f} s; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    began = time.perf_counter()
    batches = {
        backend: span_batches(args.batches + 2, seed=i) if "spans" in parts else []
        for i, backend in enumerate(["peer", *args.backends.split(",")])
    }
    agents = agent_bodies(args.agents) if "metrics" in parts else []
    print(f"  payloads built in {time.perf_counter() - began:.1f} s")
    span_rows: list[SpanRow] = []
    metric_rows: list[MetricsRow] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-telemetry-") as tmp:
        workdir = Path(tmp)
        peer = workdir / "peer"
        peer.mkdir()
        with prepared_database("sqlite", peer) as url:
            migrate_and_seed(url)
            if "spans" in parts:
                span_rows.append(
                    measure_spans(
                        "sqlite",
                        url,
                        peer,
                        batches["peer"],
                        args.clients,
                        store=False,
                        catalog=False,
                    )
                )
            if "metrics" in parts:
                metric_rows.append(
                    measure_metrics(
                        "sqlite",
                        url,
                        peer,
                        agents,
                        args.metrics_seconds,
                        store=False,
                        profile=args.profile,
                    )
                )
            print("  peer done")
        for backend in args.backends.split(","):
            backend = backend.strip()
            sub = workdir / backend
            sub.mkdir()
            with prepared_database(backend, sub) as url:
                migrate_and_seed(url)
                if "spans" in parts:
                    span_rows.append(
                        measure_spans(
                            backend,
                            url,
                            sub,
                            batches[backend],
                            args.clients,
                            store=True,
                            catalog=True,
                        )
                    )
                if "metrics" in parts:
                    metric_rows.append(
                        measure_metrics(
                            backend, url, sub, agents, args.metrics_seconds, profile=args.profile
                        )
                    )
                print(f"  {backend} done")

    if span_rows:
        print()
        header = (
            f"{'spans':<31} {'spans/s':>8} {'x peer':>6} {'per core':>9} {'per worker':>11} "
            f"{'server CPU s':>12} {'catalog p95 rest':>17} {'during ingest':>14}  statuses"
        )
        print(header)
        print("-" * len(header))
        peer_rate = span_rows[0].spans_per_s
        for row in span_rows:
            rest = (
                f"{row.catalog_p95_rest_ms:.1f} ms" if row.catalog_p95_rest_ms is not None else "—"
            )
            during = (
                f"{row.catalog_p95_ingest_ms:.1f} ms"
                if row.catalog_p95_ingest_ms is not None
                else "—"
            )
            print(
                f"{row.backend:<31} {row.spans_per_s:>8,.0f} {row.spans_per_s / peer_rate:>6.2f} "
                f"{row.spans_per_core_s:>9,.0f} "
                f"{row.spans_per_worker_core_s:>11,.0f} {row.server_cpu_s:>12.1f} "
                f"{rest:>17} {during:>14}  {row.statuses}"
            )
        print(f"{'reference: OTel Collector':<31} {'':>8} {COLLECTOR_SPANS_S_PER_CORE:>9,}")
    if metric_rows:
        print()
        header = (
            f"{'agent metrics':<22} {'agents':>7} {'requests':>9} {'points/s':>9} "
            f"{'server CPU':>11} {'x peer':>7}  statuses"
        )
        print(header)
        print("-" * len(header))
        peer_cpu = metric_rows[0].server_cpu_share
        for m in metric_rows:
            print(
                f"{m.backend:<22} {m.agents:>7} {m.requests:>9} {m.points_per_s:>9,.0f} "
                f"{m.server_cpu_share * 100:>10.1f}% {m.server_cpu_share / peer_cpu:>7.2f}  "
                f"{m.statuses}"
            )
    print()
    verdicts = []
    for row in span_rows:
        if row.backend.startswith("no-op"):
            continue
        verdicts.append(
            (f"{row.backend}: spans/s >= {TARGET_SPANS_S:,}", row.spans_per_s >= TARGET_SPANS_S)
        )
        if row.catalog_p95_rest_ms and row.catalog_p95_ingest_ms:
            ratio = row.catalog_p95_ingest_ms / row.catalog_p95_rest_ms
            verdicts.append(
                (
                    f"{row.backend}: catalog p95 during ingest {ratio:.1f}x rest "
                    f"<= {TARGET_CATALOG_RATIO:.0f}x",
                    ratio <= TARGET_CATALOG_RATIO,
                )
            )
    for m in metric_rows[1:]:  # not the peer
        verdicts.append(
            (
                f"{m.backend}: {m.agents} agents' metrics {m.server_cpu_share:.1%} of a core "
                "<= 10 %",
                m.server_cpu_share <= TARGET_METRICS_CPU,
            )
        )
    for label, met in verdicts:
        print(f"  {'met    ' if met else 'NOT MET'}  {label}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "spans": [asdict(r) for r in span_rows],
                    "metrics": [asdict(m) for m in metric_rows],
                    "verdicts": [{"target": label, "met": met} for label, met in verdicts],
                },
                indent=2,
            )
        )
    return 0 if all(met for _, met in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
