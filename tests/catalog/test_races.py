"""Writers that interleave: the second of two writers that read the same revision is refused,
at the write itself, not only at the early revision check.

Each test lets the second writer read, then commits the first writer's change at the last
moment (just before the second writer's UPDATE or DELETE reaches the database), so the early
check in the service has already passed and only the guard in the statement can stop it.

On PostgreSQL the second writer is an ordinary write session (READ COMMITTED: it sees the
first writer's commit when it writes). SQLite serialises write transactions (BEGIN IMMEDIATE),
so there the interleaving can only happen to a writer whose read and write are not one
transaction; the second writer runs in autocommit mode to reach the guard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import ORMExecuteState, Session

from app.audit.models import AuditEvent
from app.catalog import service as catalog
from app.catalog.models import Service
from app.catalog.schemas import ServiceCreate, ServiceUpdate
from app.db import Database, make_engine, session_scope
from app.errors import StaleRevisionError
from tests.conftest import person


@pytest.fixture
def second_writer(database: Database, db_url: str) -> Iterator[Session]:
    if database.dialect == "postgresql":
        with database.session(write=True) as session:
            yield session
        return
    engine = make_engine(db_url).execution_options(isolation_level="AUTOCOMMIT")
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture
def service(database: Database) -> None:
    for session in session_scope(database, write=True):
        catalog.create_service(
            session, person("creator"), data=ServiceCreate(name="reviews", owner_team="bookinfo")
        )


def first_writer_edits(database: Database) -> None:
    for session in session_scope(database, write=True):
        catalog.update_service(
            session,
            person("alice"),
            namespace="default",
            name="reviews",
            data=ServiceUpdate(revision=1, owner_team="alice-team"),
        )


def stored(database: Database) -> tuple[str, int, int]:
    with database.session(write=False) as session:
        found = session.scalars(select(Service).where(Service.name == "reviews")).one()
        events = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
        return found.owner_team, found.revision, events


@pytest.mark.usefixtures("service")
def test_an_update_from_a_stale_read_is_refused_at_flush(
    database: Database, second_writer: Session
) -> None:
    done: list[bool] = []

    def commit_the_first_writer_first(session: Session, *_: Any) -> None:
        if not done:
            done.append(True)
            first_writer_edits(database)

    event.listen(second_writer, "before_flush", commit_the_first_writer_first)
    with pytest.raises(StaleRevisionError) as refused:
        catalog.update_service(
            second_writer,
            person("bob"),
            namespace="default",
            name="reviews",
            data=ServiceUpdate(revision=1, owner_team="bob-team"),
        )
    second_writer.rollback()
    assert refused.value.status_code == 409
    # Alice's edit survives; Bob's neither overwrote it nor left an audit event.
    assert stored(database) == ("alice-team", 2, 2)


@pytest.mark.usefixtures("service")
def test_a_delete_racing_an_edit_is_refused(database: Database, second_writer: Session) -> None:
    done: list[bool] = []

    def commit_the_edit_first(state: ORMExecuteState) -> None:
        if state.is_delete and not done:
            done.append(True)
            first_writer_edits(database)

    event.listen(second_writer, "do_orm_execute", commit_the_edit_first)
    with pytest.raises(StaleRevisionError) as refused:
        catalog.delete_service(
            second_writer, person("bob"), namespace="default", name="reviews", revision=1
        )
    second_writer.rollback()
    assert refused.value.status_code == 409
    assert (refused.value.expected, refused.value.actual) == (1, 2)
    assert stored(database) == ("alice-team", 2, 2)
