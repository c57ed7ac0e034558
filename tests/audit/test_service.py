"""The audit hash chain: every change links to the one before; tampering is detected."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.models import AuditEvent
from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate, ServiceUpdate
from tests.conftest import person

ACTOR = person("bob@example.com")


def seed_three_events(session: Session) -> None:
    catalog.create_service(session, ACTOR, data=ServiceCreate(name="ratings", owner_team="a"))
    catalog.update_service(
        session,
        ACTOR,
        namespace="default",
        name="ratings",
        data=ServiceUpdate(revision=1, owner_team="b"),
    )
    catalog.delete_service(session, ACTOR, namespace="default", name="ratings")
    session.commit()


def test_chain_links_each_event_to_its_predecessor(session: Session) -> None:
    seed_three_events(session)
    events = session.query(AuditEvent).order_by(AuditEvent.seq).all()
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0].prev_hash == audit.GENESIS_HASH
    assert events[1].prev_hash == events[0].hash
    assert events[2].prev_hash == events[1].hash
    result = audit.verify_chain(session)
    assert result.ok
    assert result.checked == 3


def test_empty_chain_verifies(session: Session) -> None:
    assert audit.verify_chain(session).ok


def _disable_append_only_guard(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
    else:
        session.execute(text("DROP TRIGGER audit_events_no_update"))
        session.execute(text("DROP TRIGGER audit_events_no_delete"))


def test_database_refuses_updates_and_deletes_of_events(session: Session) -> None:
    seed_three_events(session)
    with pytest.raises(DBAPIError, match="append-only"):
        session.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    session.rollback()
    with pytest.raises(DBAPIError, match="append-only"):
        session.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    session.rollback()


def test_edited_event_is_detected(session: Session) -> None:
    seed_three_events(session)
    _disable_append_only_guard(session)
    session.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    session.commit()
    result = audit.verify_chain(session)
    assert not result.ok
    assert result.first_broken_seq == 2
    assert "altered" in result.detail


def test_deleted_event_is_detected(session: Session) -> None:
    seed_three_events(session)
    _disable_append_only_guard(session)
    session.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    session.commit()
    result = audit.verify_chain(session)
    assert not result.ok
    assert result.first_broken_seq == 3
    assert "missing" in result.detail


def test_deleted_last_event_cannot_be_hidden_by_rehashing_one(session: Session) -> None:
    """Rewriting an event's hash breaks the link from the next event."""
    seed_three_events(session)
    _disable_append_only_guard(session)
    session.execute(text("UPDATE audit_events SET hash = :h WHERE seq = 1"), {"h": "f" * 64})
    session.commit()
    result = audit.verify_chain(session)
    assert not result.ok
    assert result.first_broken_seq == 1


def test_filters(session: Session) -> None:
    seed_three_events(session)
    catalog.create_service(
        session, person("carol"), data=ServiceCreate(name="other", owner_team="a")
    )
    session.commit()
    assert audit.list_events(session, actor="carol").total == 1
    assert audit.list_events(session, resource_name="default/ratings").total == 3
    assert audit.list_events(session, action="service.update").total == 1
    newest = audit.list_events(session).items[0]
    assert newest.resource_name == "default/other"


def test_resource_filter_can_include_children(session: Session) -> None:
    from app.catalog.schemas import VersionCreate

    catalog.create_service(session, ACTOR, data=ServiceCreate(name="reviews", owner_team="a"))
    catalog.create_service(session, ACTOR, data=ServiceCreate(name="reviews2", owner_team="a"))
    catalog.create_version(
        session, ACTOR, namespace="default", name="reviews", data=VersionCreate(name="v1")
    )
    session.commit()
    exact = audit.list_events(session, resource_name="default/reviews")
    assert [e.action for e in exact.items] == ["service.create"]
    with_children = audit.list_events(
        session, resource_name="default/reviews", include_children=True
    )
    # "default/reviews2" is a sibling, not a child.
    assert [e.resource_name for e in with_children.items] == [
        "default/reviews/v1",
        "default/reviews",
    ]
    assert audit.list_resource_kinds(session) == ["service", "version"]
