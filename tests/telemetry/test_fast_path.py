"""The ASGI fast path (app.telemetry.asgi) answers OTLP exports itself, with every status the
routes gave: here the FastAPI routes for /v1/traces and /v1/metrics are taken out of the app, so
whatever answers a POST to them is the fast path."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from google.rpc.status_pb2 import Status
from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.telemetry import api
from app.telemetry.models import EdgeRollup, Span
from tests.telemetry.support import (
    PROTOBUF,
    duration_point,
    metrics_document,
    metrics_protobuf,
    protobuf_body,
    sdk_spans,
)

OTLP_PATHS = {"/v1/traces", "/v1/metrics"}


def _without_receiver_routes(app: FastAPI) -> FastAPI:
    """The app without the receiver's FastAPI routes (included directly or, in newer FastAPI,
    through a wrapper that keeps the included router as ``original_router``)."""

    def is_receiver(route: object) -> bool:
        if isinstance(route, APIRoute):
            return route.path in OTLP_PATHS
        return getattr(route, "original_router", None) is api.receiver

    app.router.routes[:] = [route for route in app.router.routes if not is_receiver(route)]
    assert not any(is_receiver(route) for route in app.router.routes)
    return app


@pytest.fixture
def fast_app(tmp_path: Path, db_url: str, database: Database) -> Iterator[tuple[TestClient, str]]:
    """(client, join token) of an app whose only way to take telemetry is the fast path."""
    from app.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        allowed_hosts=["testserver"],
        otlp_worker_processes=0,
        otlp_max_bytes=64 * 1024,
        otlp_rate_per_s=0.01,
        otlp_burst=4,
    )
    app = _without_receiver_routes(create_app(settings, database))
    with TestClient(app) as client:
        token = app.state.hub.token.ensure()
        yield client, token


def count(database: Database, model: type[Span] | type[EdgeRollup]) -> int:
    with database.session(write=False) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def message(response) -> str:  # type: ignore[no-untyped-def]
    if response.headers.get("content-type") == "application/x-protobuf":
        return str(Status.FromString(response.content).message)
    return str(response.json().get("message", ""))


def metrics_body() -> bytes:
    import time

    now = time.time_ns()
    point = duration_point(
        source="web",
        destination="reviews",
        destination_version="v1",
        status_class="5xx",
        samples_ms=[3.0, 40.0],
        start_ns=now - 5 * 10**9,
        end_ns=now,
    )
    return metrics_protobuf(metrics_document([point]))


def test_spans_and_metrics_are_stored_through_the_fast_path(
    fast_app: tuple[TestClient, str], database: Database
) -> None:
    client, token = fast_app
    auth = {**PROTOBUF, "Authorization": f"Bearer {token}", "X-Mesh-Agent": "a"}
    traces = client.post("/v1/traces", content=protobuf_body(sdk_spans()), headers=auth)
    assert traces.status_code == 200
    assert traces.headers["content-type"] == "application/x-protobuf"
    metrics = client.post("/v1/metrics", content=metrics_body(), headers=auth)
    assert metrics.status_code == 200
    assert count(database, Span) == 2
    assert count(database, EdgeRollup) == 3  # one bucket per resolution
    # Gzip takes the decode-in-a-thread branch of the metrics path.
    zipped = client.post(
        "/v1/metrics",
        content=gzip.compress(metrics_body()),
        headers={**auth, "Content-Encoding": "gzip"},
    )
    assert zipped.status_code == 200


def test_the_fast_path_refuses_what_the_routes_refused(
    fast_app: tuple[TestClient, str], database: Database
) -> None:
    client, token = fast_app
    body = protobuf_body(sdk_spans())
    auth = {"Authorization": f"Bearer {token}"}

    no_token = client.post("/v1/traces", content=body, headers=PROTOBUF)
    assert no_token.status_code == 401
    assert "join token" in no_token.json()["detail"]
    wrong_token = client.post(
        "/v1/metrics", content=body, headers={**PROTOBUF, "Authorization": "Bearer nope"}
    )
    assert wrong_token.status_code == 401

    agent = {**auth, "X-Mesh-Agent": "one"}
    text = client.post("/v1/traces", content=body, headers={**agent, "Content-Type": "text/plain"})
    assert text.status_code == 415
    assert "content type" in message(text)
    garbage = client.post("/v1/traces", content=b"\xff\x00junk", headers={**PROTOBUF, **agent})
    assert garbage.status_code == 400
    big = client.post("/v1/metrics", content=b"\x00" * 70_000, headers={**PROTOBUF, **agent})
    assert big.status_code == 413
    # The fourth request spent this client's burst of 4; others still get through.
    throttled = client.post("/v1/traces", content=body, headers={**PROTOBUF, **agent})
    assert throttled.status_code == 200
    throttled = client.post("/v1/traces", content=body, headers={**PROTOBUF, **agent})
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) >= 1
    other = {**auth, "X-Mesh-Agent": "two"}
    another_trace = protobuf_body(sdk_spans())
    accepted = client.post("/v1/traces", content=another_trace, headers={**PROTOBUF, **other})
    assert accepted.status_code == 200
    assert count(database, Span) == 4  # the two accepted requests, nothing of the refused


def test_a_saturated_receiver_answers_503_with_retry_after(
    fast_app: tuple[TestClient, str], database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, token = fast_app
    headers = {**PROTOBUF, "Authorization": f"Bearer {token}", "X-Mesh-Agent": "a"}
    receiver = client.app.state.otlp_receiver  # type: ignore[attr-defined]
    monkeypatch.setattr(type(receiver.slots), "full", property(lambda self: True))
    busy = client.post("/v1/traces", content=protobuf_body(sdk_spans()), headers=headers)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert count(database, Span) == 0


def test_other_methods_and_paths_still_reach_the_console(
    fast_app: tuple[TestClient, str],
) -> None:
    client, _ = fast_app
    # Not POST: left to FastAPI, which no longer has the route here, so 404 or 405.
    assert client.get("/v1/traces").status_code in (404, 405)
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_full_app_answers_get_on_the_receiver_paths_with_405(
    tmp_path: Path, db_url: str, database: Database
) -> None:
    from app.main import create_app

    settings = Settings(data_dir=tmp_path, database_url=db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/v1/traces").status_code == 405
        assert client.get("/v1/metrics").status_code == 405
