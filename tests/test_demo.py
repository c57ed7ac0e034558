"""The demo catalog is written through the service layer and only once."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.audit.service import verify_chain
from app.db import Database, session_scope
from app.demo import seed_demo_catalog


def test_demo_seeds_once_and_is_audited(database: Database, client: TestClient) -> None:
    for session in session_scope(database, write=True):
        assert seed_demo_catalog(session) > 0
    for session in session_scope(database, write=True):
        assert seed_demo_catalog(session) == 0

    reviews = client.get("/api/v1/services/reviews", params={"namespace": "bookinfo"}).json()
    assert [v["name"] for v in reviews["versions"]] == ["v1", "v2"]
    assert len(reviews["instances"]) == 2
    with database.session(write=False) as session:
        assert verify_chain(session).ok
    page = client.get("/services", params={"namespace": "bookinfo"})
    assert "productpage" in page.text
