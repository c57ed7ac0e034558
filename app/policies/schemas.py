"""What a user edits, built from the agent's own wire models (``mesh_agent.protocol``): one
definition of what is valid, on both sides of the push."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mesh_agent.protocol import (
    ConnectionLimits,
    OutlierDetection,
    RateLimit,
    RetryBudget,
    RetryPolicy,
    Route,
)

LoadBalancer = Literal["round_robin", "least_request"]
MAX_ROUTES = 100


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrafficPolicySpec(Strict):
    """A service's traffic policy. Routes are tried in order, first match wins; each splits its
    traffic over versions by integer weights that sum to 100. Every other field left out (null)
    is inherited from the mesh-wide defaults."""

    routes: Annotated[list[Route], Field(max_length=MAX_ROUTES)] = []
    load_balancer: LoadBalancer | None = None
    timeout_ms: Annotated[int, Field(ge=0, le=3_600_000)] | None = None
    retries: RetryPolicy | None = None
    retry_budget: RetryBudget | None = None
    outlier_detection: OutlierDetection | None = None
    connection_limits: ConnectionLimits | None = None
    rate_limit: RateLimit | None = None


class MeshDefaultsSpec(Strict):
    """Set once by the platform team; every service inherits what its policy leaves out."""

    load_balancer: LoadBalancer = "least_request"
    timeout_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 15_000
    retries: RetryPolicy = RetryPolicy()
    retry_budget: RetryBudget = RetryBudget()
    outlier_detection: OutlierDetection = OutlierDetection()
    connection_limits: ConnectionLimits = ConnectionLimits()


Reason = Annotated[str, StringConstraints(max_length=1000)]
# Revisions are stored as 32-bit integers on both databases.
Revision = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TrafficPolicyWrite(Strict):
    """``revision`` is the revision you read (0 when the service never had a policy)."""

    revision: Revision
    spec: TrafficPolicySpec


class MeshDefaultsWrite(Strict):
    revision: Revision
    spec: MeshDefaultsSpec


class RevertRequest(Strict):
    """Make revision ``to`` the policy in force again, as a new revision. ``revision`` is the
    current revision you read."""

    revision: Revision
    to: Revision


VersionName = Annotated[str, StringConstraints(min_length=1, max_length=63)]


class WeightsWrite(Strict):
    """The canary control: set the weights of the default (catch-all) route. Versions left out
    get 0. ``revision`` is optional here: a canary click applies to whatever policy is in force
    (the other routes are kept as they are), which is what a person clicking 25 % means."""

    weights: Annotated[dict[VersionName, Annotated[int, Field(ge=0, le=100)]], Field(min_length=1)]
    revision: Revision | None = None


class ChangeRead(BaseModel):
    """One change pushed to agents and how far it got."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    namespace: str
    service: str
    kind: str
    revision: int | None
    actor: str
    reason: str
    summary: str
    created_at: datetime
    state: str
    targeted: int
    synced: int
    nacked: int
    errors: list[dict[str, Any]]
    duration_ms: int | None


class TrafficPolicyRead(BaseModel):
    namespace: str
    service: str
    revision: int
    spec: TrafficPolicySpec
    effective: dict[str, Any]
    """The service's config as agents receive it: defaults applied, endpoints filled in."""
    actor: str | None
    reason: str
    created_at: datetime | None
    change: ChangeRead | None = None


class RevisionRead(BaseModel):
    revision: int
    spec: TrafficPolicySpec
    actor: str
    reason: str
    reverted_from: int | None
    created_at: datetime


class RevisionList(BaseModel):
    items: list[RevisionRead]
    total: int
    page: int
    page_size: int
    pages: int


class MeshDefaultsRead(BaseModel):
    revision: int
    spec: MeshDefaultsSpec
    actor: str | None
    reason: str
    created_at: datetime | None
