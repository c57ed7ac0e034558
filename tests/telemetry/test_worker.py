"""The span worker process: exports sent together share a transaction, yet each is judged on
its own, and the worker leaves when the console shuts it down."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.telemetry import otlp
from app.telemetry.models import Span
from app.telemetry.receiver import SpanWorker
from tests.telemetry.support import PROTOBUF, gz, protobuf_body, sdk_spans

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ENCODING = PROTOBUF["Content-Type"]


def stored_services(database: Database) -> dict[str, int]:
    with database.session(write=False) as session:
        rows = session.execute(select(Span.service, func.count()).group_by(Span.service))
        return {service: count for service, count in rows}


def test_a_refused_export_stores_nothing_and_fails_none_of_those_sent_with_it(
    tmp_path: Path, db_url: str, database: Database
) -> None:
    worker = SpanWorker(db_url, Settings(data_dir=tmp_path, database_url=db_url))
    try:
        # Sent before the new process can read any: it finds all four waiting in its pipe,
        # the case in which exports share one transaction.
        futures = [
            worker.submit((protobuf_body(sdk_spans("web")), ENCODING, None)),
            worker.submit((b"\xff\xff not protobuf", ENCODING, None)),
            worker.submit((gz(protobuf_body(sdk_spans("api"))), ENCODING, "gzip")),
            worker.submit((protobuf_body(sdk_spans("web")), ENCODING, None)),
        ]
        first, _, third, fourth = (f for f in futures)
        assert first.result(timeout=60)[1:3] == (2, 2)
        with pytest.raises(otlp.OtlpError) as refused:
            futures[1].result(timeout=60)
        assert refused.value.status == 400
        assert third.result(timeout=60)[1:3] == (2, 2)
        assert fourth.result(timeout=60)[1:3] == (2, 2)
    finally:
        worker.close()
    assert stored_services(database) == {"web": 4, "api": 2}


def test_the_worker_leaves_when_closed_and_a_closed_worker_takes_nothing(
    tmp_path: Path, db_url: str, database: Database
) -> None:
    worker = SpanWorker(db_url, Settings(data_dir=tmp_path, database_url=db_url))
    worker.submit((protobuf_body(sdk_spans("web")), ENCODING, None)).result(timeout=60)
    process = worker._channel.process if worker._channel else None
    assert process is not None and process.is_alive()
    worker.close()
    assert not process.is_alive()
    assert process.exitcode == 0  # left by itself, not killed
    with pytest.raises(RuntimeError):
        worker.submit((protobuf_body(sdk_spans("web")), ENCODING, None))
