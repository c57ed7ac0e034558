"""The catalog's one service layer: every write validates, writes and records its audit
event in the caller's transaction. Callers (API, HTML, CLI) never touch models directly for
writes."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from app.audit import service as audit
from app.catalog.models import Instance, Service, Version
from app.catalog.schemas import InstanceCreate, Link, ServiceCreate, ServiceUpdate, VersionCreate
from app.changes import touched
from app.db import utcnow
from app.errors import ConflictError, NotFoundError, StaleRevisionError
from app.identity import teams
from app.identity.principal import Action, Principal, authorize
from app.pagination import Page, paginate

SERVICE = "service"
VERSION = "version"
INSTANCE = "instance"


def _links(links: list[Link]) -> list[dict[str, str]]:
    return [{"title": link.title, "url": str(link.url)} for link in links]


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_services(
    session: Session,
    *,
    q: str | None = None,
    namespace: str | None = None,
    team: str | None = None,
    page: int = 1,
    page_size: int = 25,
) -> Page[Service]:
    query = select(Service)
    if q and q.strip():
        pattern = f"%{_escape_like(q.strip().lower())}%"
        query = query.where(
            or_(
                func.lower(Service.name).like(pattern, escape="\\"),
                func.lower(Service.description).like(pattern, escape="\\"),
                func.lower(Service.owner_team).like(pattern, escape="\\"),
            )
        )
    if namespace:
        query = query.where(Service.namespace == namespace)
    if team:
        query = query.where(Service.owner_team == team)
    return paginate(
        session,
        query,
        order_by=[Service.namespace, Service.name, Service.id],
        page=page,
        page_size=page_size,
    )


def list_namespaces(session: Session) -> list[str]:
    return list(session.scalars(select(Service.namespace).distinct().order_by(Service.namespace)))


def list_teams(session: Session) -> list[str]:
    return list(session.scalars(select(Service.owner_team).distinct().order_by(Service.owner_team)))


def get_service(session: Session, namespace: str, name: str) -> Service:
    service = session.scalar(
        select(Service)
        .where(Service.namespace == namespace, Service.name == name)
        .options(selectinload(Service.versions), selectinload(Service.instances))
    )
    if service is None:
        raise NotFoundError(f"service {namespace}/{name} not found")
    return service


def create_service(
    session: Session, actor: Principal, *, data: ServiceCreate, reason: str | None = None
) -> Service:
    authorize(actor, Action.CHANGE_SERVICE, team=data.owner_team)
    exists = session.scalar(
        select(Service.id).where(Service.namespace == data.namespace, Service.name == data.name)
    )
    if exists is not None:
        raise ConflictError(
            f"a service named {data.name!r} already exists in namespace {data.namespace!r}",
            field="name",
        )
    now = utcnow()
    service = Service(
        namespace=data.namespace,
        name=data.name,
        owner_team=data.owner_team,
        description=data.description,
        links=_links(data.links),
        labels=dict(data.labels),
        dependencies=list(data.dependencies),
        created_at=now,
        updated_at=now,
        versions=[],
        instances=[],
    )
    teams.ensure_team(session, actor, data.owner_team)
    session.add(service)
    _flush_or_conflict(session, f"service {data.namespace}/{data.name} already exists", "name")
    touched(session, data.namespace, data.name)
    audit.record(
        session,
        actor,
        action="service.create",
        resource_kind=SERVICE,
        resource_name=service.qualified_name,
        before=None,
        after=service.snapshot(),
        reason=reason,
    )
    return service


def update_service(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: ServiceUpdate,
    reason: str | None = None,
) -> Service:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    if data.owner_team is not None and data.owner_team != service.owner_team:
        # Handing a service to another team needs the right to change that team's services.
        authorize(actor, Action.CHANGE_SERVICE, team=data.owner_team)
        teams.ensure_team(session, actor, data.owner_team)
    if data.revision != service.revision:
        raise StaleRevisionError(expected=data.revision, actual=service.revision)
    before = service.snapshot()
    changes: dict[str, Any] = {}
    if data.owner_team is not None:
        changes["owner_team"] = data.owner_team
    if data.description is not None:
        changes["description"] = data.description
    if data.links is not None:
        changes["links"] = _links(data.links)
    if data.labels is not None:
        changes["labels"] = dict(data.labels)
    if data.dependencies is not None:
        changes["dependencies"] = list(data.dependencies)
    changed = {key: value for key, value in changes.items() if before[key] != value}
    if not changed:
        return service
    for key, value in changed.items():
        setattr(service, key, value)
    service.updated_at = utcnow()
    try:
        session.flush()
    except StaleDataError as exc:
        raise StaleRevisionError(expected=data.revision, actual=data.revision + 1) from exc
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="service.update",
        resource_kind=SERVICE,
        resource_name=service.qualified_name,
        before={key: before[key] for key in changed},
        after={key: changed[key] for key in changed},
        reason=reason,
    )
    return service


def delete_service(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    revision: int | None = None,
    reason: str | None = None,
) -> None:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    if revision is not None and revision != service.revision:
        raise StaleRevisionError(expected=revision, actual=service.revision)
    before = service.snapshot()
    before["versions"] = [version.snapshot() for version in service.versions]
    before["instances"] = [instance.snapshot() for instance in service.instances]
    qualified = service.qualified_name
    statement = delete(Service).where(Service.id == service.id)
    if revision is not None:
        # The check above read the row; another writer may commit an edit before this
        # statement runs (PostgreSQL's READ COMMITTED). The revision in the WHERE clause makes
        # such a delete remove nothing instead of discarding an edit its author never saw.
        statement = statement.where(Service.revision == revision)
    deleted = session.execute(statement)
    if cast(CursorResult[Any], deleted).rowcount == 0:
        current = session.scalar(select(Service.revision).where(Service.id == service.id))
        if current is None:
            raise NotFoundError(f"service {qualified} not found")
        raise StaleRevisionError(expected=revision or service.revision, actual=current)
    session.expunge(service)
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="service.delete",
        resource_kind=SERVICE,
        resource_name=qualified,
        before=before,
        after=None,
        reason=reason,
    )


def create_version(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: VersionCreate,
    reason: str | None = None,
) -> Version:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    if any(version.name == data.name for version in service.versions):
        raise ConflictError(
            f"service {namespace}/{name} already has a version {data.name!r}", field="name"
        )
    version = Version(service_id=service.id, name=data.name, labels=dict(data.labels))
    session.add(version)
    _flush_or_conflict(session, f"version {data.name!r} already exists", "name")
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="version.create",
        resource_kind=VERSION,
        resource_name=f"{service.qualified_name}/{data.name}",
        before=None,
        after=version.snapshot(),
        reason=reason,
    )
    return version


def delete_version(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    version_name: str,
    reason: str | None = None,
) -> None:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    version = next((v for v in service.versions if v.name == version_name), None)
    if version is None:
        raise NotFoundError(f"service {namespace}/{name} has no version {version_name!r}")
    in_use = [i.address for i in service.instances if i.version == version_name]
    if in_use:
        raise ConflictError(
            f"version {version_name!r} still has instances ({', '.join(in_use)}); remove them first"
        )
    before = version.snapshot()
    session.execute(delete(Version).where(Version.id == version.id))
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="version.delete",
        resource_kind=VERSION,
        resource_name=f"{service.qualified_name}/{version_name}",
        before=before,
        after=None,
        reason=reason,
    )


def create_instance(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    data: InstanceCreate,
    reason: str | None = None,
) -> Instance:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    if not any(version.name == data.version for version in service.versions):
        raise NotFoundError(
            f"service {namespace}/{name} has no version {data.version!r}; create it first",
            field="version",
        )
    if any(instance.address == data.address for instance in service.instances):
        raise ConflictError(
            f"an instance at {data.address} is already registered for {namespace}/{name}",
            field="address",
        )
    instance = Instance(
        service_id=service.id, address=data.address, version=data.version, health=data.health
    )
    session.add(instance)
    _flush_or_conflict(session, f"instance {data.address} already exists", "address")
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="instance.create",
        resource_kind=INSTANCE,
        resource_name=f"{service.qualified_name}/{data.address}",
        before=None,
        after=instance.snapshot(),
        reason=reason,
    )
    return instance


def delete_instance(
    session: Session,
    actor: Principal,
    *,
    namespace: str,
    name: str,
    address: str,
    reason: str | None = None,
) -> None:
    service = get_service(session, namespace, name)
    authorize(actor, Action.CHANGE_SERVICE, team=service.owner_team)
    instance = next((i for i in service.instances if i.address == address), None)
    if instance is None:
        raise NotFoundError(f"service {namespace}/{name} has no instance at {address}")
    before = instance.snapshot()
    session.execute(delete(Instance).where(Instance.id == instance.id))
    touched(session, namespace, name)
    audit.record(
        session,
        actor,
        action="instance.delete",
        resource_kind=INSTANCE,
        resource_name=f"{service.qualified_name}/{address}",
        before=before,
        after=None,
        reason=reason,
    )


def _flush_or_conflict(session: Session, message: str, field: str) -> None:
    """A concurrent writer can insert the same key between our check and our insert; the
    unique constraint catches it and the caller gets the same 409 as the early check."""
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise ConflictError(message, field=field) from exc
