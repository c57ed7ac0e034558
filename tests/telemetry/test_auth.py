"""By default the OTLP receiver takes telemetry only from holders of the mesh join token."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Database
from app.main import create_app
from tests.conftest import ADMIN_EMAIL, api_token
from tests.telemetry.support import protobuf_body, sdk_spans


def test_otlp_needs_the_join_token(tmp_path: Path, db_url: str, database: Database) -> None:
    settings = Settings(data_dir=tmp_path, database_url=db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings, database)) as client:
        token = client.app.state.hub.token.ensure()  # type: ignore[attr-defined]
        # Reading traces is an operator's request, with their own token.
        operator = {"authorization": f"Bearer {api_token(database, ADMIN_EMAIL)}"}
        body = protobuf_body(sdk_spans())
        headers = {"content-type": "application/x-protobuf"}
        assert client.post("/v1/traces", content=body, headers=headers).status_code == 401
        wrong = {**headers, "authorization": "Bearer nope"}
        assert client.post("/v1/traces", content=body, headers=wrong).status_code == 401
        assert client.get("/api/v1/traces", headers=operator).json()["items"] == []
        right = {**headers, "authorization": f"Bearer {token}"}
        assert client.post("/v1/traces", content=body, headers=right).status_code == 200
        assert client.get("/api/v1/traces", headers=operator).json()["items"] != []
