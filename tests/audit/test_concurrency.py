"""Many writers at once still produce one unbroken chain (no fork, no gap, no lost event)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from app.audit.models import AuditEvent
from app.audit.service import verify_chain
from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.db import Database, session_scope
from tests.conftest import person

WRITERS = 8
SERVICES_PER_WRITER = 5


def test_parallel_writers_form_a_single_chain(database: Database) -> None:
    def write(worker: int) -> None:
        for index in range(SERVICES_PER_WRITER):
            for session in session_scope(database, write=True):
                catalog.create_service(
                    session,
                    person(f"writer-{worker}"),
                    data=ServiceCreate(name=f"svc-{worker}-{index}", owner_team="load"),
                )

    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        list(pool.map(write, range(WRITERS)))

    with database.session(write=False) as session:
        seqs = session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
        assert seqs == list(range(1, WRITERS * SERVICES_PER_WRITER + 1))
        result = verify_chain(session)
        assert result.ok, result.detail
        assert catalog.list_services(session, page_size=200).total == WRITERS * 5
