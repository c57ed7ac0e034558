"""The admin listener: /ready, /metrics, /config."""

from __future__ import annotations

import httpx
import pytest

from mesh_agent.admin import AdminServer
from mesh_agent.balancer import EndpointRegistry
from mesh_agent.config import ConfigError, parse_config
from mesh_agent.control import ConfigStore

from .support import FakeTelemetry, run

pytestmark = pytest.mark.e2e

GOOD = "services: [{name: reviews, versions: {v1: {endpoints: ['10.0.0.1:80']}}}]"


def test_admin_endpoints() -> None:
    async def scenario() -> None:
        store = ConfigStore(EndpointRegistry(), None)
        admin = AdminServer(
            config=store,
            metrics=FakeTelemetry(),
            bootstrap={"service": "web"},
            extra_metrics=lambda: b"extra_metric 1\n",
        )
        _, port = await admin.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.get("/ready")
                assert r.status_code == 503

                loaded = parse_config(GOOD, "test")
                store.offer(loaded)
                r = await c.get("/ready")
                assert r.status_code == 200 and loaded.version in r.text

                r = await c.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
                assert r.text == "# fake\nextra_metric 1\n"

                try:
                    parse_config("services: [{name: reviews}]", "push")
                except ConfigError as exc:
                    store.reject(exc)
                doc = (await c.get("/config")).json()
                assert doc["bootstrap"] == {"service": "web"}
                assert doc["version"] == loaded.version
                assert doc["config"]["services"][0]["name"] == "reviews"
                assert doc["last_error"]["issues"] == [
                    {"path": "services[0].versions", "message": "Field required"}
                ]

                assert (await c.get("/nope")).status_code == 404
                assert (await c.post("/ready")).status_code == 405
        finally:
            await admin.close()

    run(scenario())
