"""JSON API for the catalog under /api/v1/services."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.catalog import service
from app.catalog.schemas import (
    InstanceCreate,
    InstanceRead,
    Reason,
    ServiceCreate,
    ServiceList,
    ServiceRead,
    ServiceSummary,
    ServiceUpdate,
    VersionCreate,
    VersionRead,
)
from app.deps import ActorDep, SessionDep
from app.errors import DomainError
from app.pagination import PageNumber

router = APIRouter(prefix="/api/v1/services", tags=["services"])

NamespaceQuery = Annotated[
    str, Query(max_length=63, description="Namespace of the service (default: 'default').")
]
ReasonHeader = Annotated[
    Reason | None,
    Header(
        alias="X-Mesh-Reason",
        max_length=1000,
        description="Why this change is made; stored in the audit log.",
    ),
]


def _etag(revision: int) -> str:
    return f'"{revision}"'


def _revision_from_if_match(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise DomainError("If-Match must be the service's ETag (its revision)", field="If-Match")
    return int(value)


@router.get("", response_model=ServiceList, summary="List and search services")
def list_services(
    session: SessionDep,
    q: Annotated[
        str | None, Query(max_length=200, description="Search name, description, team")
    ] = None,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
    team: Annotated[str | None, Query(max_length=63)] = None,
    page: PageNumber = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 25,
) -> ServiceList:
    result = service.list_services(
        session, q=q, namespace=namespace, team=team, page=page, page_size=page_size
    )
    return ServiceList(
        items=[ServiceSummary.model_validate(item) for item in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
        pages=result.pages,
    )


@router.post(
    "", response_model=ServiceRead, status_code=status.HTTP_201_CREATED, summary="Create a service"
)
def create_service(
    session: SessionDep,
    actor: ActorDep,
    data: ServiceCreate,
    response: Response,
    reason: ReasonHeader = None,
) -> ServiceRead:
    created = service.create_service(session, actor, data=data, reason=reason)
    response.headers["ETag"] = _etag(created.revision)
    response.headers["Location"] = f"/api/v1/services/{created.name}?namespace={created.namespace}"
    return ServiceRead.model_validate(created)


@router.get("/{name}", response_model=ServiceRead, summary="Get one service")
def get_service(
    session: SessionDep, name: str, response: Response, namespace: NamespaceQuery = "default"
) -> ServiceRead:
    found = service.get_service(session, namespace, name)
    response.headers["ETag"] = _etag(found.revision)
    return ServiceRead.model_validate(found)


@router.patch(
    "/{name}",
    response_model=ServiceRead,
    summary="Update a service",
    description="Send the `revision` you read. If the service changed since, the answer is 409 "
    "and nothing is written.",
)
def update_service(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    data: ServiceUpdate,
    response: Response,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> ServiceRead:
    updated = service.update_service(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    refreshed = service.get_service(session, namespace, name)
    response.headers["ETag"] = _etag(updated.revision)
    return ServiceRead.model_validate(refreshed)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a service with its versions and instances",
)
def delete_service(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    namespace: NamespaceQuery = "default",
    revision: Annotated[int | None, Query(ge=1)] = None,
    if_match: Annotated[str | None, Header(alias="If-Match", max_length=100)] = None,
    reason: ReasonHeader = None,
) -> Response:
    expected = revision if revision is not None else _revision_from_if_match(if_match)
    service.delete_service(
        session, actor, namespace=namespace, name=name, revision=expected, reason=reason
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/versions", response_model=list[VersionRead], summary="List versions")
def list_versions(
    session: SessionDep, name: str, namespace: NamespaceQuery = "default"
) -> list[VersionRead]:
    found = service.get_service(session, namespace, name)
    return [VersionRead.model_validate(version) for version in found.versions]


@router.post(
    "/{name}/versions",
    response_model=VersionRead,
    status_code=status.HTTP_201_CREATED,
    summary="Add a version (subset)",
)
def create_version(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    data: VersionCreate,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> VersionRead:
    version = service.create_version(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    return VersionRead.model_validate(version)


@router.delete(
    "/{name}/versions/{version}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a version that has no instances",
)
def delete_version(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    version: str,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> Response:
    service.delete_version(
        session, actor, namespace=namespace, name=name, version_name=version, reason=reason
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/instances", response_model=list[InstanceRead], summary="List instances")
def list_instances(
    session: SessionDep, name: str, namespace: NamespaceQuery = "default"
) -> list[InstanceRead]:
    found = service.get_service(session, namespace, name)
    return [InstanceRead.model_validate(instance) for instance in found.instances]


@router.post(
    "/{name}/instances",
    response_model=InstanceRead,
    status_code=status.HTTP_201_CREATED,
    summary="Register an instance",
)
def create_instance(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    data: InstanceCreate,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> InstanceRead:
    instance = service.create_instance(
        session, actor, namespace=namespace, name=name, data=data, reason=reason
    )
    return InstanceRead.model_validate(instance)


@router.delete(
    "/{name}/instances/{address}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Deregister an instance",
)
def delete_instance(
    session: SessionDep,
    actor: ActorDep,
    name: str,
    address: str,
    namespace: NamespaceQuery = "default",
    reason: ReasonHeader = None,
) -> Response:
    service.delete_instance(
        session, actor, namespace=namespace, name=name, address=address, reason=reason
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
