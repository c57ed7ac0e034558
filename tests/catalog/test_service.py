"""Catalog service layer: validation, audit in the same transaction, optimistic concurrency."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.audit.service import verify_chain
from app.catalog import service
from app.catalog.models import Service
from app.catalog.schemas import InstanceCreate, ServiceCreate, ServiceUpdate, VersionCreate
from app.db import Database
from app.errors import ConflictError, NotFoundError, StaleRevisionError
from tests.conftest import person

ACTOR = person("alice@example.com")


def make_service(session: Session, name: str = "reviews", **fields: object) -> Service:
    data = ServiceCreate(name=name, owner_team=str(fields.pop("owner_team", "bookinfo")), **fields)  # type: ignore[arg-type]
    created = service.create_service(session, ACTOR, data=data, reason="test")
    session.commit()
    return created


def audit_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


def test_create_records_audit_event_with_after_state(session: Session) -> None:
    make_service(session, description="Book reviews", labels={"tier": "backend"})

    events = session.scalars(select(AuditEvent)).all()
    assert len(events) == 1
    event = events[0]
    assert event.actor == ACTOR.actor
    assert event.action == "service.create"
    assert event.resource_name == "default/reviews"
    assert event.before is None
    assert event.after is not None
    assert event.after["description"] == "Book reviews"
    assert event.after["labels"] == {"tier": "backend"}
    assert event.reason == "test"
    assert event.occurred_at.tzinfo is not None


def test_duplicate_name_in_same_namespace_conflicts_but_other_namespace_is_fine(
    session: Session,
) -> None:
    make_service(session)
    with pytest.raises(ConflictError) as info:
        service.create_service(session, ACTOR, data=ServiceCreate(name="reviews", owner_team="x"))
    assert info.value.field == "name"
    session.rollback()
    make_service(session, namespace="staging")
    assert service.get_service(session, "staging", "reviews").namespace == "staging"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Reviews"),
        ("name", "-reviews"),
        ("name", "a" * 64),
        ("name", "re_views"),
        ("namespace", "Prod"),
        ("owner_team", ""),
        ("labels", {"bad key!": "x"}),
        ("labels", {"tier": "not valid value"}),
        ("links", [{"title": "docs", "url": "javascript:alert(1)"}]),
    ],
)
def test_invalid_fields_are_rejected_with_the_field_named(field: str, value: object) -> None:
    payload: dict[str, object] = {"name": "reviews", "owner_team": "bookinfo", field: value}
    with pytest.raises(ValidationError) as info:
        ServiceCreate.model_validate(payload)
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        ServiceCreate.model_validate({"name": "a", "owner_team": "t", "ownr": "typo"})
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_update_with_current_revision_changes_fields_and_bumps_revision(session: Session) -> None:
    created = make_service(session, description="old")
    assert created.revision == 1
    updated = service.update_service(
        session,
        ACTOR,
        namespace="default",
        name="reviews",
        data=ServiceUpdate(revision=1, description="new"),
        reason="clarify",
    )
    session.commit()
    assert updated.revision == 2
    assert service.get_service(session, "default", "reviews").description == "new"
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert last is not None
    assert last.action == "service.update"
    assert last.before == {"description": "old"}
    assert last.after == {"description": "new"}


def test_stale_revision_is_refused_and_changes_nothing(session: Session) -> None:
    make_service(session, description="first")
    service.update_service(
        session,
        ACTOR,
        namespace="default",
        name="reviews",
        data=ServiceUpdate(revision=1, description="second"),
    )
    session.commit()
    events_before = audit_count(session)

    with pytest.raises(StaleRevisionError) as info:
        service.update_service(
            session,
            ACTOR,
            namespace="default",
            name="reviews",
            data=ServiceUpdate(revision=1, description="lost update"),
        )
    session.rollback()
    assert info.value.status_code == 409
    assert service.get_service(session, "default", "reviews").description == "second"
    assert audit_count(session) == events_before


def test_concurrent_writers_with_same_revision_one_wins(database: Database) -> None:
    """Two sessions read revision 1, both pass the check; the row version check at flush
    makes the second one fail rather than silently overwrite."""
    with database.session(write=True) as setup:
        make_service(setup)
    first = database.session(write=False)
    second = database.session(write=False)
    try:
        s1 = service.get_service(first, "default", "reviews")
        s2 = service.get_service(second, "default", "reviews")
        assert s1.revision == s2.revision == 1
        first.rollback()
        second.rollback()
        service.update_service(
            first,
            ACTOR,
            namespace="default",
            name="reviews",
            data=ServiceUpdate(revision=1, description="one"),
        )
        first.commit()
        with pytest.raises(StaleRevisionError):
            service.update_service(
                second,
                ACTOR,
                namespace="default",
                name="reviews",
                data=ServiceUpdate(revision=1, description="two"),
            )
        second.rollback()
    finally:
        first.close()
        second.close()
    with database.session(write=False) as check:
        assert service.get_service(check, "default", "reviews").description == "one"


def test_no_op_update_writes_no_audit_event(session: Session) -> None:
    make_service(session, description="same")
    before = audit_count(session)
    service.update_service(
        session,
        ACTOR,
        namespace="default",
        name="reviews",
        data=ServiceUpdate(revision=1, description="same"),
    )
    session.commit()
    assert audit_count(session) == before
    assert service.get_service(session, "default", "reviews").revision == 1


def test_failed_write_leaves_no_audit_event(session: Session) -> None:
    make_service(session)
    before = audit_count(session)
    with pytest.raises(NotFoundError):
        service.create_instance(
            session,
            ACTOR,
            namespace="default",
            name="reviews",
            data=InstanceCreate(address="10.0.0.1:9080", version="v9"),
        )
    session.rollback()
    assert audit_count(session) == before


def test_versions_and_instances(session: Session) -> None:
    make_service(session)
    service.create_version(
        session,
        ACTOR,
        namespace="default",
        name="reviews",
        data=VersionCreate(name="v1", labels={"track": "stable"}),
    )
    service.create_instance(
        session,
        ACTOR,
        namespace="default",
        name="reviews",
        data=InstanceCreate(address="127.0.0.1:9080", version="v1", health="healthy"),
    )
    session.commit()
    found = service.get_service(session, "default", "reviews")
    assert [v.name for v in found.versions] == ["v1"]
    assert [(i.address, i.health) for i in found.instances] == [("127.0.0.1:9080", "healthy")]

    with pytest.raises(ConflictError):
        service.create_version(
            session, ACTOR, namespace="default", name="reviews", data=VersionCreate(name="v1")
        )
    session.rollback()
    with pytest.raises(ConflictError, match="still has instances"):
        service.delete_version(
            session, ACTOR, namespace="default", name="reviews", version_name="v1"
        )
    session.rollback()


def test_delete_service_removes_children_and_keeps_its_history(session: Session) -> None:
    make_service(session)
    service.create_version(
        session, ACTOR, namespace="default", name="reviews", data=VersionCreate(name="v1")
    )
    session.commit()
    service.delete_service(session, ACTOR, namespace="default", name="reviews", reason="retired")
    session.commit()
    with pytest.raises(NotFoundError):
        service.get_service(session, "default", "reviews")
    actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
    assert actions == ["service.create", "version.create", "service.delete"]
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert last is not None
    assert last.before is not None
    assert last.before["versions"] == [{"name": "v1", "labels": {}}]
    assert verify_chain(session).ok


def test_search_filters_and_stable_pagination(session: Session) -> None:
    for index in range(30):
        make_service(
            session,
            name=f"svc-{index:02d}",
            owner_team="payments" if index % 3 == 0 else "search",
            description="handles 100% of carts" if index == 7 else "",
        )
    page1 = service.list_services(session, page=1, page_size=10)
    page2 = service.list_services(session, page=2, page_size=10)
    assert page1.total == 30
    assert page1.pages == 3
    assert [s.name for s in page1.items] == [f"svc-{i:02d}" for i in range(10)]
    assert [s.name for s in page2.items] == [f"svc-{i:02d}" for i in range(10, 20)]
    assert service.list_services(session, team="payments").total == 10
    assert [s.name for s in service.list_services(session, q="SVC-0").items][:3] == [
        "svc-00",
        "svc-01",
        "svc-02",
    ]
    # LIKE wildcards typed by a user are matched literally.
    assert [s.name for s in service.list_services(session, q="100%").items] == ["svc-07"]
    assert service.list_services(session, q="_").total == 0
    assert service.list_services(session, page=99).items == []
