"""JSON API of traffic policies (``/api/v1/services/{name}/traffic``) and the mesh-wide
defaults (``/api/v1/mesh/defaults``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from sqlalchemy.orm import Session

from app.agents.api import HubDep, change_read
from app.agents.hub import PushHub
from app.agents.models import ConfigChange
from app.agents.snapshot import ServiceState, compose_service_config, normalise_dependencies
from app.catalog.models import Service
from app.deps import ActorDep, SessionDep
from app.policies import service
from app.policies.models import MeshDefaultsRevision, TrafficPolicyRevision
from app.policies.schemas import (
    ChangeRead,
    MeshDefaultsRead,
    MeshDefaultsWrite,
    RevertRequest,
    RevisionList,
    RevisionRead,
    TrafficPolicyRead,
    TrafficPolicySpec,
    TrafficPolicyWrite,
    WeightsWrite,
)

router = APIRouter(prefix="/api/v1", tags=["traffic"])

NamespaceQuery = Annotated[str, Query(max_length=63, description="Namespace of the service.")]
ReasonHeader = Annotated[
    str | None,
    Header(alias="X-Mesh-Reason", max_length=1000, description="Why; stored in the audit log."),
]


def effective_config(
    session: Session, service_row: Service, spec: TrafficPolicySpec
) -> dict[str, Any]:
    """The service as calling agents receive it now: defaults applied, live endpoints in."""
    defaults, _ = service.current_defaults(session)
    endpoints: dict[str, list[str]] = {}
    for instance in service_row.instances:
        if instance.health != "unhealthy":
            endpoints.setdefault(instance.version, []).append(instance.address)
    state = ServiceState(
        namespace=service_row.namespace,
        name=service_row.name,
        versions=tuple(v.name for v in service_row.versions),
        endpoints={v: tuple(a) for v, a in endpoints.items()},
        dependencies=normalise_dependencies(service_row.namespace, service_row.dependencies),
        spec=spec,
    )
    config, warnings = compose_service_config(state, defaults)
    return {
        "config": config.model_dump(mode="json") if config else None,
        "warnings": warnings,
    }


def _read(
    session: Session,
    hub: PushHub,
    namespace: str,
    name: str,
    change: ConfigChange | None = None,
) -> TrafficPolicyRead:
    service_row, row, spec = service.get_policy(session, namespace, name)
    return TrafficPolicyRead(
        namespace=namespace,
        service=name,
        revision=row.revision if row else 0,
        spec=spec,
        effective=effective_config(session, service_row, spec),
        actor=row.actor if row else None,
        reason=row.reason if row else "",
        created_at=row.created_at if row else None,
        change=change_read(change, hub) if change is not None else None,
    )


@router.get("/services/{name}/traffic", response_model=TrafficPolicyRead, summary="Traffic policy")
def get_traffic(
    session: SessionDep, hub: HubDep, name: str, namespace: NamespaceQuery = "default"
) -> TrafficPolicyRead:
    return _read(session, hub, namespace, name)


@router.put(
    "/services/{name}/traffic",
    response_model=TrafficPolicyRead,
    summary="Replace the traffic policy (a new revision)",
    description="Send the `revision` you read (0 if the service has no policy yet): a stale "
    "revision gets 409. Invalid policies (weights not summing to 100, unknown versions, "
    "anything an agent would refuse) get 422 with every problem by field; nothing is stored "
    "or pushed. The answer's `change` follows the push to agents (`GET /api/v1/changes/{id}`).",
)
def put_traffic(
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    name: str,
    data: TrafficPolicyWrite,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> TrafficPolicyRead:
    _, change = service.put_policy(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    return _read(session, hub, namespace, name, change)


@router.post(
    "/services/{name}/traffic/weights",
    response_model=TrafficPolicyRead,
    summary="Shift traffic between versions (the canary control)",
    description="Sets the split of the catch-all route named `default` (created if missing); "
    "versions left out get 0. Other routes are kept.",
)
def set_weights(
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    name: str,
    data: WeightsWrite,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> TrafficPolicyRead:
    _, change = service.set_weights(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    return _read(session, hub, namespace, name, change)


@router.get(
    "/services/{name}/traffic/revisions",
    response_model=RevisionList,
    summary="Traffic policy revisions, newest first",
)
def list_revisions(
    session: SessionDep,
    name: str,
    namespace: NamespaceQuery = "default",
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RevisionList:
    result = service.list_revisions(session, namespace, name, page=page, page_size=page_size)
    return RevisionList(
        items=[_revision(row) for row in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
        pages=result.pages,
    )


def _revision(row: TrafficPolicyRevision | MeshDefaultsRevision) -> RevisionRead:
    return RevisionRead(
        revision=row.revision,
        spec=TrafficPolicySpec.model_validate(row.spec)
        if isinstance(row, TrafficPolicyRevision)
        else TrafficPolicySpec(),
        actor=row.actor,
        reason=row.reason,
        reverted_from=row.reverted_from,
        created_at=row.created_at,
    )


@router.post(
    "/services/{name}/traffic/revert",
    response_model=TrafficPolicyRead,
    summary="Revert to an earlier revision (as a new revision)",
)
def revert_traffic(
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    name: str,
    data: RevertRequest,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> TrafficPolicyRead:
    _, change = service.revert_policy(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    return _read(session, hub, namespace, name, change)


@router.get(
    "/services/{name}/changes",
    response_model=list[ChangeRead],
    summary="Config changes of a service and how far each got (the timeline)",
)
def list_changes(
    session: SessionDep,
    hub: HubDep,
    name: str,
    namespace: NamespaceQuery = "default",
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[ChangeRead]:
    service.get_policy(session, namespace, name)  # 404 for an unknown service
    return [
        change_read(row, hub)
        for row in service.recent_changes(session, namespace, name, limit=limit)
    ]


def _defaults_read(session: Session) -> MeshDefaultsRead:
    spec, row = service.current_defaults(session)
    return MeshDefaultsRead(
        revision=row.revision if row else 0,
        spec=spec,
        actor=row.actor if row else None,
        reason=row.reason if row else "",
        created_at=row.created_at if row else None,
    )


@router.get("/mesh/defaults", response_model=MeshDefaultsRead, summary="Mesh-wide defaults")
def get_defaults(session: SessionDep) -> MeshDefaultsRead:
    return _defaults_read(session)


@router.put(
    "/mesh/defaults",
    response_model=MeshDefaultsRead,
    summary="Replace the mesh-wide defaults (a new revision; every service inherits them)",
)
def put_defaults(
    session: SessionDep, actor: ActorDep, data: MeshDefaultsWrite, reason: ReasonHeader = None
) -> MeshDefaultsRead:
    service.put_defaults(session, actor, data=data, reason=reason)
    return _defaults_read(session)


@router.post(
    "/mesh/defaults/revert",
    response_model=MeshDefaultsRead,
    summary="Revert the mesh-wide defaults to an earlier revision",
)
def revert_defaults(
    session: SessionDep, actor: ActorDep, data: RevertRequest, reason: ReasonHeader = None
) -> MeshDefaultsRead:
    service.revert_defaults(session, actor, data=data, reason=reason)
    return _defaults_read(session)
