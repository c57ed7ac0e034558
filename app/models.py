"""Imports every model module so Base.metadata knows all tables (for Alembic and tests)."""

from app.agents.models import Agent, ConfigChange
from app.audit.models import AuditCheckpoint, AuditEvent
from app.catalog.models import Instance, Service, Version
from app.identity.models import (
    ApiToken,
    SignInFailure,
    SignInLink,
    Team,
    TeamMember,
    User,
    WebSession,
)
from app.policies.models import MeshDefaultsRevision, TrafficPolicyRevision
from app.telemetry.models import EdgeRollup, Span

__all__ = [
    "Agent",
    "ApiToken",
    "AuditCheckpoint",
    "AuditEvent",
    "ConfigChange",
    "EdgeRollup",
    "Instance",
    "MeshDefaultsRevision",
    "Service",
    "SignInFailure",
    "SignInLink",
    "Span",
    "Team",
    "TeamMember",
    "TrafficPolicyRevision",
    "User",
    "Version",
    "WebSession",
]
