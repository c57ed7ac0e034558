"""Property-based fuzzing of the whole JSON API from its OpenAPI document: whatever the input,
the answer is never a server error (5xx)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import Settings
from app.db import Database, make_engine
from app.main import create_app
from app.migrate import upgrade


def _fuzz_app() -> Any:
    # schemathesis parametrizes at collection time, so the app (on its own throw-away SQLite
    # file) is built when the module is imported.
    folder = Path(tempfile.mkdtemp(prefix="mesh-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    url = f"sqlite:///{folder / 'fuzz.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    # The test client's Host is "testserver"; the fuzzer must get past the Host check to
    # reach the routes it fuzzes.
    settings = Settings(data_dir=folder, database_url=url, allowed_hosts=["testserver"])
    return create_app(settings, Database(url))


schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app())


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_produces_a_server_error(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
