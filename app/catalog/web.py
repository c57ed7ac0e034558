"""HTML routes of the catalog. Thin: parse the form, call the service, render or redirect."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from app.audit import service as audit
from app.catalog import service as catalog
from app.catalog.models import Service
from app.catalog.schemas import ServiceCreate, ServiceUpdate, VersionCreate
from app.deps import ActorDep, SessionDep, SettingsDep
from app.errors import ConflictError, DomainError, NotFoundError, StaleRevisionError
from app.pagination import PageNumber
from app.text import text_problem
from app.topology import service as topology
from app.web import (
    FormDep,
    clean_url,
    field_errors,
    flash,
    is_htmx,
    redirect,
    render,
    require_same_origin,
    toast,
)

router = APIRouter(dependencies=[Depends(require_same_origin)])

PAGE_SIZE = 25
RECENT_CHANGES = 8


# ---------------------------------------------------------------------------------------------
# Form <-> schema
# ---------------------------------------------------------------------------------------------


def _text(form: FormData, name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def parse_links(text: str) -> tuple[list[dict[str, str]], str | None]:
    """One link per line: ``Title https://url`` (a bare URL is its own title)."""
    links: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        title, _, url = line.rpartition(" ")
        links.append({"title": title.strip() or url, "url": url})
    return links, None


def parse_labels(text: str) -> tuple[dict[str, str], str | None]:
    """``key=value`` pairs, one per line or separated by commas."""
    labels: dict[str, str] = {}
    items = [item.strip() for line in text.splitlines() for item in line.split(",")]
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            return labels, f"{item!r}: write labels as key=value"
        if key.strip() in labels:
            return labels, f"label {key.strip()!r} is given twice"
        labels[key.strip()] = value.strip()
    return labels, None


def format_links(links: list[dict[str, str]]) -> str:
    return "\n".join(
        link["url"] if link["title"] == link["url"] else f"{link['title']} {link['url']}"
        for link in links
    )


def format_labels(labels: dict[str, str]) -> str:
    return "\n".join(f"{key}={value}" for key, value in sorted(labels.items()))


SERVICE_FIELDS = (
    "namespace",
    "name",
    "owner_team",
    "description",
    "links",
    "labels",
    "dependencies",
    "reason",
)


def parse_dependencies(text: str) -> list[str]:
    """One service per line: ``name`` (same namespace) or ``namespace/name``."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _values_from_form(form: FormData) -> dict[str, str]:
    """What the user typed, echoed back into the form when it is shown again."""
    return {name: _text(form, name) for name in (*SERVICE_FIELDS, "revision")}


def _values_from_service(service: Service) -> dict[str, str]:
    return {
        "namespace": service.namespace,
        "name": service.name,
        "owner_team": service.owner_team,
        "description": service.description,
        "links": format_links(service.links),
        "labels": format_labels(service.labels),
        "dependencies": "\n".join(service.dependencies),
        "reason": "",
        "revision": str(service.revision),
    }


def _parse_service_form(
    values: dict[str, str], *, create: bool
) -> tuple[ServiceCreate | ServiceUpdate | None, dict[str, str]]:
    links, links_error = parse_links(values["links"])
    labels, labels_error = parse_labels(values["labels"])
    data: dict[str, Any] = {
        "owner_team": values["owner_team"],
        "description": values["description"],
        "links": links,
        "labels": labels,
        "dependencies": parse_dependencies(values["dependencies"]),
    }
    if create:
        data["namespace"] = values["namespace"].strip() or "default"
        data["name"] = values["name"].strip()
    else:
        data["revision"] = values["revision"] or "0"
    errors: dict[str, str] = {}
    schema: ServiceCreate | ServiceUpdate | None = None
    try:
        schema = (
            ServiceCreate.model_validate(data) if create else ServiceUpdate.model_validate(data)
        )
    except ValidationError as exc:
        errors = field_errors(exc)
    if "revision" in errors:  # a hidden field: only a damaged or hand-made form gets it wrong
        del errors["revision"]
        errors["__all__"] = "This form is out of date or damaged. Reload the page and try again."
    reason_problem = text_problem(values.get("reason", ""))
    if reason_problem:
        errors["reason"] = reason_problem
    # A syntax error in a textarea hides whatever pydantic said about its partial parse.
    for name, message in (("links", links_error), ("labels", labels_error)):
        if message:
            errors[name] = message
    return (None if errors else schema), errors


def _reason(values: dict[str, str]) -> str | None:
    return values.get("reason", "").strip()[:500] or None


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/services", status_code=303)


@router.get("/services")
def list_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    q: Annotated[str, Query(max_length=200)] = "",
    namespace: Annotated[str, Query(max_length=63)] = "",
    team: Annotated[str, Query(max_length=63)] = "",
    page: PageNumber = 1,
) -> Response:
    results = catalog.list_services(
        session,
        q=q or None,
        namespace=namespace or None,
        team=team or None,
        page=page,
        page_size=PAGE_SIZE,
    )
    context = {
        "section": "services",
        "results": results,
        "filters": {"q": q, "namespace": namespace, "team": team},
        "filtered": bool(q or namespace or team),
        # Health and success rate over the last 5 minutes, one query for the whole page.
        "traffic": topology.health_by_service(
            session,
            [(s.namespace, s.name) for s in results.items],
            limits=topology.thresholds(settings),
        ),
    }
    if not is_htmx(request):
        # The filter selects are only on the full page; partials skip these two queries.
        context["namespaces"] = catalog.list_namespaces(session)
        context["teams"] = catalog.list_teams(session)
    response = render(request, "catalog/list.html", context, block_name="results")
    if is_htmx(request):
        # Overrides hx-push-url's address, which would carry every empty filter (?q=&team=).
        response.headers["HX-Push-Url"] = clean_url(request)
    return response


def _form_page(
    request: Request,
    session: Session,
    *,
    values: dict[str, str],
    errors: dict[str, str] | None = None,
    service: Service | None = None,
    stale: StaleRevisionError | None = None,
    status_code: int = 200,
) -> Response:
    context = {
        "section": "services",
        "values": values,
        "errors": errors or {},
        "service": service,
        "stale": stale,
        "teams": catalog.list_teams(session),
    }
    return render(request, "catalog/form.html", context, "form", status_code=status_code)


@router.get("/services/new")
def new_form(request: Request, session: SessionDep) -> Response:
    values = dict.fromkeys((*SERVICE_FIELDS, "revision"), "")
    values["namespace"] = "default"
    return _form_page(request, session, values=values)


@router.post("/services/new")
def create(request: Request, session: SessionDep, actor: ActorDep, form: FormDep) -> Response:
    values = _values_from_form(form)
    data, errors = _parse_service_form(values, create=True)
    if isinstance(data, ServiceCreate):
        try:
            service = catalog.create_service(session, actor, data=data, reason=_reason(values))
        except DomainError as exc:
            session.rollback()
            errors = {exc.field or "__all__": exc.message}
            return _form_page(
                request, session, values=values, errors=errors, status_code=exc.status_code
            )
        url = f"/services/{service.namespace}/{service.name}"
        return flash(redirect(request, url), f"Created {service.qualified_name}.")
    return _form_page(request, session, values=values, errors=errors, status_code=422)


@router.get("/services/{namespace}/{name}")
def detail(request: Request, session: SessionDep, namespace: str, name: str) -> Response:
    service = _get_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _detail_page(request, session, service)


def _detail_page(
    request: Request,
    session: Session,
    service: Service,
    *,
    blocks: list[str] | None = None,
    version_values: dict[str, str] | None = None,
    version_errors: dict[str, str] | None = None,
    alert: str | None = None,
    status_code: int = 200,
) -> Response:
    context = {
        "section": "services",
        "service": service,
        "service_url": f"/services/{service.namespace}/{service.name}",
        "changes": audit.recent_for_resource(
            session, "service", service.qualified_name, limit=RECENT_CHANGES
        ),
        "version_values": version_values or {"name": "", "labels": ""},
        "version_errors": version_errors or {},
        "alert": alert,
        "oob": blocks is not None and len(blocks) > 1,
    }
    return render(request, "catalog/detail.html", context, blocks, status_code=status_code)


@router.get("/services/{namespace}/{name}/edit")
def edit_form(request: Request, session: SessionDep, namespace: str, name: str) -> Response:
    service = _get_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _form_page(request, session, values=_values_from_service(service), service=service)


@router.post("/services/{namespace}/{name}/edit")
def update(
    request: Request,
    session: SessionDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    service = _get_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    values = _values_from_form(form)
    values["namespace"], values["name"] = service.namespace, service.name
    data, errors = _parse_service_form(values, create=False)
    if isinstance(data, ServiceUpdate):
        try:
            catalog.update_service(
                session, actor, namespace=namespace, name=name, data=data, reason=_reason(values)
            )
        except StaleRevisionError as exc:
            session.rollback()
            return _form_page(
                request, session, values=values, service=service, stale=exc, status_code=409
            )
        except DomainError as exc:
            session.rollback()
            errors = {exc.field or "__all__": exc.message}
            return _form_page(
                request,
                session,
                values=values,
                errors=errors,
                service=service,
                status_code=exc.status_code,
            )
        url = f"/services/{namespace}/{name}"
        return flash(redirect(request, url), f"Saved {namespace}/{name}.")
    return _form_page(
        request, session, values=values, errors=errors, service=service, status_code=422
    )


@router.post("/services/{namespace}/{name}/delete")
def delete(
    request: Request,
    session: SessionDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    raw_revision = _text(form, "revision")
    revision = int(raw_revision) if raw_revision.isdigit() else None
    reason = _text(form, "reason").strip()[:500]
    if text_problem(reason):
        service = _get_or_404(request, session, namespace, name)
        if isinstance(service, Response):
            return service
        alert = f"Not deleted: the reason {text_problem(reason)}."
        return _detail_page(
            request, session, service, blocks=["alerts"], alert=alert, status_code=422
        )
    try:
        catalog.delete_service(
            session,
            actor,
            namespace=namespace,
            name=name,
            revision=revision,
            reason=reason or None,
        )
    except NotFoundError:
        session.rollback()
        return _not_found(request, namespace, name)
    except ConflictError as exc:
        session.rollback()
        service = catalog.get_service(session, namespace, name)
        message = (
            "Not deleted: someone else changed this service since you opened it. "
            "Review the changes below, then delete again."
            if isinstance(exc, StaleRevisionError)
            else f"Not deleted: {exc.message}"
        )
        return _detail_page(
            request, session, service, blocks=["alerts"], alert=message, status_code=409
        )
    return flash(redirect(request, "/services"), f"Deleted {namespace}/{name}.")


@router.post("/services/{namespace}/{name}/versions")
def add_version(
    request: Request,
    session: SessionDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    values = {"name": _text(form, "name").strip(), "labels": _text(form, "labels")}
    labels, labels_error = parse_labels(values["labels"])
    errors: dict[str, str] = {}
    status_code = 422
    try:
        data = VersionCreate.model_validate({"name": values["name"], "labels": labels})
    except ValidationError as exc:
        errors = field_errors(exc)
    if labels_error:
        errors["labels"] = labels_error
    if not errors:
        try:
            version = catalog.create_version(
                session, actor, namespace=namespace, name=name, data=data
            )
        except NotFoundError:
            session.rollback()
            return _not_found(request, namespace, name)
        except DomainError as exc:
            session.rollback()
            errors, status_code = {exc.field or "name": exc.message}, exc.status_code
        else:
            url = f"/services/{namespace}/{name}"
            if not is_htmx(request):
                return flash(redirect(request, url), f"Added version {version.name}.")
            # Stay on the page: fresh versions list, and the new audit entry out of band.
            session.flush()
            session.expire_all()
            fresh = catalog.get_service(session, namespace, name)
            response = _detail_page(request, session, fresh, blocks=["versions", "changes"])
            return toast(response, f"Added version {version.name} to {namespace}/{name}.")
    service = _get_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _detail_page(
        request,
        session,
        service,
        blocks=["versions"],
        version_values=values,
        version_errors=errors,
        status_code=status_code,
    )


# ---------------------------------------------------------------------------------------------


def _not_found(request: Request, namespace: str, name: str) -> Response:
    context = {
        "section": "services",
        "title": "Service not found",
        "message": f"There is no service {namespace}/{name}. It may have been deleted.",
    }
    return render(request, "error.html", context, status_code=404)


def _get_or_404(
    request: Request, session: Session, namespace: str, name: str
) -> Service | Response:
    try:
        return catalog.get_service(session, namespace, name)
    except NotFoundError:
        return _not_found(request, namespace, name)
