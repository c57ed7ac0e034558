"""Recording, listing and verifying audit events.

``record`` is called by every other service inside its own transaction, so a change and its
audit event commit or roll back together.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.db import utcnow
from app.identity.principal import Principal
from app.pagination import Page, paginate

GENESIS_HASH = "0" * 64
EVENTS_RECORDED = "mesh_audit_events_recorded"

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
    "actor_id",
    "client_address",
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
    actor_id: str = "",
    client_address: str = "",
) -> str:
    """SHA-256 over a canonical JSON form of every field that matters.

    ``actor_id`` and ``client_address`` came with sign-in; they are hashed when set, so events
    written before them keep the hashes they were written with."""
    fields: dict[str, Any] = {
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
    }
    if actor_id:
        fields["actor_id"] = actor_id
    if client_address:
        fields["client_address"] = client_address
    canonical = json.dumps(
        fields,
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
    actor: Principal,
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
        "actor": actor.actor,
        "actor_id": actor.actor_id,
        "client_address": actor.client_address,
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
    # Counted for the checkpointer, which signs the head once enough events have committed.
    session.info[EVENTS_RECORDED] = session.info.get(EVENTS_RECORDED, 0) + 1
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
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    anchored_seq: int | None = None
    """The newest signed checkpoint the chain was found to agree with, if any."""


@dataclass(frozen=True)
class Anchor:
    """A head the chain must contain: (seq, hash) from a signed checkpoint."""

    seq: int
    hash: str
    label: str
    """How to name it in a report, e.g. "the checkpoint signed 2026-05-01 12:00:00 UTC"."""


class _ChainWalk:
    """Checks events fed in seq order; the same rules for the database and an export file."""

    def __init__(
        self,
        anchors: Sequence[Anchor] = (),
        *,
        start_seq: int = 1,
        start_hash: str = GENESIS_HASH,
    ) -> None:
        self.expected_seq = start_seq
        self.expected_prev = start_hash
        self.checked = start_seq - 1
        # Several checkpoints may sign the same seq (replicas, meshctl); each must agree.
        self.anchors: dict[int, list[Anchor]] = {}
        for anchor in anchors:
            self.anchors.setdefault(anchor.seq, []).append(anchor)
        self.anchored_seq: int | None = None
        self.failure: ChainVerification | None = None

    def _fail(self, seq: int, detail: str) -> bool:
        self.failure = ChainVerification(False, self.checked, seq, detail)
        return False

    def feed(self, row: Mapping[Any, Any]) -> bool:
        """False (and ``failure`` set) at the first event that does not fit."""
        seq = row["seq"]
        if seq != self.expected_seq:
            return self._fail(
                seq, f"event {self.expected_seq} is missing (next stored event is {seq})"
            )
        if row["prev_hash"] != self.expected_prev:
            return self._fail(
                seq,
                f"event {seq} does not point at event {seq - 1}: "
                "an earlier event was changed or removed",
            )
        recomputed = event_hash(**{name: row[name] for name in HASHED_FIELDS})
        if recomputed != row["hash"]:
            return self._fail(seq, f"event {seq} was altered after it was written")
        for anchor in self.anchors.get(seq, ()):
            if anchor.hash != row["hash"]:
                since = f"after event {self.anchored_seq}" if self.anchored_seq else "up to it"
                return self._fail(
                    seq,
                    f"event {seq} is not the event {anchor.label} vouches for: events {since} "
                    "were rewritten and re-hashed after they were signed",
                )
            self.anchored_seq = seq
        self.expected_prev = row["hash"]
        self.expected_seq += 1
        self.checked += 1
        return True

    def finish(self) -> ChainVerification:
        if self.failure is not None:
            return self.failure
        head = self.expected_seq - 1
        beyond = [seq for seq in self.anchors if seq > head]
        if beyond:
            newest = self.anchors[max(beyond)][0]
            return ChainVerification(
                False,
                self.checked,
                head + 1,
                f"the log ends at event {head}, but {newest.label} vouches for events up to "
                f"{newest.seq}: events were cut off the end",
            )
        signed = f"; signed up to event {self.anchored_seq}" if self.anchored_seq else ""
        return ChainVerification(
            True,
            self.checked,
            None,
            f"all {self.checked} events verified{signed}",
            head_seq=head,
            head_hash=self.expected_prev,
            anchored_seq=self.anchored_seq,
        )


_WALK_COLUMNS = [getattr(AuditEvent, name) for name in (*HASHED_FIELDS, "hash")]


def _walk(session: Session, walk: _ChainWalk, *, batch_size: int) -> ChainVerification:
    while True:
        # Plain rows rather than ORM objects: building objects was half the cost of a check.
        rows = session.execute(
            select(*_WALK_COLUMNS)
            .where(AuditEvent.seq >= walk.expected_seq)
            .order_by(AuditEvent.seq)
            .limit(batch_size)
        ).all()
        if not rows:
            break
        for row in rows:
            if not walk.feed(row._mapping):
                return walk.finish()
    return walk.finish()


def verify_chain(
    session: Session, *, anchors: Sequence[Anchor] = (), batch_size: int = 2000
) -> ChainVerification:
    """Walk the chain in order and report the first event that does not fit.

    Detects edited events (hash mismatch), deleted events (a gap in seq or a prev_hash that
    no longer points at its predecessor) and inserted or reordered ones. With ``anchors``
    (signed checkpoints kept outside the database) it also detects what a database writer
    can do without breaking the links: rewriting events and re-hashing everything after them,
    and cutting events off the end.
    """
    return _walk(session, _ChainWalk(anchors), batch_size=batch_size)


def verify_rows(
    rows: Iterable[Mapping[str, Any]], *, anchors: Sequence[Anchor] = ()
) -> ChainVerification:
    """The same check over events read from elsewhere (an export), in seq order."""
    walk = _ChainWalk(anchors)
    for row in rows:
        if not walk.feed(row):
            break
    return walk.finish()


class VerifiedPrefix:
    """Remembers how far the chain was verified, so the console's badge reads only new events.

    Before trusting the remembered prefix it re-checks, cheaply, that it is still there: the
    event at the remembered seq must still carry the remembered hash, and the prefix must still
    hold exactly that many events. Events are never legitimately changed, so a different hash
    at the remembered seq is itself proof that the log was rewritten: it is reported even when
    the rewritten chain links up again (re-hashed), and keeps being reported by this process.
    A deletion inside the prefix makes the next view walk everything, which names the gap.

    An in-place edit that keeps every stored hash is not visible to those checks; the prefix
    is therefore walked in full again once it is ``full_check_after`` seconds old, and
    ``meshctl audit verify`` and ``GET /api/v1/audit/verify`` always walk everything.
    """

    def __init__(self, *, full_check_after: float = 600.0) -> None:
        self.full_check_after = full_check_after
        self._lock = threading.Lock()
        self._seq = 0
        self._hash = GENESIS_HASH
        self._verified_at = 0.0

    def _forget(self) -> None:
        self._seq, self._hash, self._verified_at = 0, GENESIS_HASH, 0.0

    def _prefix_holds(self, session: Session, anchors: Sequence[Anchor]) -> bool:
        if time.monotonic() - self._verified_at > self.full_check_after:
            return False
        count = session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.seq <= self._seq)
        )
        if count != self._seq:
            return False
        signed = [anchor for anchor in anchors if anchor.seq <= self._seq]
        if signed:
            newest = max(signed, key=lambda anchor: anchor.seq)
            stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == newest.seq))
            return stored == newest.hash
        return True

    def verify(
        self, session: Session, *, anchors: Sequence[Anchor] = (), batch_size: int = 2000
    ) -> ChainVerification:
        with self._lock:
            rewritten: str | None = None
            if self._seq:
                stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == self._seq))
                if stored != self._hash:
                    rewritten = (
                        f"event {self._seq} changed since this console verified it "
                        f"(its hash was {self._hash[:12]}…, now "
                        f"{(stored or 'gone')[:12]}…): the log was rewritten"
                    )
            if rewritten or (self._seq and not self._prefix_holds(session, anchors)):
                start_seq, start_hash = 1, GENESIS_HASH
            else:
                start_seq, start_hash = self._seq + 1, self._hash
            walk = _ChainWalk(
                [anchor for anchor in anchors if anchor.seq >= start_seq],
                start_seq=start_seq,
                start_hash=start_hash,
            )
            signed_before = [anchor.seq for anchor in anchors if anchor.seq < start_seq]
            if signed_before:
                walk.anchored_seq = max(signed_before)
            result = _walk(session, walk, batch_size=batch_size)
            if rewritten is not None:
                # Keep the remembered head: every later view must say the same.
                if result.ok:
                    return ChainVerification(False, result.checked, self._seq, rewritten)
                return result
            if not result.ok:
                self._forget()
                return result
            if start_seq == 1:
                self._verified_at = time.monotonic()
            self._seq, self._hash = result.head_seq, result.head_hash
            return result


def count_events(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditEvent)) or 0
