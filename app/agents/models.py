from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JSONType, UTCDateTime, utcnow


class Agent(Base):
    """A registered ``mesh-agent``. Its live state (connected, what it was sent, ACKed, NACKed)
    is kept in memory by the hub and written here in batches, so a restarted control plane and
    the API read the last known state."""

    __tablename__ = "agents"
    __table_args__ = (Index("ix_agents_service", "namespace", "service"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), unique=True)
    namespace: Mapped[str] = mapped_column(String(63))
    service: Mapped[str] = mapped_column(String(63))
    version: Mapped[str] = mapped_column(String(63))
    address: Mapped[str] = mapped_column(String(255))
    agent_version: Mapped[str] = mapped_column(String(63), default="")
    instance_id: Mapped[int | None] = mapped_column(
        ForeignKey("service_instances.id", ondelete="SET NULL"), nullable=True
    )
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acked_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    nacked_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ConfigChange(Base):
    """A change that had to reach agents (a traffic policy revision, the mesh defaults) and how
    far it got: agents targeted, synced, NACKed with their errors, time to converge."""

    __tablename__ = "config_changes"
    __table_args__ = (Index("ix_config_changes_service", "namespace", "service", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63))
    service: Mapped[str] = mapped_column(String(63))  # "" for mesh-wide changes
    kind: Mapped[str] = mapped_column(String(32))  # traffic, weights, revert, defaults
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # pending: being pushed; converged: every targeted agent ACKed; partial: some NACKed or
    # did not answer within the deadline; idle: no agent needed it.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    targeted: Mapped[int] = mapped_column(Integer, default=0)
    synced: Mapped[int] = mapped_column(Integer, default=0)
    nacked: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
