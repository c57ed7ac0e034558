"""Recording, listing and verifying audit events.

``record`` is called by every other service inside its own transaction, so a change and its
audit event commit or roll back together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.db import utcnow
from app.pagination import Page, paginate

GENESIS_HASH = "0" * 64

# The columns an event's hash covers, in the keyword names of ``event_hash``.
HASHED_FIELDS = (
    "seq",
    "occurred_at",
    "actor",
    "action",
    "resource_kind",
    "resource_name",
    "before",
    "after",
    "reason",
    "prev_hash",
)

# Any constant works; it only has to be the same for every writer of the chain.
_AUDIT_CHAIN_LOCK_KEY = 0x6D657368_61756474  # "meshaudt"


def event_hash(
    *,
    seq: int,
    occurred_at: datetime,
    actor: str,
    action: str,
    resource_kind: str,
    resource_name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
    prev_hash: str,
) -> str:
    """SHA-256 over a canonical JSON form of every field that matters."""
    canonical = json.dumps(
        {
            "seq": seq,
            "occurred_at": occurred_at.isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "resource_kind": resource_kind,
            "resource_name": resource_name,
            "before": before,
            "after": after,
            "reason": reason,
            "prev_hash": prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _lock_chain(session: Session) -> None:
    # Two PostgreSQL transactions appending at once would both read the same head; the
    # advisory lock makes them queue. SQLite write transactions already hold the database
    # lock (BEGIN IMMEDIATE, see app.db).
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _AUDIT_CHAIN_LOCK_KEY})


def record(
    session: Session,
    actor: str,
    *,
    action: str,
    resource_kind: str,
    resource_name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str | None = None,
) -> AuditEvent:
    _lock_chain(session)
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head.seq + 1, head.hash) if head else (1, GENESIS_HASH)
    occurred_at = utcnow()
    fields: dict[str, Any] = {
        "seq": seq,
        "occurred_at": occurred_at,
        "actor": actor,
        "action": action,
        "resource_kind": resource_kind,
        "resource_name": resource_name,
        "before": before,
        "after": after,
        "reason": reason or "",
        "prev_hash": prev_hash,
    }
    event = AuditEvent(**fields, hash=event_hash(**fields))
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    *,
    resource_kind: str | None = None,
    resource_name: str | None = None,
    include_children: bool = False,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    page: int = 1,
    page_size: int = 50,
) -> Page[AuditEvent]:
    """Newest first. With ``include_children`` a resource name also matches the resources
    inside it (``default/reviews`` matches ``default/reviews/v2``)."""
    query = select(AuditEvent)
    if resource_kind:
        query = query.where(AuditEvent.resource_kind == resource_kind)
    if resource_name:
        query = query.where(_resource_or_children(resource_name, include_children))
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if since:
        query = query.where(AuditEvent.occurred_at >= since)
    if until:
        query = query.where(AuditEvent.occurred_at < until)
    return paginate(
        session, query, order_by=[AuditEvent.seq.desc()], page=page, page_size=page_size
    )


def _resource_or_children(name: str, include_children: bool) -> ColumnElement[bool]:
    exact = AuditEvent.resource_name == name
    if not include_children:
        return exact
    return exact | AuditEvent.resource_name.startswith(name.rstrip("/") + "/", autoescape=True)


def recent_for_resource(
    session: Session, kind: str, name: str, *, limit: int = 10
) -> list[AuditEvent]:
    """Newest first; for a service this includes its versions' and instances' events."""
    query = (
        select(AuditEvent)
        .where(_resource_or_children(name, include_children=True))
        .order_by(AuditEvent.seq.desc())
        .limit(limit)
    )
    if kind != "service":
        query = query.where(AuditEvent.resource_kind == kind)
    return list(session.scalars(query))


def list_actors(session: Session) -> list[str]:
    return list(session.scalars(select(AuditEvent.actor).distinct().order_by(AuditEvent.actor)))


def list_resource_kinds(session: Session) -> list[str]:
    return list(
        session.scalars(
            select(AuditEvent.resource_kind).distinct().order_by(AuditEvent.resource_kind)
        )
    )


@dataclass(frozen=True)
class ChainVerification:
    ok: bool
    checked: int
    first_broken_seq: int | None
    detail: str


def verify_chain(session: Session, *, batch_size: int = 2000) -> ChainVerification:
    """Walk the chain in order and report the first event that does not fit.

    Detects edited events (hash mismatch), deleted events (a gap in seq or a prev_hash that
    no longer points at its predecessor) and inserted or reordered ones.
    """
    expected_prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    columns = [getattr(AuditEvent, name) for name in (*HASHED_FIELDS, "hash")]
    while True:
        # Plain rows rather than ORM objects: building objects was half the cost of a check.
        rows = session.execute(
            select(*columns)
            .where(AuditEvent.seq >= expected_seq)
            .order_by(AuditEvent.seq)
            .limit(batch_size)
        ).all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return ChainVerification(
                    False,
                    checked,
                    row.seq,
                    f"event {expected_seq} is missing (next stored event is {row.seq})",
                )
            if row.prev_hash != expected_prev:
                return ChainVerification(
                    False,
                    checked,
                    row.seq,
                    f"event {row.seq} does not point at event {row.seq - 1}: "
                    "an earlier event was changed or removed",
                )
            mapping = row._mapping
            recomputed = event_hash(**{name: mapping[name] for name in HASHED_FIELDS})
            if recomputed != row.hash:
                return ChainVerification(
                    False, checked, row.seq, f"event {row.seq} was altered after it was written"
                )
            expected_prev = row.hash
            expected_seq += 1
            checked += 1
    return ChainVerification(True, checked, None, f"all {checked} events verified")


def count_events(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditEvent)) or 0
