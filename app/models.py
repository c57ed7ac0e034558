"""Imports every model module so Base.metadata knows all tables (for Alembic and tests)."""

from app.agents.models import Agent, ConfigChange
from app.audit.models import AuditCheckpoint, AuditEvent
from app.catalog.models import Instance, Service, Version
from app.policies.models import MeshDefaultsRevision, TrafficPolicyRevision
from app.telemetry.models import EdgeRollup, Span

__all__ = [
    "Agent",
    "AuditCheckpoint",
    "AuditEvent",
    "ConfigChange",
    "EdgeRollup",
    "Instance",
    "MeshDefaultsRevision",
    "Service",
    "Span",
    "TrafficPolicyRevision",
    "Version",
]
