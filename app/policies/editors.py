"""Console pages of the YAML editors: a service's traffic policy and the mesh-wide defaults
(preview, save, revisions, revert), sharing one template. The traffic section of a service's
page is in ``app/policies/web.py``, whose form and page helpers these use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from app.agents.api import HubDep, change_read
from app.agents.hub import PushHub
from app.catalog.models import Service
from app.deps import ActorDep, SessionDep
from app.errors import DomainError, InvalidError, StaleRevisionError
from app.identity.auth import current_principal
from app.identity.principal import Action, can
from app.pagination import Page
from app.policies import service as policies
from app.policies.api import effective_config
from app.policies.schemas import (
    MeshDefaultsSpec,
    MeshDefaultsWrite,
    RevertRequest,
    TrafficPolicySpec,
    TrafficPolicyWrite,
)
from app.policies.web import (
    _int,
    _progress_fragment,
    _reason,
    _service_or_404,
    _service_url,
    _text,
    progress_view,
)
from app.web import FormDep, flash, redirect, render, require_same_origin

router = APIRouter(dependencies=[Depends(require_same_origin)])

MAX_YAML_CHARS = 100_000
MAX_FLOW_DEPTH = 32
REVISIONS_PAGE = 50

Issues = list[tuple[str, str]]
M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# YAML <-> spec


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def without_nulls(value: Any) -> Any:
    """Unset fields (null) left out, so the effective config reads as what is in force."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def field_path(loc: Sequence[str | int], prefix: str = "spec") -> str:
    """``("routes", 0, "backends")`` → ``spec.routes[0].backends``: the path users read."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _flow_depth(text: str) -> int:
    """How deep ``[``/``{`` nest (quotes ignored: an overestimate is harmless). PyYAML's
    scanner is quadratic in that depth, so a small deeply nested input would pin a CPU."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def parse_yaml_spec(text: str, model: type[M]) -> tuple[M | None, Issues]:
    """The spec typed in the editor, or every problem found, each with its field path."""
    if len(text) > MAX_YAML_CHARS:
        return None, [("spec", f"at most {MAX_YAML_CHARS:,} characters")]
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        return None, [("spec", "nested too deeply to be a policy")]
    try:
        # Aliases are refused before anything is built: a few lines of them can expand into
        # millions of nodes for the validator to walk ("billion laughs").
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = f"line {event.start_mark.line + 1}: " if event.start_mark else ""
                return None, [("spec", f"{line}YAML aliases (*name) are not supported")]
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [("spec", f"not valid YAML: {where}{problem}")]
    except RecursionError:
        return None, [("spec", "nested too deeply to be a policy")]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [("spec", "must be a mapping of fields (e.g. routes: …), not a list or value")]
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [
            (field_path(e["loc"]), str(e["msg"]).removeprefix("Value error, "))
            for e in exc.errors(include_url=False)
        ]


@dataclass(frozen=True, slots=True)
class DiffLine:
    kind: str  # add, del, context, hunk
    text: str

    @property
    def mark(self) -> str:
        return {"add": "+", "del": "-", "hunk": "@"}.get(self.kind, " ")


def yaml_diff(before: str, after: str) -> list[DiffLine]:
    """A unified diff of two YAML texts; each line carries a visible +/- mark, not just a colour."""
    lines: list[DiffLine] = []
    diff = difflib.unified_diff(
        before.splitlines(), after.splitlines(), "current", "proposed", lineterm="", n=3
    )
    for raw in list(diff)[2:]:  # skip the ---/+++ file header
        if raw.startswith("@@"):
            lines.append(DiffLine("hunk", raw))
        elif raw.startswith("+"):
            lines.append(DiffLine("add", raw[1:]))
        elif raw.startswith("-"):
            lines.append(DiffLine("del", raw[1:]))
        else:
            lines.append(DiffLine("context", raw[1:]))
    return lines


# ---------------------------------------------------------------------------------------------
# Editors: a service's traffic policy and the mesh-wide defaults share one template


def _editor_page(
    request: Request,
    context: dict[str, Any],
    *,
    block: str | None = None,
    status_code: int = 200,
) -> Response:
    base: dict[str, Any] = {
        "errors": [],
        "stale": None,
        "diff": None,
        "previewed": False,
        "alert": None,
    }
    principal = current_principal(request)
    service = context.get("service")
    if service is not None:
        base["may_change"] = can(principal, Action.CHANGE_SERVICE, team=service.owner_team)
    else:
        base["may_change"] = can(principal, Action.CHANGE_MESH)
    return render(
        request, "policies/editor.html", {**base, **context}, block, status_code=status_code
    )


def _traffic_editor_context(
    session: Session, hub: PushHub, service: Service, *, text: str | None = None
) -> dict[str, Any]:
    row = policies.current_policy(session, service)
    spec = policies.spec_of(row)
    current = policies.spec_dict(spec)
    revisions = policies.list_revisions(
        session, service.namespace, service.name, page_size=REVISIONS_PAGE
    )
    changes = policies.recent_changes(session, service.namespace, service.name, limit=1)
    latest = change_read(changes[0], hub) if changes else None
    try:
        effective = effective_config(session, service, spec)
    except ValidationError as exc:
        # A catalog entry the agents' models refuse (e.g. an instance at port 0) must not take
        # the editor down with it: say so where the effective config would be.
        problems = "; ".join(str(e["msg"]) for e in exc.errors(include_url=False))
        effective = {"config": None, "warnings": [f"cannot compile this service: {problems}"]}
    return {
        "section": "services",
        "service": service,
        "service_url": _service_url(service),
        "kind": "traffic",
        "title": f"Traffic policy of {service.name}",
        "base_url": f"{_service_url(service)}/traffic",
        "revision": row.revision if row else 0,
        "current_yaml": to_yaml(current) if current else "routes: []\n",
        "text": text if text is not None else (to_yaml(current) if current else "routes: []\n"),
        "revisions": revisions,
        "effective_yaml": to_yaml(without_nulls(effective["config"]))
        if effective["config"]
        else None,
        "warnings": effective["warnings"],
        "progress": progress_view(latest, hub) if latest else None,
    }


def _defaults_editor_context(
    session: Session, hub: PushHub, *, text: str | None = None
) -> dict[str, Any]:
    spec, row = policies.current_defaults(session)
    # Mesh-wide changes are recorded without a service.
    changes = policies.recent_changes(session, "", "", limit=1)
    current = to_yaml(spec.model_dump(mode="json"))
    return {
        "section": "defaults",
        "service": None,
        "kind": "defaults",
        "title": "Mesh defaults",
        "base_url": "/mesh/defaults",
        "revision": row.revision if row else 0,
        "current_yaml": current,
        "text": text if text is not None else current,
        "revisions": policies.list_defaults_revisions(session, page_size=REVISIONS_PAGE),
        "effective_yaml": None,
        "warnings": [],
        "progress": progress_view(change_read(changes[0], hub), hub) if changes else None,
    }


def _check_traffic(
    session: Session, service: Service, text: str
) -> tuple[TrafficPolicySpec | None, Issues]:
    spec, issues = parse_yaml_spec(text, TrafficPolicySpec)
    if spec is not None:
        try:
            policies.validate_policy(session, service, spec)
        except InvalidError as exc:
            return None, exc.issues
    return spec, issues


@router.get("/services/{namespace}/{name}/traffic")
def traffic_editor(
    request: Request, session: SessionDep, hub: HubDep, namespace: str, name: str
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _editor_page(request, _traffic_editor_context(session, hub, service))


@router.post("/services/{namespace}/{name}/traffic/preview")
def traffic_preview(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    """Validate and diff against the revision in force; stores nothing."""
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    text = _text(form, "spec", MAX_YAML_CHARS + 1)
    context = _traffic_editor_context(session, hub, service, text=text)
    spec, issues = _check_traffic(session, service, text)
    context["previewed"] = True
    context["errors"] = issues
    if spec is not None:
        context["diff"] = yaml_diff(context["current_yaml"], to_yaml(policies.spec_dict(spec)))
    return _editor_page(request, context, block="preview", status_code=422 if issues else 200)


@router.post("/services/{namespace}/{name}/traffic")
def traffic_save(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    text = _text(form, "spec", MAX_YAML_CHARS + 1)
    spec, issues = parse_yaml_spec(text, TrafficPolicySpec)
    if spec is not None:
        try:
            row, change = policies.put_policy(
                session,
                actor,
                namespace=namespace,
                name=name,
                data=TrafficPolicyWrite(revision=_int(form, "revision") or 0, spec=spec),
                reason=_reason(form),
            )
        except StaleRevisionError as exc:
            session.rollback()
            context = _traffic_editor_context(session, hub, service, text=text)
            context["stale"] = exc
            return _editor_page(request, context, block="editor", status_code=409)
        except InvalidError as exc:
            session.rollback()
            issues = exc.issues
        else:
            message = (
                f"Saved revision {row.revision} of {namespace}/{name}; pushing to agents."
                if change is not None
                else "Nothing changed: the policy is already exactly this."
            )
            return flash(redirect(request, f"{_service_url(service)}/traffic"), message)
    context = _traffic_editor_context(session, hub, service, text=text)
    context["errors"] = issues
    return _editor_page(request, context, block="editor", status_code=422)


@router.post("/services/{namespace}/{name}/traffic/revert")
def traffic_revert(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    to, revision = _int(form, "to"), _int(form, "revision")
    try:
        if to is None or revision is None:
            raise DomainError("this form is damaged: reload the page and try again")
        row, _ = policies.revert_policy(
            session,
            actor,
            namespace=namespace,
            name=name,
            data=RevertRequest(revision=revision, to=to),
            reason=_reason(form),
        )
    except DomainError as exc:
        session.rollback()
        context = _traffic_editor_context(session, hub, service)
        _revert_refused(context, exc)
        return _editor_page(request, context, block="editor", status_code=exc.status_code)
    return flash(
        redirect(request, f"{_service_url(service)}/traffic"),
        f"Reverted to revision {to}: saved as revision {row.revision}.",
    )


def _revert_refused(context: dict[str, Any], exc: DomainError) -> None:
    if isinstance(exc, StaleRevisionError):
        context["stale"] = exc
    else:
        context["alert"] = f"Not reverted: {exc.message}"


@router.get("/services/{namespace}/{name}/traffic/revisions/{number}")
def traffic_revision(
    request: Request, session: SessionDep, namespace: str, name: str, number: int
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service

    def lister(page: int) -> Page[Any]:
        return policies.list_revisions(session, namespace, name, page=page, page_size=1)

    page = _revision_context(lister, number, lambda r: policies.spec_dict(policies.spec_of(r)))
    if page is None:
        return Response(f"{namespace}/{name} has no revision {number}", status_code=404)
    page.update(
        section="services",
        service=service,
        title=f"Revision {number} of {service.name}'s traffic policy",
        base_url=f"{_service_url(service)}/traffic",
    )
    return render(request, "policies/revision.html", page)


def _revision_at(lister: Callable[[int], Page[Any]], number: int) -> Any | None:
    """Revisions are numbered 1..N without gaps and listed newest first, so revision ``number``
    is alone on page N - number + 1 of a one-per-page listing."""
    total = lister(1).total
    if not 1 <= number <= total:
        return None
    items = lister(total - number + 1).items
    return items[0] if items else None


def _revision_context(
    lister: Callable[[int], Page[Any]], number: int, as_dict: Callable[[Any], dict[str, Any]]
) -> dict[str, Any] | None:
    row = _revision_at(lister, number)
    if row is None:
        return None
    before = _revision_at(lister, number - 1) if number > 1 else None
    before_yaml = to_yaml(as_dict(before)) if before is not None else ""
    text = to_yaml(as_dict(row))
    return {"row": row, "diff": yaml_diff(before_yaml, text), "text": text}


# ---------------------------------------------------------------------------------------------
# Mesh-wide defaults


@router.get("/mesh/defaults")
def defaults_editor(request: Request, session: SessionDep, hub: HubDep) -> Response:
    return _editor_page(request, _defaults_editor_context(session, hub))


@router.post("/mesh/defaults/preview")
def defaults_preview(request: Request, session: SessionDep, hub: HubDep, form: FormDep) -> Response:
    text = _text(form, "spec", MAX_YAML_CHARS + 1)
    context = _defaults_editor_context(session, hub, text=text)
    spec, issues = parse_yaml_spec(text, MeshDefaultsSpec)
    context["previewed"] = True
    context["errors"] = issues
    if spec is not None:
        context["diff"] = yaml_diff(context["current_yaml"], to_yaml(spec.model_dump(mode="json")))
    return _editor_page(request, context, block="preview", status_code=422 if issues else 200)


@router.post("/mesh/defaults")
def defaults_save(
    request: Request, session: SessionDep, hub: HubDep, actor: ActorDep, form: FormDep
) -> Response:
    text = _text(form, "spec", MAX_YAML_CHARS + 1)
    spec, issues = parse_yaml_spec(text, MeshDefaultsSpec)
    if spec is not None:
        try:
            row = policies.put_defaults(
                session,
                actor,
                data=MeshDefaultsWrite(revision=_int(form, "revision") or 0, spec=spec),
                reason=_reason(form),
            )
        except StaleRevisionError as exc:
            session.rollback()
            context = _defaults_editor_context(session, hub, text=text)
            context["stale"] = exc
            return _editor_page(request, context, block="editor", status_code=409)
        return flash(
            redirect(request, "/mesh/defaults"),
            f"Saved mesh defaults revision {row.revision}; every service inherits them.",
        )
    context = _defaults_editor_context(session, hub, text=text)
    context["errors"] = issues
    return _editor_page(request, context, block="editor", status_code=422)


@router.post("/mesh/defaults/revert")
def defaults_revert(
    request: Request, session: SessionDep, hub: HubDep, actor: ActorDep, form: FormDep
) -> Response:
    to, revision = _int(form, "to"), _int(form, "revision")
    try:
        if to is None or revision is None:
            raise DomainError("this form is damaged: reload the page and try again")
        row = policies.revert_defaults(
            session, actor, data=RevertRequest(revision=revision, to=to), reason=_reason(form)
        )
    except DomainError as exc:
        session.rollback()
        context = _defaults_editor_context(session, hub)
        _revert_refused(context, exc)
        return _editor_page(request, context, block="editor", status_code=exc.status_code)
    return flash(
        redirect(request, "/mesh/defaults"),
        f"Reverted the mesh defaults to revision {to}: saved as revision {row.revision}.",
    )


@router.get("/mesh/defaults/changes/{change_id}")
def defaults_change_progress(
    request: Request, session: SessionDep, hub: HubDep, change_id: int
) -> Response:
    return _progress_fragment(request, session, hub, change_id, "", "", "/mesh/defaults/changes")


@router.get("/mesh/defaults/revisions/{number}")
def defaults_revision(request: Request, session: SessionDep, number: int) -> Response:
    def lister(page: int) -> Page[Any]:
        return policies.list_defaults_revisions(session, page=page, page_size=1)

    page = _revision_context(lister, number, lambda r: dict(r.spec))
    if page is None:
        return Response(f"the mesh defaults have no revision {number}", status_code=404)
    page.update(
        section="defaults",
        service=None,
        title=f"Mesh defaults revision {number}",
        base_url="/mesh/defaults",
    )
    return render(request, "policies/revision.html", page)
