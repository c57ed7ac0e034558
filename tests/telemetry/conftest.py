"""A real receiver: the control plane served by uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from app.config import Settings
from app.db import Database


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Spans stored by threads of the test's process: a worker process per test would cost a
    second or more each. The worker-process path has its own tests (``process_receiver``).
    These tests are about what the receiver does with a request; the join-token check in front
    of it is tested in tests/telemetry/test_auth.py."""
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        otlp_worker_processes=0,
        otlp_require_token=False,
        allowed_hosts=["testserver", "127.0.0.1"],
    )


@dataclass
class LiveReceiver:
    url: str
    database: Database


@pytest.fixture
def live_receiver(settings: Settings, database: Database) -> Iterator[LiveReceiver]:
    yield from _serve(settings, database)


@pytest.fixture
def process_receiver(tmp_path: Path, db_url: str, database: Database) -> Iterator[LiveReceiver]:
    """A live receiver that stores spans in a worker process, as ``meshctl serve`` does."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        otlp_worker_processes=1,
        otlp_require_token=False,
        allowed_hosts=["testserver", "127.0.0.1"],
    )
    yield from _serve(settings, database)


def _serve(settings: Settings, database: Database) -> Iterator[LiveReceiver]:
    from app.main import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, database), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, name="live-receiver", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.02)
        yield LiveReceiver(f"http://127.0.0.1:{port}", database)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
