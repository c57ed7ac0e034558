from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, JSONType, UTCDateTime, utcnow

HEALTH_STATES = ("healthy", "unhealthy", "unknown")


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (
        UniqueConstraint("namespace", "name"),
        Index("ix_services_owner_team", "owner_team"),
        Index("ix_services_name", "name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    owner_team: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    links: Mapped[list[dict[str, str]]] = mapped_column(JSONType, default=list)
    labels: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    # Services this one calls outside its own namespace ("namespace/name"), or in it ("name").
    # Its agents get the config of their own namespace plus these, nothing else.
    dependencies: Mapped[list[str]] = mapped_column(JSONType, default=list)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[Version]] = relationship(
        back_populates="service",
        lazy="raise",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Version.name",
    )
    instances: Mapped[list[Instance]] = relationship(
        back_populates="service",
        lazy="raise",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Instance.address",
    )

    # The ORM adds "WHERE revision = <old>" to every UPDATE and bumps it, so two writers
    # that both passed the revision check still cannot both win.
    __mapper_args__ = {"version_id_col": revision}

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state for audit before/after records."""
        return {
            "namespace": self.namespace,
            "name": self.name,
            "owner_team": self.owner_team,
            "description": self.description,
            "links": list(self.links),
            "labels": dict(self.labels),
            "dependencies": list(self.dependencies),
        }


class Version(Base):
    __tablename__ = "service_versions"
    __table_args__ = (UniqueConstraint("service_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    labels: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    service: Mapped[Service] = relationship(back_populates="versions", lazy="raise")

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels)}


class Instance(Base):
    __tablename__ = "service_instances"
    __table_args__ = (
        UniqueConstraint("service_id", "address"),
        CheckConstraint(f"health IN {HEALTH_STATES!r}", name="health_known"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(63))
    health: Mapped[str] = mapped_column(String(16), default="unknown")
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    service: Mapped[Service] = relationship(back_populates="instances", lazy="raise")

    def snapshot(self) -> dict[str, Any]:
        return {"address": self.address, "version": self.version, "health": self.health}
