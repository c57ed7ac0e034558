"""Imports every model module so Base.metadata knows all tables (for Alembic and tests)."""

from app.audit.models import AuditCheckpoint, AuditEvent
from app.catalog.models import Instance, Service, Version
from app.telemetry.models import EdgeRollup, Span

__all__ = ["AuditCheckpoint", "AuditEvent", "EdgeRollup", "Instance", "Service", "Span", "Version"]
