from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JSONType, UTCDateTime


class AuditEvent(Base):
    """One change. Rows are never updated or deleted (database triggers refuse it), and each
    carries the hash of its predecessor, so an edit made behind the triggers' back still shows
    up in ``meshctl audit verify``."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_resource", "resource_kind", "resource_name", "seq"),
        Index("ix_audit_events_actor", "actor", "seq"),
        Index("ix_audit_events_occurred_at", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # seq is dense and gap-free (1, 2, 3 …) so a deleted event is visible as a gap.
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), unique=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(255))
    # "user:3", "token:7", "agent:<id>", "system:meshctl": names can be reused, ids cannot.
    actor_id: Mapped[str] = mapped_column(String(127), default="")
    client_address: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(63))
    resource_kind: Mapped[str] = mapped_column(String(63))
    resource_name: Mapped[str] = mapped_column(String(255))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditCheckpoint(Base):
    """A signed statement "the chain's head was event ``seq`` with hash ``hash`` at ``signed_at``".

    A copy: the authoritative one is the append-only checkpoint file outside the database
    (``app.audit.checkpoints``), since whoever can write this table could delete rows from it.
    """

    __tablename__ = "audit_checkpoints"
    __table_args__ = (Index("ix_audit_checkpoints_seq", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
