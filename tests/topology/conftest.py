"""A real ``meshctl serve`` over a SQLite file seeded with a small mesh's catalog and traffic,
for the Playwright tests of the topology page (Chromium comes from tests/browser)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.db import Database, make_engine
from app.migrate import upgrade
from tests.browser.conftest import REPO_ROOT, browser, free_port, meshctl, wait_until_ready
from tests.topology.support import insert_rollups, rollup_rows

__all__ = ["browser"]

# outside → productpage → reviews (v1 fine, v2 failing) → ratings; productpage → details.
SERVICES = [
    ("productpage", "web"),
    ("reviews", "books"),
    ("ratings", "books"),
    ("details", "books"),
]


def seed_mesh(url: str) -> None:
    upgrade(make_engine(url))
    database = Database(url)
    now = datetime.now(UTC)
    rows = []
    for step in range(1, 30):
        at = now - timedelta(seconds=10 * step)
        rows += rollup_rows(at, "", "productpage", requests=50)
        rows += rollup_rows(at, "productpage", "reviews", requests=30, latencies_ms=[8, 30])
        rows += rollup_rows(
            at, "productpage", "reviews", requests=10, failures=4, dest_version="v2"
        )
        rows += rollup_rows(at, "reviews", "ratings", requests=20)
        rows += rollup_rows(at, "productpage", "details", requests=50)
    with database.session(write=True) as session:
        for name, team in SERVICES:
            data = ServiceCreate(name=name, owner_team=team)
            catalog.create_service(session, "seed", data=data)
        insert_rollups(session, rows)
        session.commit()
    database.dispose()


@pytest.fixture(scope="session")
def mesh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("topology-server")
    url = f"sqlite:///{data_dir / 'mesh.db'}"
    seed_mesh(url)
    port = free_port()
    env = {**os.environ, "MESH_DATABASE_URL": url, "MESH_DATA_DIR": str(data_dir)}
    with (data_dir / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [*meshctl(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(base, process)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
