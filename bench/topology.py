"""Topology benchmark: 200 services, 1,000 edges, 24 h of rollups, on SQLite and PostgreSQL.

    .venv/bin/python bench/topology.py [--json out.json] [--requests N] [--backends sqlite,...]

For each backend it creates a throw-away database, migrates it and seeds 200 services (8
namespaces, 6 teams) with 1,000 caller → callee edges (plus callers from outside the mesh) and
their rollups as the ingest keeps them: 10 s buckets for the last 15 minutes, 60 s buckets for
the last 6 hours, 600 s buckets for 24 hours (about 600,000 rows; SQLAlchemy Core bulk inserts).
Then it starts ``meshctl serve`` and times, from a client on loopback over one keep-alive
connection, N sequential ``GET /api/v1/topology`` per window after the first (cold) request,
whose time is shown apart: it sums the window's closed buckets before the cache has them.

Peers measured in the same run:

- ``/healthz`` of the same server: the floor of uvicorn + FastAPI + loopback HTTP.
- "full read": the whole window summed straight from the table in-process (what every refresh
  would cost without the closed-bucket cache).
- Layout: the layered layout of the 200-node, 1,000-edge graph against networkx's own
  ``spring_layout`` (Fruchterman-Reingold, needs numpy) on the same graph, to show why layered.

PostgreSQL: a temporary database on 127.0.0.1:5432 as user ``postgres`` (trust auth), or
``MESH_BENCH_POSTGRES_URL``; dropped at the end. Target: topology p95 <= 200 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import networkx as nx  # noqa: E402

from app.catalog.models import Service  # noqa: E402
from app.db import Database, make_engine  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from app.telemetry import histogram, read  # noqa: E402
from app.telemetry.models import EdgeRollup  # noqa: E402
from app.topology import service as topology_service  # noqa: E402
from app.topology import stages  # noqa: E402
from app.topology.layout import LayoutCache, layered_layout  # noqa: E402

TARGET_P95_MS = 200.0
SERVICES = 200
EDGES = 1_000
NAMESPACES = ["default", "payments", "search", "identity", "media", "checkout", "ads", "infra"]
TEAMS = [f"team-{name}" for name in ("atlas", "borealis", "cobalt", "delta", "ember", "fjord")]
# (resolution, how far back) as the ingest and its retention would keep them.
KEPT = [(10, timedelta(minutes=15)), (60, timedelta(hours=6)), (600, timedelta(hours=24))]
WINDOWS = ["5m", "1h", "24h"]
# Longer than the topology cache's TTL (app.topology.cache): a lone viewer's refreshes.
PACE_S = 2.5
POSTGRES_ADMIN_URL = os.environ.get(
    "MESH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


def service(i: int) -> tuple[str, str]:
    return NAMESPACES[i % len(NAMESPACES)], f"svc-{i:03d}"


def plan_edges(rng: random.Random) -> list[tuple[int, int]]:
    """Calls go from lower to higher numbers (a layered mesh, depth ~6), a few back (cycles)."""
    edges: set[tuple[int, int]] = set()
    while len(edges) < EDGES:
        source = rng.randrange(SERVICES - 1)
        if rng.random() < 0.02:
            dest = rng.randrange(source + 1)
        else:
            dest = min(SERVICES - 1, source + 1 + int(rng.expovariate(1 / 25)))
        if dest != source:
            edges.add((source, dest))
    return sorted(edges)


def seed(engine: Engine) -> int:
    rng = random.Random(42)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            insert(Service),
            [
                {
                    "namespace": ns,
                    "name": name,
                    "owner_team": TEAMS[i % len(TEAMS)],
                    "description": "",
                    "links": [],
                    "labels": {},
                    "revision": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(SERVICES)
                for ns, name in [service(i)]
            ],
        )
    edges = [(None, d) for d in range(10)] + [(s, d) for s, d in plan_edges(rng)]
    # A few latency shapes, reused: what matters to the queries is the row count, not variety.
    shapes = []
    for _ in range(16):
        counts = histogram.empty()
        for _ in range(200):
            histogram.observe(counts, rng.lognormvariate(3, 1))
        shapes.append(counts)
    total = 0
    for resolution, back in KEPT:
        buckets = int(back.total_seconds() // resolution)
        first = read.align(now, resolution) - timedelta(seconds=resolution * (buckets - 1))
        batch: list[dict[str, Any]] = []
        for b in range(buckets):
            at = first + timedelta(seconds=resolution * b)
            for k, (source, dest) in enumerate(edges):
                shape = shapes[(k + b) % len(shapes)]
                scale = resolution // 10
                sns, sname = service(source) if source is not None else ("", "")
                dns, dname = service(dest)
                batch.append(
                    {
                        "resolution_s": resolution,
                        "bucket_start": at,
                        "source_namespace": sns,
                        "source_service": sname,
                        "source_version": "v1" if source is not None else "",
                        "dest_namespace": dns,
                        "dest_service": dname,
                        "dest_version": "v1",
                        "requests": 200 * scale,
                        "failures": (k % 7 == 0) * scale * (1 + k % 50),
                        "latency_sum_ms": 4000.0 * scale,
                        "latency_counts": [c * scale for c in shape],
                    }
                )
            if len(batch) >= 20_000:
                with engine.begin() as connection:
                    connection.execute(insert(EdgeRollup), batch)
                total += len(batch)
                batch = []
        if batch:
            with engine.begin() as connection:
                connection.execute(insert(EdgeRollup), batch)
            total += len(batch)
    return total


# ---------------------------------------------------------------------------------------------
# Databases and server
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"mesh_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(url: str, workdir: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "MESH_DATABASE_URL": url, "MESH_DATA_DIR": str(workdir)}
    log = (workdir / f"server-{port}.log").open("wb")
    meshctl = Path(sys.executable).with_name("meshctl")
    process = subprocess.Popen(
        [str(meshctl), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"meshctl serve exited; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("meshctl serve did not start within 60 s") from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    what: str
    runs: int
    first_ms: float | None
    p50_ms: float
    p95_ms: float
    ratio_to_floor: float | None = None
    met: bool | None = None
    note: str = ""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed_get(connection: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
    began = time.perf_counter()
    connection.request("GET", path, headers={"Connection": "keep-alive"})
    response = connection.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - began) * 1000
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {body[:200]!r}")
    return elapsed, body


def measure_http(port: int, backend: str, requests: int, paced: int) -> list[Row]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    paths = {"healthz (floor)": "/healthz"}
    for window in WINDOWS:
        paths[f"topology {window}"] = f"/api/v1/topology?window={window}"
    paths["topology 24h, group=team"] = "/api/v1/topology?window=24h&group=team"
    paths["topology 1h, focus 2 hops"] = "/api/v1/topology?window=1h&focus=svc-100&hops=2"
    ns, name = service(100)
    paths["service metrics 1h"] = f"/api/v1/services/{name}/metrics?namespace={ns}&window=1h"
    rows = []
    for what, path in paths.items():
        first, body = timed_get(connection, path)
        if what == "topology 24h":
            graph = json.loads(body)
            print(f"  {backend}: 24h graph has {len(graph['nodes'])} nodes, "
                  f"{len(graph['edges'])} edges, {len(body) / 1024:.0f} KiB")  # fmt: skip
        samples = [timed_get(connection, path)[0] for _ in range(requests)]
        rows.append(
            Row(
                backend=backend,
                what=what,
                runs=requests,
                first_ms=first,
                p50_ms=statistics.median(samples),
                p95_ms=percentile(samples, 0.95),
            )
        )
    # One person refreshing the page: further apart than the topology cache keeps a graph, so
    # every request computes its graph (the rows above are mostly answered from that cache).
    for window in ("5m", "24h"):
        path = f"/api/v1/topology?window={window}&hops=1"  # a query of its own: a cold cache
        samples = []
        for _ in range(paced):
            time.sleep(PACE_S)
            samples.append(timed_get(connection, path)[0])
        if samples:
            rows.append(
                Row(backend, f"topology {window}, every {PACE_S:.1f} s (miss)", paced, None,
                    statistics.median(samples), percentile(samples, 0.95),
                    note="each computed: older than the cache's TTL")
            )  # fmt: skip
    connection.close()
    floor = rows[0].p95_ms
    for row in rows[1:]:
        row.ratio_to_floor = row.p95_ms / floor if floor else None
        if row.what.startswith("topology"):
            row.met = row.p95_ms <= TARGET_P95_MS
    return rows


def measure_inprocess(url: str, backend: str) -> tuple[list[Row], nx.DiGraph]:  # type: ignore[type-arg]
    database = Database(url)
    rows = []
    edges: dict[read.EdgeKey, read.Figures] = {}
    with database.session(write=False) as session:
        for window_name in WINDOWS:
            window = read.window_for(window_name)
            samples = []
            for _ in range(5):
                began = time.perf_counter()
                edges = read.window_edges(session, window)
                samples.append((time.perf_counter() - began) * 1000)
            rows.append(
                Row(backend, f"full read {window_name}", 5, None, statistics.median(samples),
                    percentile(samples, 0.95), note="no cache: every bucket summed")
            )  # fmt: skip
        catalog = [stages.CatalogEntry(*service(i), TEAMS[i % 6]) for i in range(SERVICES)]
        # What a response-cache miss costs the server: the whole graph and its JSON, with the
        # closed-bucket cache warm (as it is after the first request).
        edge_cache, layouts = read.EdgeWindowCache(database), LayoutCache()
        for window_name in WINDOWS:
            query = topology_service.TopologyQuery(window=window_name)
            samples = []
            for i in range(12):
                began = time.perf_counter()
                topology_service.topology(
                    session, query, edge_cache=edge_cache, layouts=layouts,
                    limits=stages.Thresholds(),
                ).model_dump_json()  # fmt: skip
                if i >= 2:
                    samples.append((time.perf_counter() - began) * 1000)
                else:
                    edge_cache.drain()
            rows.append(
                Row(backend, f"graph compute {window_name} (in-process)", 10, None,
                    statistics.median(samples), percentile(samples, 0.95),
                    note="a cache miss, without HTTP")
            )  # fmt: skip
        edge_cache.close()
    database.dispose()
    graph = stages.build(stages.GraphInputs(edges, catalog), stages.GraphOptions())
    return rows, graph


def measure_layout(graph: nx.DiGraph, backend: str) -> list[Row]:  # type: ignore[type-arg]
    nodes, edges = list(graph.nodes), list(graph.edges)
    samples = []
    for _ in range(30):
        began = time.perf_counter()
        layered_layout(nodes, edges)
        samples.append((time.perf_counter() - began) * 1000)
    rows = [
        Row(backend, f"layered layout ({len(nodes)} n, {len(edges)} e)", 30, None,
            statistics.median(samples), percentile(samples, 0.95), note="ours, uncached")
    ]  # fmt: skip
    try:
        import numpy  # noqa: F401
    except ImportError:
        rows.append(Row(backend, "networkx spring_layout", 0, None, float("nan"), float("nan"),
                        note="skipped: needs numpy (pip install numpy)"))  # fmt: skip
        return rows
    samples = []
    for seed in range(3):
        began = time.perf_counter()
        nx.spring_layout(graph, seed=seed)
        samples.append((time.perf_counter() - began) * 1000)
    rows.append(
        Row(backend, "networkx spring_layout (peer)", 3, None, statistics.median(samples),
            max(samples), note="force-directed, 50 iterations")
    )  # fmt: skip
    return rows


def run_backend(backend: str, requests: int, paced: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix=f"mesh-bench-topology-{backend}-") as tmp:
        workdir = Path(tmp)
        with database(backend, workdir) as url:
            engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
            began = time.perf_counter()
            upgrade(engine)
            count = seed(engine)
            if backend == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(text("ANALYZE"))
            engine.dispose()
            print(
                f"  {backend}: {count:,} rollup rows seeded in {time.perf_counter() - began:.0f} s"
            )
            with server(url, workdir) as port:
                rows = measure_http(port, backend, requests, paced)
            inprocess, graph = measure_inprocess(url, backend)
            return rows + inprocess + measure_layout(graph, backend)


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'backend':<11} {'what':<36} {'first ms':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'x floor':>7}  target p95 <= {TARGET_P95_MS:.0f} ms"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        first = f"{row.first_ms:.1f}" if row.first_ms is not None else ""
        ratio = f"{row.ratio_to_floor:.1f}" if row.ratio_to_floor is not None else ""
        verdict = "" if row.met is None else ("met" if row.met else "NOT MET")
        print(
            f"{row.backend:<11} {row.what:<36} {first:>8} {row.p50_ms:>8.1f} {row.p95_ms:>8.1f} "
            f"{ratio:>7}  {verdict or row.note}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per row")
    parser.add_argument(
        "--paced", type=int, default=12, help=f"requests {PACE_S} s apart per paced row"
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(
        f"mesh topology benchmark: {SERVICES} services, {EDGES} edges, 24 h of rollups; "
        f"{args.requests} sequential keep-alive requests per row after one cold request; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    rows: list[Row] = []
    for backend in args.backends.split(","):
        rows += run_backend(backend.strip(), args.requests, args.paced)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "target_p95_ms": TARGET_P95_MS,
                    "services": SERVICES,
                    "edges": EDGES,
                    "rows": [asdict(row) for row in rows],
                },
                indent=2,
            )
        )
    return 1 if any(row.met is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
