"""JSON API for the audit log under /api/v1/audit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from app.audit import service
from app.audit.export import export_lines
from app.audit.schemas import AuditEventList, AuditEventRead, ChainVerificationRead
from app.audit.trust import AuditTrustDep
from app.db import Database, utcnow
from app.deps import SessionDep, get_database
from app.pagination import PageNumber

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

DatabaseDep = Annotated[Database, Depends(get_database)]


@router.get("", response_model=AuditEventList, summary="List audit events, newest first")
def list_events(
    session: SessionDep,
    resource_kind: Annotated[str | None, Query(max_length=63)] = None,
    resource_name: Annotated[str | None, Query(max_length=255)] = None,
    include_children: Annotated[
        bool, Query(description="Also match resources inside resource_name (its versions…)")
    ] = False,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    action: Annotated[str | None, Query(max_length=63)] = None,
    since: Annotated[datetime | None, Query(description="Inclusive, ISO 8601")] = None,
    until: Annotated[datetime | None, Query(description="Exclusive, ISO 8601")] = None,
    page: PageNumber = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AuditEventList:
    result = service.list_events(
        session,
        resource_kind=resource_kind,
        resource_name=resource_name,
        include_children=include_children,
        actor=actor,
        action=action,
        since=_aware(since),
        until=_aware(until),
        page=page,
        page_size=page_size,
    )
    return AuditEventList(
        items=[AuditEventRead.model_validate(event) for event in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
        pages=result.pages,
    )


@router.get(
    "/verify",
    response_model=ChainVerificationRead,
    summary="Verify the audit hash chain against the signed checkpoints",
    description="Reads every event. Detects edited, deleted and inserted events, and, against "
    "the signed checkpoints kept outside the database, events rewritten and re-hashed or cut "
    "off the end.",
)
def verify(session: SessionDep, trust: AuditTrustDep) -> ChainVerificationRead:
    result = trust.verify(session)
    return ChainVerificationRead(
        ok=result.ok,
        checked=result.checked,
        first_broken_seq=result.first_broken_seq,
        detail=result.detail,
        signed_up_to=result.anchored_seq,
    )


@router.get(
    "/export",
    summary="Export the audit log as JSON lines, with its signed checkpoints",
    description="Format `mesh-audit-export/1`: a header line, the checkpoints, then every "
    "event in order. Verify it offline with `meshctl audit verify --file EXPORT --public-key "
    "audit-signing.pub`.",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def export(database: DatabaseDep, trust: AuditTrustDep) -> StreamingResponse:
    filename = f"mesh-audit-{utcnow():%Y%m%dT%H%M%SZ}.jsonl"
    return StreamingResponse(
        export_lines(database, trust),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _aware(value: datetime | None) -> datetime | None:

    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
