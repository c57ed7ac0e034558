"""What the receiver's own ASGI path (app.telemetry.asgi) keeps of the console's stack, and
what it answers that the stack answered: the Host/Origin checks and security headers, a 503 for
a busy database, a logged 500 for a bug; exports up to MESH_OTLP_MAX_BYTES whatever the
console's body limit; and how long a rotated or revoked join token keeps working."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.agents import join, token
from app.config import Settings
from app.db import Database
from app.telemetry.models import EdgeRollup, Span
from tests.conftest import ADMIN_EMAIL, api_token
from tests.telemetry.support import (
    JSON,
    PROTOBUF,
    duration_point,
    metrics_document,
    metrics_protobuf,
    protobuf_body,
    sdk_spans,
    trace_request,
)

CONSOLE_BODY_LIMIT = 4096


@pytest.fixture
def client(tmp_path: Path, db_url: str, database: Database) -> Iterator[TestClient]:
    from app.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        allowed_hosts=["testserver"],
        otlp_worker_processes=0,
        max_body_bytes=CONSOLE_BODY_LIMIT,
        otlp_max_bytes=64 * 1024,
    )
    with TestClient(create_app(settings, database)) as test_client:
        yield test_client


def _agent(client: TestClient, secret: str | None = None) -> dict[str, str]:
    secret = secret or client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {secret}", "X-Mesh-Agent": "a"}


def _metrics() -> bytes:
    now = time.time_ns()
    point = duration_point(
        source="web",
        destination="reviews",
        destination_version="v1",
        status_class="2xx",
        samples_ms=[3.0],
        start_ns=now - 5 * 10**9,
        end_ns=now,
    )
    return metrics_protobuf(metrics_document([point]))


def _count(database: Database, model: type[Span] | type[EdgeRollup]) -> int:
    with database.session(write=False) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_exports_are_limited_by_the_otlp_limit_not_the_consoles(
    client: TestClient, database: Database
) -> None:
    request = trace_request(sdk_spans())
    attribute = request.resource_spans[0].scope_spans[0].spans[0].attributes.add()
    attribute.key = "note"
    attribute.value.string_value = "x" * (3 * CONSOLE_BODY_LIMIT)
    body = request.SerializeToString()
    assert CONSOLE_BODY_LIMIT < len(body) < 64 * 1024
    answer = client.post("/v1/traces", content=body, headers={**PROTOBUF, **_agent(client)})
    assert answer.status_code == 200
    assert _count(database, Span) == 2
    # The console's own routes keep their limit.
    console = client.post(
        "/api/v1/agents", content=b"{" + b" " * CONSOLE_BODY_LIMIT + b"}", headers=JSON
    )
    assert console.status_code == 413


def test_host_and_origin_checks_and_security_headers_still_apply(
    client: TestClient, database: Database
) -> None:
    headers = {**PROTOBUF, **_agent(client)}
    foreign_host = client.post(
        "/v1/metrics", content=_metrics(), headers={**headers, "Host": "evil.example"}
    )
    assert foreign_host.status_code == 400
    cross_site = client.post(
        "/v1/metrics", content=_metrics(), headers={**headers, "Origin": "http://evil.example"}
    )
    assert cross_site.status_code == 403
    assert _count(database, EdgeRollup) == 0
    accepted = client.post("/v1/metrics", content=_metrics(), headers=headers)
    assert accepted.status_code == 200
    assert accepted.headers["x-content-type-options"] == "nosniff"
    assert accepted.headers["x-frame-options"] == "DENY"
    assert "set-cookie" not in accepted.headers  # no CSRF cookie: there is no page here


def test_a_json_export_that_is_not_text_is_a_400(client: TestClient, database: Database) -> None:
    headers = {**JSON, **_agent(client)}
    lone = b'{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name",' + (
        b'"value":{"stringValue":"a\\ud800"}}]}}]}'
    )
    assert client.post("/v1/metrics", content=lone, headers=headers).status_code == 400
    invalid = b'{"resourceMetrics":[{"schemaUrl":"\xff"}]}'
    assert client.post("/v1/metrics", content=invalid, headers=headers).status_code == 400
    assert _count(database, EdgeRollup) == 0


def test_a_busy_database_is_a_503_and_a_bug_a_logged_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = client.app.state.otlp_receiver  # type: ignore[attr-defined]
    headers = {**PROTOBUF, **_agent(client)}

    async def locked(*_: Any) -> bytes:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(receiver, "store_metrics", locked)
    busy = client.post("/v1/metrics", content=_metrics(), headers=headers)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"

    async def broken(*_: Any) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(receiver, "store_metrics", broken)
    with caplog.at_level(logging.ERROR, logger="app.telemetry.asgi"):
        failed = client.post("/v1/metrics", content=_metrics(), headers=headers)
    assert failed.status_code == 500
    assert "a bug" in caplog.text


class _Clock:
    """``time`` for one module under test: its monotonic clock moves only when told."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # where earlier readings (before the patch) left off

    def monotonic(self) -> float:
        return self.now


def test_a_revoked_join_token_stops_working_within_its_recheck_interval(
    client: TestClient, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(join, "time", clock)
    operator = {"Authorization": f"Bearer {api_token(database, ADMIN_EMAIL)}"}
    made = client.post(
        "/api/v1/join-tokens", json={"name": "shop", "namespace": "shop"}, headers=operator
    )
    assert made.status_code == 201
    headers = {**PROTOBUF, **_agent(client, made.json()["token"])}
    assert client.post("/v1/metrics", content=_metrics(), headers=headers).status_code == 200

    revoked = client.delete(f"/api/v1/tokens/{made.json()['details']['id']}", headers=operator)
    assert revoked.status_code == 204
    # Until the cached grant is looked up again (at most join.RECHECK_S), it may still pass;
    # from then on it is refused.
    clock.now += join.RECHECK_S
    assert client.post("/v1/metrics", content=_metrics(), headers=headers).status_code == 401


def test_a_rotated_token_file_is_noticed_within_its_recheck_interval(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(token, "time", clock)
    served = client.app.state.hub.token  # type: ignore[attr-defined]
    old = {**PROTOBUF, **_agent(client)}
    assert client.post("/v1/metrics", content=_metrics(), headers=old).status_code == 200
    new_secret = token.JoinToken(served.path).rotate()  # another process: meshctl token rotate
    clock.now += token.RECHECK_S
    assert client.post("/v1/metrics", content=_metrics(), headers=old).status_code == 401
    new = {**PROTOBUF, **_agent(client, new_secret)}
    assert client.post("/v1/metrics", content=_metrics(), headers=new).status_code == 200


def test_the_receiver_routes_answer_alike_without_the_ingest_path(
    client: TestClient, database: Database
) -> None:
    """The FastAPI routes (kept for the OpenAPI document and apps without the ASGI path) share
    the answer: same statuses for the same requests."""
    app = client.app
    app.otlp_ingest = None  # type: ignore[attr-defined]
    headers = {**PROTOBUF, **_agent(client)}
    assert (
        client.post("/v1/traces", content=protobuf_body(sdk_spans()), headers=headers).status_code
        == 200
    )
    assert client.post("/v1/metrics", content=_metrics(), headers=headers).status_code == 200
    assert client.post("/v1/metrics", content=b"\xff junk", headers=headers).status_code == 400
    text = {**headers, "Content-Type": "text/plain"}
    assert client.post("/v1/metrics", content=_metrics(), headers=text).status_code == 415
    assert client.post("/v1/metrics", content=_metrics(), headers=PROTOBUF).status_code == 401
    assert _count(database, Span) == 2
