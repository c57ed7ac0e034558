"""Console benchmark: the four pages people open most, through real HTTP, on SQLite and PostgreSQL.

    .venv/bin/python bench/catalog.py [--json out.json] [--requests N] [--backends sqlite,...]

For each backend it creates a throw-away database, migrates it, seeds 1,000 services x 3 versions
(x 2 instances) and 10,000 audit events (SQLAlchemy Core bulk inserts; the events still form a
valid hash chain, made with the audit module's own hashing), starts ``meshctl serve`` on it and
times, from a client on loopback over one keep-alive connection, N sequential requests per page
after a warm-up:

- catalog       GET /services                               (full page, first 25 of 1,000)
- live search   GET /services?q=... with HX-Request         (the results fragment)
- service       GET /services/<ns>/<name>                   (versions, instances, recent changes)
- audit         GET /audit                                  (full page, 50 events with diffs)
- audit verify  GET /audit/verify                           (the chain badge the page loads next)

Its peer, measured in the same run, is ``/healthz``: the floor of uvicorn + FastAPI + loopback HTTP
on this machine, so the ratio column says how much of each page is our own work.

PostgreSQL: a temporary database on 127.0.0.1:5432 as user ``postgres`` (trust auth), or
``MESH_BENCH_POSTGRES_URL``; dropped at the end. Target: p95 <= 50 ms per page.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
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

from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.audit.models import AuditEvent  # noqa: E402
from app.audit.service import GENESIS_HASH, event_hash  # noqa: E402
from app.catalog.models import Instance, Service, Version  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.migrate import upgrade  # noqa: E402

TARGET_P95_MS = 50.0
SERVICES = 1_000
VERSIONS = 3
INSTANCES = 2
AUDIT_EVENTS = 10_000
NAMESPACES = ["default", "payments", "search", "identity", "media", "checkout", "ads", "infra"]
TEAMS = [f"team-{name}" for name in ("atlas", "borealis", "cobalt", "delta", "ember", "fjord")]
WORDS = ["reviews", "ratings", "ledger", "auth", "catalog", "cart", "search", "images", "mail"]
POSTGRES_ADMIN_URL = os.environ.get(
    "MESH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


def service_name(i: int) -> tuple[str, str]:
    return NAMESPACES[i % len(NAMESPACES)], f"{WORDS[i % len(WORDS)]}-{i:04d}"


def seed(engine: Engine) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    services = []
    for i in range(SERVICES):
        namespace, name = service_name(i)
        services.append(
            {
                "namespace": namespace,
                "name": name,
                "owner_team": TEAMS[i % len(TEAMS)],
                "description": f"The {WORDS[i % len(WORDS)]} service, shard {i}.",
                "links": [{"title": "Runbook", "url": f"https://wiki.example.com/{name}"}],
                "labels": {"tier": "backend" if i % 3 else "frontend", "app": name},
                "revision": 1,
                "created_at": start,
                "updated_at": start,
            }
        )
    with engine.begin() as connection:
        connection.execute(insert(Service), services)
        ids = {name: id_ for name, id_ in connection.execute(select(Service.name, Service.id))}
        versions, instances = [], []
        for svc in services:
            sid = ids[svc["name"]]
            for v in range(1, VERSIONS + 1):
                versions.append(
                    {
                        "service_id": sid,
                        "name": f"v{v}",
                        "labels": {"track": "canary" if v == VERSIONS else "stable"},
                        "created_at": start,
                    }
                )
            for k in range(INSTANCES):
                instances.append(
                    {
                        "service_id": sid,
                        "address": f"10.{k}.{sid // 250}.{sid % 250}:8080",
                        "version": f"v{k % VERSIONS + 1}",
                        "health": "healthy",
                        "last_seen_at": start,
                        "created_at": start,
                    }
                )
        connection.execute(insert(Version), versions)
        connection.execute(insert(Instance), instances)
        connection.execute(insert(AuditEvent), audit_chain(services, start))


def audit_chain(services: list[dict[str, Any]], start: datetime) -> list[dict[str, Any]]:
    """service.create, then version.create x3, then updates, chained like the real writer."""
    planned: list[tuple[str, str, str, dict[str, Any] | None, dict[str, Any] | None]] = []
    for svc in services:
        qualified = f"{svc['namespace']}/{svc['name']}"
        after = {k: svc[k] for k in ("namespace", "name", "owner_team", "description", "links")}
        planned.append(("service.create", "service", qualified, None, {**after, "labels": {}}))
        for v in range(1, VERSIONS + 1):
            planned.append(
                ("version.create", "version", f"{qualified}/v{v}", None, {"name": f"v{v}"})
            )
    i = 0
    while len(planned) < AUDIT_EVENTS:
        svc = services[i % len(services)]
        qualified = f"{svc['namespace']}/{svc['name']}"
        planned.append(
            (
                "service.update",
                "service",
                qualified,
                {"labels": {"tier": "old"}, "owner_team": "team-old"},
                {"labels": {"tier": "new"}, "owner_team": svc["owner_team"]},
            )
        )
        i += 1
    rows = []
    prev_hash = GENESIS_HASH
    for seq, (action, kind, name, before, after) in enumerate(planned[:AUDIT_EVENTS], start=1):
        fields: dict[str, Any] = {
            "seq": seq,
            "occurred_at": start + timedelta(seconds=seq),
            "actor": "bench@seed",
            "action": action,
            "resource_kind": kind,
            "resource_name": name,
            "before": before,
            "after": after,
            "reason": "seeded by bench/catalog.py" if seq % 10 == 0 else "",
            "prev_hash": prev_hash,
        }
        prev_hash = event_hash(**fields)
        rows.append({**fields, "hash": prev_hash})
    return rows


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
    page: str
    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    bytes: int
    ratio_to_floor: float | None = None
    met: bool | None = None


PAGES: dict[str, tuple[list[str], dict[str, str]]] = {
    "healthz (floor)": (["/healthz"], {}),
    "catalog": (["/services"], {}),
    "live search": (
        [f"/services?q={word}" for word in (*WORDS, "shard+4", "team-cobalt", "ledger-06")],
        {"HX-Request": "true"},
    ),
    "service": (
        ["/services/{}/{}".format(*service_name(i)) for i in range(0, SERVICES, 37)],
        {},
    ),
    "audit": (["/audit"], {}),
    # Loaded by the audit page after it shows; walks and re-hashes all 10,000 events.
    "audit verify": (["/audit/verify"], {"HX-Request": "true"}),
}


TARGETED = ("catalog", "live search", "service", "audit")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure(port: int, backend: str, requests: int, warmup: int) -> list[Row]:
    rows = []
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for page, (paths, headers) in PAGES.items():
        samples: list[float] = []
        size = 0
        for i in range(warmup + requests):
            path = paths[i % len(paths)]
            began = time.perf_counter()
            connection.request("GET", path, headers={"Connection": "keep-alive", **headers})
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - began) * 1000
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}: {body[:200]!r}")
            if i >= warmup:
                samples.append(elapsed)
                size = max(size, len(body))
        rows.append(
            Row(
                backend=backend,
                page=page,
                requests=requests,
                p50_ms=statistics.median(samples),
                p95_ms=percentile(samples, 0.95),
                p99_ms=percentile(samples, 0.99),
                max_ms=max(samples),
                bytes=size,
            )
        )
    connection.close()
    floor = rows[0].p95_ms
    for row in rows[1:]:
        row.ratio_to_floor = row.p95_ms / floor if floor else None
        if row.page in TARGETED:
            row.met = row.p95_ms <= TARGET_P95_MS
    return rows


def run_backend(backend: str, requests: int, warmup: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix=f"mesh-bench-{backend}-") as tmp:
        workdir = Path(tmp)
        with database(backend, workdir) as url:
            engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
            began = time.perf_counter()
            upgrade(engine)
            seed(engine)
            if backend == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(text("ANALYZE"))
            engine.dispose()
            print(f"  {backend}: migrated and seeded in {time.perf_counter() - began:.1f} s")
            with server(url, workdir) as port:
                return measure(port, backend, requests, warmup)


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'backend':<11} {'page':<16} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'x floor':>7} {'KiB':>6}  target p95 <= {TARGET_P95_MS:.0f} ms"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row.ratio_to_floor:.1f}" if row.ratio_to_floor is not None else "1.0"
        if row.met is None:
            verdict = "(no target: loaded after the page)" if row.page == "audit verify" else ""
        else:
            verdict = "met" if row.met else "NOT MET"
        print(
            f"{row.backend:<11} {row.page:<16} {row.p50_ms:>7.1f} {row.p95_ms:>7.1f} "
            f"{row.p99_ms:>7.1f} {ratio:>7} {row.bytes / 1024:>6.1f}  {verdict}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per page")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per page first")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(
        f"mesh console benchmark: {SERVICES} services x {VERSIONS} versions, "
        f"{AUDIT_EVENTS} audit events; {args.requests} sequential keep-alive requests per page "
        f"after {args.warmup} warm-up; {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs"
    )
    rows: list[Row] = []
    for backend in args.backends.split(","):
        rows += run_backend(backend.strip(), args.requests, args.warmup)
    print()
    print_table(rows)
    missed = [row for row in rows if row.met is False]
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "target_p95_ms": TARGET_P95_MS,
                    "services": SERVICES,
                    "versions_per_service": VERSIONS,
                    "audit_events": AUDIT_EVENTS,
                    "rows": [asdict(row) for row in rows],
                },
                indent=2,
            )
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
