"""Traffic policies and mesh-wide defaults: read, validate, write a new revision, audit, and
record the config change agents must apply, all in the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.agents.models import ConfigChange
from app.agents.snapshot import ServiceState, normalise_dependencies, policy_issues
from app.audit import service as audit
from app.catalog import service as catalog
from app.catalog.models import Service
from app.changes import MESH_WIDE, record_change, touched
from app.db import utcnow
from app.errors import ConflictError, InvalidError, NotFoundError, StaleRevisionError
from app.identity.principal import Action, Principal, authorize
from app.pagination import Page, paginate
from app.policies.models import MeshDefaultsRevision, TrafficPolicyRevision
from app.policies.schemas import (
    MeshDefaultsSpec,
    MeshDefaultsWrite,
    RevertRequest,
    TrafficPolicySpec,
    TrafficPolicyWrite,
    WeightsWrite,
)
from mesh_agent.protocol import Backend, Route

TRAFFIC = "traffic"
DEFAULTS = "mesh-defaults"
DEFAULT_ROUTE = "default"


# ---------------------------------------------------------------------------------------------
# Mesh-wide defaults


def current_defaults(session: Session) -> tuple[MeshDefaultsSpec, MeshDefaultsRevision | None]:
    row = session.scalar(
        select(MeshDefaultsRevision).order_by(MeshDefaultsRevision.revision.desc()).limit(1)
    )
    if row is None:
        return MeshDefaultsSpec(), None
    return MeshDefaultsSpec.model_validate(row.spec), row


def put_defaults(
    session: Session,
    actor: Principal,
    *,
    data: MeshDefaultsWrite,
    reason: str | None = None,
    reverted_from: int | None = None,
) -> MeshDefaultsRevision:
    authorize(actor, Action.CHANGE_MESH)
    before, current = current_defaults(session)
    current_revision = current.revision if current else 0
    if data.revision != current_revision:
        raise StaleRevisionError(expected=data.revision, actual=current_revision)
    spec = data.spec.model_dump(mode="json")
    unchanged = spec == before.model_dump(mode="json")
    if unchanged and reverted_from is None and current is not None:
        return current
    row = MeshDefaultsRevision(
        revision=current_revision + 1,
        spec=spec,
        actor=actor.actor,
        reason=reason or "",
        reverted_from=reverted_from,
        created_at=utcnow(),
    )
    session.add(row)
    _insert_or_stale(session, data.revision, current_revision)
    audit.record(
        session,
        actor,
        action="defaults.revert" if reverted_from is not None else "defaults.update",
        resource_kind=DEFAULTS,
        resource_name="mesh",
        before=before.model_dump(mode="json"),
        after=spec,
        reason=reason,
    )
    change = ConfigChange(
        namespace="",
        service="",
        kind="defaults",
        revision=row.revision,
        actor=actor.actor,
        reason=reason or "",
        summary=f"mesh defaults revision {row.revision}"
        + (f" (revert to {reverted_from})" if reverted_from is not None else ""),
        created_at=row.created_at,
    )
    session.add(change)
    session.flush()
    record_change(session, change.id)
    touched(session, *MESH_WIDE)
    return row


def revert_defaults(
    session: Session, actor: Principal, *, data: RevertRequest, reason: str | None = None
) -> MeshDefaultsRevision:
    authorize(actor, Action.CHANGE_MESH)
    target = session.scalar(
        select(MeshDefaultsRevision).where(MeshDefaultsRevision.revision == data.to)
    )
    spec = MeshDefaultsSpec() if data.to == 0 else None
    if target is not None:
        spec = MeshDefaultsSpec.model_validate(target.spec)
    if spec is None:
        raise NotFoundError(f"the mesh defaults have no revision {data.to}", field="to")
    return put_defaults(
        session,
        actor,
        data=MeshDefaultsWrite(revision=data.revision, spec=spec),
        reason=reason or f"revert to revision {data.to}",
        reverted_from=data.to,
    )


def list_defaults_revisions(
    session: Session, *, page: int = 1, page_size: int = 50
) -> Page[MeshDefaultsRevision]:
    return paginate(
        session,
        select(MeshDefaultsRevision),
        order_by=[MeshDefaultsRevision.revision.desc()],
        page=page,
        page_size=page_size,
    )


# ---------------------------------------------------------------------------------------------
# Traffic policy per service


def current_policy(session: Session, service: Service) -> TrafficPolicyRevision | None:
    return session.scalar(
        select(TrafficPolicyRevision)
        .where(TrafficPolicyRevision.service_id == service.id)
        .order_by(TrafficPolicyRevision.revision.desc())
        .limit(1)
    )


def spec_of(row: TrafficPolicyRevision | None) -> TrafficPolicySpec:
    return TrafficPolicySpec() if row is None else TrafficPolicySpec.model_validate(row.spec)


def get_policy(
    session: Session, namespace: str, name: str
) -> tuple[Service, TrafficPolicyRevision | None, TrafficPolicySpec]:
    service = catalog.get_service(session, namespace, name)
    row = current_policy(session, service)
    return service, row, spec_of(row)


def validate_policy(
    session: Session, service: Service, spec: TrafficPolicySpec, *, prefix: str = "spec"
) -> None:
    """422 naming every field an agent would refuse, or that names a version that does not
    exist. Nothing is stored or pushed for an invalid policy."""
    defaults, _ = current_defaults(session)
    state = ServiceState(
        namespace=service.namespace,
        name=service.name,
        versions=tuple(v.name for v in service.versions),
        endpoints={},
        dependencies=normalise_dependencies(service.namespace, service.dependencies),
        spec=spec,
    )
    issues = policy_issues(state, defaults, prefix=prefix)
    if issues:
        raise InvalidError(issues)


def put_policy(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: TrafficPolicyWrite,
    reason: str | None = None,
    kind: str = TRAFFIC,
    summary: str | None = None,
    reverted_from: int | None = None,
) -> tuple[TrafficPolicyRevision, ConfigChange | None]:
    """Store ``data.spec`` as the next revision. An unchanged spec stores nothing (and pushes
    nothing): returns the current revision and no change."""
    service, current, before = get_policy(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    current_revision = current.revision if current else 0
    if data.revision != current_revision:
        raise StaleRevisionError(expected=data.revision, actual=current_revision)
    validate_policy(session, service, data.spec)
    after = data.spec.model_dump(mode="json", exclude_none=True)
    unchanged = after == before.model_dump(mode="json", exclude_none=True)
    if unchanged and reverted_from is None and current is not None:
        return current, None
    row = TrafficPolicyRevision(
        service_id=service.id,
        revision=current_revision + 1,
        spec=after,
        actor=actor.actor,
        reason=reason or "",
        reverted_from=reverted_from,
        created_at=utcnow(),
    )
    session.add(row)
    _insert_or_stale(session, data.revision, current_revision)
    action = {"weights": "traffic.weights", "revert": "traffic.revert"}.get(kind, "traffic.update")
    audit.record(
        session,
        actor,
        action=action,
        resource_kind=TRAFFIC,
        resource_name=service.qualified_name,
        before=before.model_dump(mode="json", exclude_none=True),
        after=after,
        reason=reason,
    )
    change = ConfigChange(
        namespace=namespace,
        service=name,
        kind=kind,
        revision=row.revision,
        actor=actor.actor,
        reason=reason or "",
        summary=summary or f"traffic policy revision {row.revision}",
        created_at=row.created_at,
    )
    session.add(change)
    session.flush()
    record_change(session, change.id)
    touched(session, namespace, name)
    return row, change


def default_weights(spec: TrafficPolicySpec) -> dict[str, int]:
    """The split of the catch-all route (the one the canary control moves), or {}."""
    for route in spec.routes:
        if route.name == DEFAULT_ROUTE:
            return {b.version: b.weight for b in route.backends}
    return {}


def with_weights(spec: TrafficPolicySpec, weights: dict[str, int]) -> TrafficPolicySpec:
    backends = tuple(Backend(version=v, weight=w) for v, w in weights.items())
    routes = list(spec.routes)
    for i, route in enumerate(routes):
        if route.name == DEFAULT_ROUTE:
            routes[i] = route.model_copy(update={"backends": backends})
            break
    else:
        routes.append(Route(name=DEFAULT_ROUTE, backends=backends))
    return spec.model_copy(update={"routes": routes})


def set_weights(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: WeightsWrite,
    reason: str | None = None,
) -> tuple[TrafficPolicyRevision, ConfigChange | None]:
    """The canary control: move the catch-all route's split, keep every other route."""
    service, current, spec = get_policy(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    current_revision = current.revision if current else 0
    if data.revision is not None and data.revision != current_revision:
        raise StaleRevisionError(expected=data.revision, actual=current_revision)
    known = {v.name for v in service.versions}
    issues = [
        (f"weights.{version}", f"{name} has no version {version!r}")
        for version in data.weights
        if version not in known
    ]
    total = sum(data.weights.values())
    if total != 100:
        issues.append(("weights", f"weights must sum to 100 (they sum to {total})"))
    if issues:
        raise InvalidError(issues)
    # Versions the caller left out keep a 0 weight, so the split always names every version.
    weights = {v.name: data.weights.get(v.name, 0) for v in service.versions}
    summary = ", ".join(f"{v} {w} %" for v, w in weights.items())
    return put_policy(
        session,
        actor,
        namespace=namespace,
        name=name,
        data=TrafficPolicyWrite(revision=current_revision, spec=with_weights(spec, weights)),
        reason=reason,
        kind="weights",
        summary=summary,
    )


def revert_policy(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: RevertRequest,
    reason: str | None = None,
) -> tuple[TrafficPolicyRevision, ConfigChange | None]:
    service = catalog.get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    if data.to == 0:
        spec = TrafficPolicySpec()
    else:
        target = session.scalar(
            select(TrafficPolicyRevision).where(
                TrafficPolicyRevision.service_id == service.id,
                TrafficPolicyRevision.revision == data.to,
            )
        )
        if target is None:
            raise NotFoundError(
                f"{namespace}/{name} has no traffic policy revision {data.to}", field="to"
            )
        spec = spec_of(target)
    return put_policy(
        session,
        actor,
        namespace=namespace,
        name=name,
        data=TrafficPolicyWrite(revision=data.revision, spec=spec),
        reason=reason or f"revert to revision {data.to}",
        kind="revert",
        summary=f"revert to revision {data.to}",
        reverted_from=data.to,
    )


def list_revisions(
    session: Session, namespace: str, name: str, *, page: int = 1, page_size: int = 50
) -> Page[TrafficPolicyRevision]:
    service = catalog.get_service(session, namespace, name)
    return paginate(
        session,
        select(TrafficPolicyRevision).where(TrafficPolicyRevision.service_id == service.id),
        order_by=[TrafficPolicyRevision.revision.desc()],
        page=page,
        page_size=page_size,
    )


def recent_changes(
    session: Session, namespace: str, name: str, *, limit: int = 20
) -> list[ConfigChange]:
    return list(
        session.scalars(
            select(ConfigChange)
            .where(ConfigChange.namespace == namespace, ConfigChange.service == name)
            .order_by(ConfigChange.id.desc())
            .limit(limit)
        )
    )


def revision_count(session: Session, service: Service) -> int:
    return (
        session.scalar(select(func.count()).where(TrafficPolicyRevision.service_id == service.id))
        or 0
    )


def _insert_or_stale(session: Session, expected: int, current: int) -> None:
    """Two writers that both read revision N insert N + 1; the unique constraint lets one win
    and the other gets the same 409 as a stale read."""
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise StaleRevisionError(expected=expected, actual=current + 1) from exc


def spec_dict(spec: TrafficPolicySpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True)


__all__ = [
    "ConflictError",
    "current_defaults",
    "current_policy",
    "default_weights",
    "get_policy",
    "list_defaults_revisions",
    "list_revisions",
    "put_defaults",
    "put_policy",
    "recent_changes",
    "revert_defaults",
    "revert_policy",
    "set_weights",
    "spec_dict",
    "validate_policy",
    "with_weights",
]
