"""The audit page's chain badge verifies incrementally: a second view reads only the events
added since the first, yet tampering inside the already-verified prefix is still caught."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlalchemy.orm import ORMExecuteState

from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.db import Database
from tests.conftest import person
from tests.security.tamper import forge_and_rehash, guards_off


class EventReads:
    """Counts the queries a session runs on the audit tables and the audit events whose content
    it reads (looking up who is signed in is not the badge's cost)."""

    def __init__(self) -> None:
        self.queries = 0
        self.event_rows = 0

    def __call__(self, state: ORMExecuteState) -> Any:
        if "audit_" in str(state.statement):
            self.queries += 1
        frozen = state.invoke_statement().freeze()
        if "audit_events.reason" in str(state.statement):  # the walk reads whole events
            self.event_rows += len(frozen().all())
        return frozen()


@pytest.fixture
def reads(database: Database) -> Iterator[EventReads]:
    counter = EventReads()
    event.listen(database.read_sessions, "do_orm_execute", counter)
    yield counter
    event.remove(database.read_sessions, "do_orm_execute", counter)


def write_events(database: Database, count: int, start: int = 0) -> None:
    with database.session(write=True) as session:
        for index in range(start, start + count):
            catalog.create_service(
                session, person("alice"), data=ServiceCreate(name=f"svc-{index}", owner_team="t")
            )
        session.commit()


def badge(client: TestClient) -> str:
    response = client.get("/audit/verify", headers={"HX-Request": "true"})
    assert response.status_code == 200
    return response.text


def test_a_second_view_reads_only_the_new_events(
    client: TestClient, database: Database, reads: EventReads
) -> None:
    write_events(database, 3)
    assert "Chain intact · 3 events" in badge(client)
    assert reads.event_rows == 3

    write_events(database, 2, start=3)
    reads.event_rows = reads.queries = 0
    assert "Chain intact · 5 events" in badge(client)
    assert reads.event_rows == 2
    assert reads.queries <= 5  # prefix anchor, prefix count, one walk batch, the tail probe

    reads.event_rows = 0
    assert "Chain intact · 5 events" in badge(client)
    assert reads.event_rows == 0


def test_a_rewrite_before_the_verified_prefix_is_still_detected(
    client: TestClient, database: Database
) -> None:
    """Even without a signed checkpoint: the hash this process saw at the end of the prefix is
    itself an anchor, and events never legitimately change."""
    write_events(database, 4)
    assert "Chain intact · 4 events" in badge(client)
    forge_and_rehash(database, 1)
    for _ in range(2):  # and it stays reported
        html = badge(client)
        assert "Chain broken at #4" in html
        assert "changed since this console verified it" in html


def test_a_rewrite_is_located_by_a_signed_checkpoint(
    client: TestClient, database: Database
) -> None:
    write_events(database, 2)
    client.app.state.audit_trust.checkpointer.checkpoint()  # type: ignore[attr-defined]
    write_events(database, 2, start=2)
    assert "signed to #2" in badge(client)
    forge_and_rehash(database, 2)
    assert "Chain broken at #2" in badge(client)


def test_a_deletion_inside_the_verified_prefix_is_still_detected(
    client: TestClient, database: Database
) -> None:
    write_events(database, 4)
    assert "Chain intact" in badge(client)
    with guards_off(database) as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    assert "Chain broken at #3" in badge(client)


def test_an_in_place_edit_inside_the_prefix_is_found_by_the_periodic_full_walk(
    client: TestClient, database: Database
) -> None:
    write_events(database, 3)
    assert "Chain intact" in badge(client)
    with guards_off(database) as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    client.app.state.audit_trust.prefix.full_check_after = 0  # type: ignore[attr-defined]
    assert "Chain broken at #2" in badge(client)
