"""Registration and the discovery long poll through the API, with xDS semantics: ACK, NACK
with the version kept, stale nonces ignored, no re-push of what an agent runs or refused."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import Database, utcnow
from app.identity.models import ApiToken
from tests.agents.conftest import registration


def register(cp: TestClient, service: str, version: str, address: str | None) -> str:
    answer = cp.post("/api/v1/agents", json=registration(service, version, address))
    assert answer.status_code == 200, answer.text
    return str(answer.json()["agent_id"])


def poll(cp: TestClient, agent_id: str, **body: Any) -> Any:
    request = {"service": "x", "service_version": "v1", "agent_id": agent_id, **body}
    return cp.post(f"/api/v1/agents/{agent_id}/discovery", json=request)


def answer(cp: TestClient, agent_id: str, **body: Any) -> Any:
    """The next snapshot for a poll that acks nothing: a poll is held only 0.3 s here, so on a
    busy machine a snapshot still being built answers 204 first; ask again until it is there."""
    deadline = time.monotonic() + 30.0
    while True:
        response = poll(cp, agent_id, **body)
        if response.status_code != 204:
            assert response.status_code == 200, response.text
            return response.json()
        assert time.monotonic() < deadline, "no snapshot within 30 s"


def agents(cp: TestClient) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in cp.get("/api/v1/agents").json()["items"]}


def _weights_of(snapshot: dict[str, Any], service: str) -> dict[str, int]:
    """The weights of ``service``'s first route in a discovery answer."""
    config = next(s for s in snapshot["config"]["services"] if s["name"] == service)
    return {b["version"]: b["weight"] for b in config["routes"][0]["backends"]}


def wait_for(predicate: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def mesh(cp: TestClient) -> dict[str, str]:
    """reviews v1 + v2 behind agents, and a caller (web) agent without inbound."""
    return {
        "v1": register(cp, "reviews", "v1", "127.0.0.1:9001"),
        "v2": register(cp, "reviews", "v2", "127.0.0.1:9002"),
        "web": register(cp, "web", "v1", None),
    }


def test_agents_without_the_join_token_are_refused(cp: TestClient) -> None:
    body = registration("reviews", "v1", "127.0.0.1:9001")
    assert cp.post("/api/v1/agents", json=body, headers={"Authorization": ""}).status_code == 401
    wrong = cp.post("/api/v1/agents", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert cp.get("/api/v1/services/reviews").status_code == 404
    poll_answer = cp.post(
        "/api/v1/agents/x/discovery", json={}, headers={"Authorization": "Bearer nope"}
    )
    assert poll_answer.status_code == 401
    assert "mesh_agent_auth_failures_total 3.0" in cp.get("/metrics").text


def test_a_rotated_token_refuses_the_old_one(cp: TestClient) -> None:
    old = f"Bearer {cp.join_token}"  # type: ignore[attr-defined]
    new = cp.app.state.hub.token.rotate()  # type: ignore[attr-defined]
    body = registration("reviews", "v1", "127.0.0.1:9001")
    assert cp.post("/api/v1/agents", json=body, headers={"Authorization": old}).status_code == 401
    ok = cp.post("/api/v1/agents", json=body, headers={"Authorization": f"Bearer {new}"})
    assert ok.status_code == 200


def test_malformed_wire_data_is_400_with_the_field(cp: TestClient) -> None:
    bad = cp.post(
        "/api/v1/agents", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    missing = cp.post(
        "/api/v1/agents", json={"agent_id": "a", "service": "Bad Name", "version": "v1"}
    )
    assert missing.status_code == 400
    assert "service" in missing.json()["detail"]
    unroutable = cp.post("/api/v1/agents", json=registration("reviews", "v1", "0.0.0.0:80"))
    assert unroutable.status_code == 400
    assert cp.get("/api/v1/services/reviews").status_code == 404


def test_registration_creates_the_catalog_entries_audited_as_the_agent(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    service = cp.get("/api/v1/services/reviews").json()
    assert [v["name"] for v in service["versions"]] == ["v1", "v2"]
    assert {i["address"] for i in service["instances"]} == {"127.0.0.1:9001", "127.0.0.1:9002"}
    events = cp.get("/api/v1/audit", params={"actor": f"agent:{mesh['v1']}"}).json()["items"]
    assert {e["action"] for e in events} == {"service.create", "version.create", "instance.create"}
    # Registering again (a restart) changes nothing in the catalog.
    before = cp.get("/api/v1/audit").json()["total"]
    register(cp, "reviews", "v1", "127.0.0.1:9001")
    assert cp.get("/api/v1/audit").json()["total"] == before


def test_first_poll_gets_the_snapshot_and_an_ack_makes_the_agent_synced(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    first = poll(cp, mesh["web"])
    assert first.status_code == 200
    snap = first.json()
    services = {s["name"]: s for s in snap["config"]["services"]}
    assert set(services) == {"reviews"}  # web has no endpoint of its own yet: callers skip it
    assert set(services["reviews"]["versions"]) == {"v1", "v2"}
    assert agents(cp)[mesh["web"]]["sync_state"] == "STALE"
    # ACK: the next poll carries the version and the nonce; nothing new, so it is held → 204.
    held = poll(cp, mesh["web"], version=snap["version"], response_nonce=snap["nonce"])
    assert held.status_code == 204
    row = agents(cp)[mesh["web"]]
    assert (row["sync_state"], row["config_version"]) == ("SYNCED", snap["version"])


def test_an_agent_that_already_runs_the_current_version_gets_no_push(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    snap = answer(cp, mesh["web"])
    # A reconnect (no nonce) announcing the version it runs, e.g. after a control-plane restart.
    assert poll(cp, mesh["web"], version=snap["version"]).status_code == 204
    assert agents(cp)[mesh["web"]]["sync_state"] == "SYNCED"


def test_a_weight_change_reaches_a_held_poll_and_the_change_converges(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    snaps = {name: answer(cp, agent_id) for name, agent_id in mesh.items()}
    for name, agent_id in mesh.items():
        poll(cp, agent_id, version=snaps[name]["version"], response_nonce=snaps[name]["nonce"])
    shift = cp.post(
        "/api/v1/services/reviews/traffic/weights",
        json={"weights": {"v1": 75, "v2": 25}},
        headers={"X-Mesh-Reason": "canary"},
    )
    change = shift.json()["change"]
    wait_for(lambda: cp.get(f"/api/v1/changes/{change['id']}").json()["targeted"] == 3)
    assert cp.get(f"/api/v1/changes/{change['id']}").json()["state"] == "pending"
    for name, agent_id in mesh.items():
        new = poll(cp, agent_id, version=snaps[name]["version"])
        assert new.status_code == 200
        body = new.json()
        reviews = next(s for s in body["config"]["services"] if s["name"] == "reviews")
        assert reviews["routes"][0]["backends"] == [
            {"version": "v1", "weight": 75},
            {"version": "v2", "weight": 25},
        ]
        poll(cp, agent_id, version=body["version"], response_nonce=body["nonce"])
    done = cp.get(f"/api/v1/changes/{change['id']}").json()
    assert (done["state"], done["synced"], done["targeted"]) == ("converged", 3, 3)
    assert done["duration_ms"] is not None
    timeline = cp.get("/api/v1/services/reviews/changes").json()
    assert timeline[0]["summary"] == "v1 75 %, v2 25 %"
    assert timeline[0]["reason"] == "canary"
    metrics = cp.get("/metrics").text
    assert 'mesh_agents{state="SYNCED"} 3' in metrics
    assert "mesh_push_convergence_seconds_count 1.0" in metrics


def test_a_nack_keeps_the_agent_on_its_version_and_is_not_re_pushed(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    snap = answer(cp, mesh["web"])
    poll(cp, mesh["web"], version=snap["version"], response_nonce=snap["nonce"])
    change = cp.post(
        "/api/v1/services/reviews/traffic/weights", json={"weights": {"v1": 50, "v2": 50}}
    ).json()["change"]
    # The agent acks whatever comes before the change (a snapshot built while the mesh was
    # still registering) and refuses the version that carries the 50/50 weights.
    held = snap
    new = answer(cp, mesh["web"], version=held["version"])
    while _weights_of(new, "reviews") != {"v1": 50, "v2": 50}:
        held = new
        poll(cp, mesh["web"], version=held["version"], response_nonce=held["nonce"])
        new = answer(cp, mesh["web"], version=held["version"])
    nack = poll(
        cp,
        mesh["web"],
        version=held["version"],
        response_nonce=new["nonce"],
        error_detail="routes[0]: too spicy",
    )
    assert nack.status_code == 204  # the refused version is not sent again
    row = agents(cp)[mesh["web"]]
    assert row["sync_state"] == "NACKED"
    assert row["config_version"] == held["version"]
    assert row["last_error"] == "routes[0]: too spicy"
    progress = cp.get(f"/api/v1/changes/{change['id']}").json()
    assert progress["errors"] == [{"agent_id": mesh["web"], "error": "routes[0]: too spicy"}]
    assert "mesh_push_nacks_total 1.0" in cp.get("/metrics").text


def test_an_answer_to_a_stale_nonce_is_ignored(cp: TestClient, mesh: dict[str, str]) -> None:
    snap = answer(cp, mesh["web"])
    stale = poll(cp, mesh["web"], version="not-it", response_nonce="0000", error_detail="old news")
    assert stale.status_code == 204 or stale.json()["version"] == snap["version"]
    row = agents(cp)[mesh["web"]]
    assert row["sync_state"] != "NACKED"
    assert row["last_error"] is None


def test_an_unknown_agent_is_told_to_register(cp: TestClient) -> None:
    assert poll(cp, "ghost").status_code == 404


def test_deregistering_withdraws_the_endpoint_from_callers(
    cp: TestClient, mesh: dict[str, str]
) -> None:
    snap = answer(cp, mesh["web"])
    poll(cp, mesh["web"], version=snap["version"], response_nonce=snap["nonce"])
    assert cp.delete(f"/api/v1/agents/{mesh['v2']}").status_code == 204
    new = answer(cp, mesh["web"], version=snap["version"])
    reviews = next(s for s in new["config"]["services"] if s["name"] == "reviews")
    assert set(reviews["versions"]) == {"v1"}
    assert mesh["v2"] not in agents(cp)
    instances = cp.get("/api/v1/services/reviews/instances").json()
    assert [i["address"] for i in instances] == ["127.0.0.1:9001"]


def test_the_agents_list_filters_by_service_and_state(cp: TestClient, mesh: dict[str, str]) -> None:
    listed = cp.get("/api/v1/agents", params={"service": "reviews"}).json()
    assert {a["agent_id"] for a in listed["items"]} == {mesh["v1"], mesh["v2"]}
    assert listed["counts"]["NOT_SENT"] + listed["counts"]["STALE"] == 2
    assert cp.get("/api/v1/agents", params={"state": "SYNCED"}).json()["total"] == 0
    assert cp.get("/api/v1/agents", params={"state": "BOGUS"}).status_code == 422


def test_a_token_rotated_by_another_process_is_noticed(cp: TestClient) -> None:
    """`meshctl token rotate` writes the file from another process: the control plane notices
    the new token within its re-check interval, without a restart."""
    from app.agents.token import JoinToken

    old = f"Bearer {cp.join_token}"  # type: ignore[attr-defined]
    served = cp.app.state.hub.token  # type: ignore[attr-defined]
    body = registration("reviews", "v1", "127.0.0.1:9001")
    assert cp.post("/api/v1/agents", json=body, headers={"Authorization": old}).status_code == 200
    new = JoinToken(served.path).rotate()  # another JoinToken: what meshctl does
    deadline = time.monotonic() + 30
    while served.check(cp.join_token):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the rotated token file was never noticed"
        time.sleep(0.05)
    assert cp.post("/api/v1/agents", json=body, headers={"Authorization": old}).status_code == 401
    ok = cp.post("/api/v1/agents", json=body, headers={"Authorization": f"Bearer {new}"})
    assert ok.status_code == 200


def test_a_join_token_from_the_database_admits_one_namespace_until_revoked(
    cp: TestClient,
) -> None:
    made = cp.post("/api/v1/join-tokens", json={"name": "shop agents", "namespace": "shop"})
    assert made.status_code == 201
    shop_token = {"Authorization": f"Bearer {made.json()['token']}"}
    assert made.json()["token"].startswith("meshjoin_")

    in_shop = registration("cart", "v1", "127.0.0.1:9201", namespace="shop")
    assert cp.post("/api/v1/agents", json=in_shop, headers=shop_token).status_code == 200
    elsewhere = registration("reviews", "v1", "127.0.0.1:9202")  # namespace "default"
    refused = cp.post("/api/v1/agents", json=elsewhere, headers=shop_token)
    assert refused.status_code == 403
    assert "namespace 'shop' only" in refused.json()["detail"]
    assert cp.get("/api/v1/services/reviews").status_code == 404  # nothing was registered

    # An agent of another namespace (registered with the mesh-wide token) stays out of reach.
    other = cp.post("/api/v1/agents", json=elsewhere).json()["agent_id"]
    poll = {"service": "reviews", "service_version": "v1", "agent_id": other}
    assert (
        cp.post(f"/api/v1/agents/{other}/discovery", json=poll, headers=shop_token).status_code
        == 403
    )
    assert cp.delete(f"/api/v1/agents/{other}", headers=shop_token).status_code == 403

    assert cp.delete(f"/api/v1/tokens/{made.json()['details']['id']}").status_code == 204
    deadline = time.monotonic() + 30  # the control plane re-checks a cached token every 5 s
    while cp.post("/api/v1/agents", json=in_shop, headers=shop_token).status_code != 401:
        assert time.monotonic() < deadline, "a revoked join token kept working"
        time.sleep(0.2)


def test_an_expired_join_token_is_refused(cp: TestClient, database: Database) -> None:
    made = cp.post("/api/v1/join-tokens", json={"name": "old", "namespace": "shop"}).json()
    with database.session(write=True) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == made["details"]["id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    body = registration("cart", "v1", "127.0.0.1:9203", namespace="shop")
    answer = cp.post(
        "/api/v1/agents", json=body, headers={"Authorization": f"Bearer {made['token']}"}
    )
    assert answer.status_code == 401


def test_join_tokens_never_start_with_a_dash() -> None:
    """Agents take the token as `--token <value>`; argparse reads a leading dash as an option
    (a browser test's agents once failed to start on such a token)."""
    from app.agents.token import _new_token

    assert not [t for t in (_new_token() for _ in range(2000)) if t.startswith("-")]
