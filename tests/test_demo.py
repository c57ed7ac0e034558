"""The demo's catalog is written through the service layer, once, with its canary."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.audit.service import verify_chain
from app.db import Database, session_scope
from app.demo.runner import plan_instances
from app.demo.seed import seed_demo_catalog
from app.demo.topology import SERVICES


def test_demo_seeds_once_and_is_audited(database: Database, client: TestClient) -> None:
    for session in session_scope(database, write=True):
        assert seed_demo_catalog(session) == len(SERVICES) + 1
    for session in session_scope(database, write=True):
        assert seed_demo_catalog(session) == 0

    catalog = client.get("/api/v1/services/catalog", params={"namespace": "shop"}).json()
    assert [v["name"] for v in catalog["versions"]] == ["v1", "v2"]
    frontend = client.get("/api/v1/services/frontend", params={"namespace": "shop"}).json()
    assert frontend["dependencies"] == ["catalog", "checkout", "recommendations"]
    traffic = client.get("/api/v1/services/catalog/traffic", params={"namespace": "shop"}).json()
    assert traffic["spec"]["routes"][0]["backends"] == [
        {"version": "v1", "weight": 90},
        {"version": "v2", "weight": 10},
    ]
    with database.session(write=False) as session:
        assert verify_chain(session).ok
    page = client.get("/services", params={"namespace": "shop"})
    assert "recommendations" in page.text


def test_inventory_runs_two_replicas_each_with_its_own_agent_state() -> None:
    planned = plan_instances()
    inventory = [i for i in planned if i.service == "inventory"]
    assert [i.key for i in inventory] == ["inventory-v1", "inventory-v1-2"]
    assert len(planned) == sum(len(s.versions) * s.replicas for s in SERVICES) + 1


def test_planned_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    """Ports from the kernel's ephemeral range can be taken by the demo's own outgoing
    connections before an agent binds them (an agent once failed with "address in use")."""
    from app.demo.runner import _ephemeral_low

    ports = [
        p
        for i in plan_instances()
        for p in (i.app_port, i.inbound, i.outbound, i.admin)
        if p  # the load generator has no app and no inbound port
    ]
    assert len(ports) == len(set(ports))
    assert all(1024 <= p < _ephemeral_low() for p in ports)
