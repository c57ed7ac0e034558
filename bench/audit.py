"""Audit integrity benchmark: what the chain badge and the signed checkpoints cost.

    .venv/bin/python bench/audit.py [--events N] [--backends sqlite,postgresql] [--json out.json]

For each backend: a throw-away database with N events (a valid chain, bulk-inserted), then

- full walk       verify_chain over every event (the peer: what the badge did on every view)
- badge, 1st      the incremental verifier's first view (a full walk that it remembers)
- badge, 2nd      the next view after 10 new events (re-check the prefix, read the 10)
- record x500     500 audit events in their own transactions, without a checkpointer
- ... + signing   the same with the checkpointer attached (every 100 events: sign, fsync, insert)

Ratios are against the full walk for the badge rows and against plain recording for the signing
row. In-process (no HTTP), medians of --rounds runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.audit import service as audit  # noqa: E402
from app.audit.checkpoints import Checkpointer, CheckpointFile, CheckpointSigner  # noqa: E402
from app.audit.models import AuditEvent  # noqa: E402
from app.db import Database  # noqa: E402
from app.migrate import upgrade  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "MESH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def seed(database: Database, count: int) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    previous = audit.GENESIS_HASH
    rows = []
    for seq in range(1, count + 1):
        fields = {
            "seq": seq,
            "occurred_at": start + timedelta(seconds=seq),
            "actor": f"user-{seq % 17}@example.com",
            "action": "service.update",
            "resource_kind": "service",
            "resource_name": f"default/svc-{seq % 500}",
            "before": {"owner_team": "a", "labels": {"tier": "web"}},
            "after": {"owner_team": "b", "labels": {"tier": "web"}},
            "reason": "benchmark",
            "prev_hash": previous,
        }
        previous = audit.event_hash(**fields)
        rows.append({**fields, "hash": previous})
    with database.engine.begin() as connection:
        for offset in range(0, len(rows), 5000):
            connection.execute(insert(AuditEvent), rows[offset : offset + 5000])


def timed(action: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        action()
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def record(database: Database, count: int) -> None:
    for _ in range(count):
        with database.session(write=True) as session:
            audit.record(
                session,
                "bench",
                action="service.update",
                resource_kind="service",
                resource_name="default/bench",
                before=None,
                after={"n": 1},
            )
            session.commit()


def measure(url: str, events: int, rounds: int, folder: Path) -> dict[str, float]:
    database = Database(url)
    upgrade(database.engine)
    seed(database, events)
    results: dict[str, float] = {}
    with database.session(write=False) as session:
        results["full walk"] = timed(lambda: audit.verify_chain(session), rounds)
    prefix = audit.VerifiedPrefix()
    with database.session(write=False) as session:
        results["badge, 1st"] = timed(lambda: prefix.verify(session), 1)

    def second_view() -> None:
        record(database, 10)
        with database.session(write=False) as session:
            began = time.perf_counter()
            prefix.verify(session)
            second_view.ms = (time.perf_counter() - began) * 1000  # type: ignore[attr-defined]

    samples = []
    for _ in range(rounds):
        second_view()
        samples.append(second_view.ms)  # type: ignore[attr-defined]
    results["badge, 2nd"] = statistics.median(samples)

    results["record x500"] = timed(lambda: record(database, 500), rounds)
    signer = CheckpointSigner.load_or_create(folder / f"{uuid.uuid4().hex}.key")
    checkpointer = Checkpointer(
        database, signer, CheckpointFile(folder / f"{uuid.uuid4().hex}.jsonl"), every=100
    )
    checkpointer.attach()
    results["... + signing"] = timed(lambda: record(database, 500), rounds)
    checkpointer.detach()
    database.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-audit-") as tmp:
        folder = Path(tmp)
        for backend in args.backends.split(","):
            if backend == "sqlite":
                report[backend] = measure(
                    f"sqlite:///{folder / 'audit.db'}", args.events, args.rounds, folder
                )
                continue
            admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
            name = f"mesh_bench_{uuid.uuid4().hex[:10]}"
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                url = make_url(POSTGRES_ADMIN_URL).set(database=name)
                report[backend] = measure(
                    url.render_as_string(hide_password=False), args.events, args.rounds, folder
                )
            finally:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    print(f"audit log of {args.events:,} events; median of {args.rounds} rounds, ms")
    print(f"{'':16}" + "".join(f"{backend:>22}" for backend in report))
    peers = {"badge, 1st": "full walk", "badge, 2nd": "full walk", "... + signing": "record x500"}
    for row in ("full walk", "badge, 1st", "badge, 2nd", "record x500", "... + signing"):
        cells = []
        for figures in report.values():
            peer = peers.get(row, row)
            ratio = figures[row] / figures[peer] if figures[peer] else 0.0
            cells.append(f"{figures[row]:>10.1f} ({ratio:>6.3f}x)")
        print(f"{row:16}" + "".join(f"{cell:>22}" for cell in cells))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
