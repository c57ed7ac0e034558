"""The OTLP/HTTP receiver: what senders get back, and that a refused request stores nothing.

Spans come from the real OpenTelemetry SDK, encoded by its own OTLP encoder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.telemetry.models import Span
from tests.conftest import ADMIN_EMAIL, api_token
from tests.telemetry.support import JSON, PROTOBUF, gz, protobuf_body, sdk_spans, trace_request


def stored(database: Database) -> int:
    with database.session(write=False) as session:
        return int(session.scalar(select(func.count()).select_from(Span)) or 0)


def otlp_json(spans: list) -> bytes:  # type: ignore[type-arg]
    """OTLP JSON as an SDK sends it: protobuf's JSON mapping with hex (not base64) ids."""
    document = json_format.MessageToDict(trace_request(spans))
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        import base64

                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(document).encode()


def test_protobuf_spans_from_the_sdk_are_stored_and_searchable(
    client: TestClient, database: Database
) -> None:
    spans = sdk_spans("checkout", "shop", "v3", error=True)
    response = client.post("/v1/traces", content=protobuf_body(spans), headers=PROTOBUF)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    ExportTraceServiceResponse.FromString(response.content)  # a valid OTLP response

    trace_id = format(spans[0].context.trace_id, "032x")
    trace = client.get(f"/api/v1/traces/{trace_id}").json()
    assert trace["span_count"] == 2
    by_name = {s["name"]: s for s in trace["spans"]}
    root, child = by_name["GET /checkout"], by_name["GET /reviews"]
    assert (root["service"], root["namespace"], root["version"]) == ("checkout", "shop", "v3")
    assert root["parent_span_id"] is None
    assert child["parent_span_id"] == root["span_id"]
    assert (child["kind"], root["kind"]) == ("client", "server")
    assert child["error"] is True and child["http_status"] == 503
    assert child["attributes"]["otel.status_description"] == "upstream failed"
    assert root["error"] is False
    assert trace["error"] is True


def test_json_encoding_with_hex_ids(client: TestClient) -> None:
    spans = sdk_spans("web")
    response = client.post("/v1/traces", content=otlp_json(spans), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    trace_id = format(spans[0].context.trace_id, "032x")
    body = client.get(f"/api/v1/traces/{trace_id}").json()
    assert {s["span_id"] for s in body["spans"]} == {
        format(s.context.span_id, "016x") for s in spans
    }


def test_gzip_bodies_are_inflated(client: TestClient) -> None:
    spans = sdk_spans("web")
    headers = {**PROTOBUF, "Content-Encoding": "gzip"}
    assert (
        client.post("/v1/traces", content=gz(protobuf_body(spans)), headers=headers).status_code
        == 200
    )
    assert client.get("/api/v1/traces").json()["items"][0]["span_count"] == 2


def test_a_span_sent_twice_is_stored_once(client: TestClient, database: Database) -> None:
    body = protobuf_body(sdk_spans())
    for _ in range(2):
        assert client.post("/v1/traces", content=body, headers=PROTOBUF).status_code == 200
    assert stored(database) == 2


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"\x0a\xff\xff\xff\xff\x0fgarbage", PROTOBUF, 400, "protobuf"),
        (b"\x78\x01", PROTOBUF, 400, "not an OTLP"),  # valid protobuf, but only unknown fields
        (b'{"resourceSpans": [', JSON, 400, "JSON"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            JSON,
            400,
            "hex",
        ),
        (b'{"resourceSpans": 7}', JSON, 400, "OTLP JSON"),
        (
            gzip.compress(b"x" * 1000)[:-12],
            {**PROTOBUF, "Content-Encoding": "gzip"},
            400,
            "truncated",
        ),
        (b"not gzip at all", {**PROTOBUF, "Content-Encoding": "gzip"}, 400, "gzip"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "content type"),
        (b"", {}, 415, "content type"),
        (b"{}", {**JSON, "Content-Encoding": "br"}, 415, "encoding"),
    ],
    ids=[
        "garbage-protobuf",
        "unknown-fields-only",
        "broken-json",
        "non-hex-id",
        "wrong-json-shape",
        "truncated-gzip",
        "not-gzip",
        "text-plain",
        "no-content-type",
        "brotli",
    ],
)
def test_bad_requests_are_refused_and_store_nothing(
    client: TestClient,
    database: Database,
    body: bytes,
    headers: dict[str, str],
    status: int,
    says: str,
) -> None:
    response = client.post("/v1/traces", content=body, headers=headers)
    assert response.status_code == status
    assert says in _status_message(response)
    assert stored(database) == 0


def test_one_bad_span_refuses_the_whole_request(client: TestClient, database: Database) -> None:
    request = trace_request(sdk_spans() + sdk_spans())
    request.resource_spans[0].scope_spans[0].spans[-1].trace_id = b"\x01\x02"  # 2 bytes, not 16
    response = client.post("/v1/traces", content=request.SerializeToString(), headers=PROTOBUF)
    assert response.status_code == 400
    assert "trace id" in _status_message(response)
    assert stored(database) == 0  # the three good spans were not kept either


@pytest.fixture
def small_client(tmp_path: Path, db_url: str, database: Database) -> TestClient:
    from app.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        otlp_max_bytes=4096,
        otlp_require_token=False,
        allowed_hosts=["testserver"],
        otlp_rate_per_s=0.01,
        otlp_burst=3,
        otlp_worker_processes=0,
    )
    return TestClient(create_app(settings, database))


def test_oversize_bodies_get_413_before_and_after_gunzip(
    small_client: TestClient, database: Database
) -> None:
    with small_client as client:
        big = b"\x00" * 5000
        assert client.post("/v1/traces", content=big, headers=PROTOBUF).status_code == 413
        bomb = gzip.compress(b"\x00" * 100_000)  # a few hundred bytes on the wire
        assert len(bomb) < 4096
        response = client.post(
            "/v1/traces", content=bomb, headers={**PROTOBUF, "Content-Encoding": "gzip"}
        )
        assert response.status_code == 413
        assert "inflates" in _status_message(response)
    assert stored(database) == 0


def test_a_flooding_client_gets_429_with_retry_after_and_others_do_not(
    small_client: TestClient, database: Database
) -> None:
    body = protobuf_body(sdk_spans())
    agent_a = {**PROTOBUF, "Authorization": "Bearer agent-a"}
    with small_client as client:
        codes = [
            client.post("/v1/traces", content=body, headers=agent_a).status_code for _ in range(5)
        ]
        assert codes == [200, 200, 200, 429, 429]
        refused = client.post("/v1/traces", content=body, headers=agent_a)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        other = client.post(
            "/v1/traces", content=body, headers={**PROTOBUF, "Authorization": "Bearer agent-b"}
        )
        assert other.status_code == 200
        operator = {"Authorization": f"Bearer {api_token(database, ADMIN_EMAIL)}"}
        # the console is not throttled
        assert client.get("/api/v1/services", headers=operator).status_code == 200
        exposition = client.get("/metrics").text
    assert (
        'mesh_telemetry_rejected_requests_total{reason="rate_limited",signal="traces"}'
        in exposition
    )


def test_own_metrics_count_spans_and_rejections(client: TestClient) -> None:
    def sample(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    before = client.get("/metrics").text
    client.post("/v1/traces", content=protobuf_body(sdk_spans()), headers=PROTOBUF)
    client.post("/v1/traces", content=b"junk\xff", headers=PROTOBUF)
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    for name in ("mesh_telemetry_spans_received_total", "mesh_telemetry_spans_stored_total"):
        assert sample(after.text, name) - sample(before, name) == 2
    assert 'reason="malformed",signal="traces"' in after.text
    assert "mesh_telemetry_ingest_seconds_bucket" in after.text


def _status_message(response) -> str:  # type: ignore[no-untyped-def]
    if response.headers.get("content-type") == "application/x-protobuf":
        return str(Status.FromString(response.content).message)
    return str(response.json().get("message", ""))
