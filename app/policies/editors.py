"""Console pages of the YAML editors: a service's traffic policy and the mesh-wide defaults
(preview, save, revisions, revert), sharing one template. The traffic section of a service's
page is in ``app/policies/web.py``, whose form and page helpers these use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import yaml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from app.agents.api import HubDep, change_read
from app.agents.hub import PushHub
from app.catalog.models import Service
from app.deps import ActorDep, SessionDep
from app.errors import DomainError, InvalidError, StaleRevisionError
from app.identity.auth import current_principal
from app.identity.principal import Action, Principal, can
from app.pagination import Page
from app.policies import service as policies
from app.policies.api import effective_config
from app.policies.models import MeshDefaultsRevision, TrafficPolicyRevision
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
R = TypeVar("R")


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
# One editor, two specs: a service's traffic policy and the mesh-wide defaults


@dataclass(frozen=True, slots=True)
class YamlEditor(Generic[M, R]):
    """A YAML editor (page, preview, save, revert, one revision) over a spec ``M`` whose
    revisions are rows ``R``; built per request around what differs between the two editors."""

    session: Session
    service: Service | None  # None for the mesh-wide defaults
    kind: str
    section: str
    title: str
    base_url: str
    spec_model: type[M]
    current: Callable[[], tuple[M, int]]  # the spec in force and its revision (0: none yet)
    as_dict: Callable[[M], dict[str, Any]]  # what the YAML of a spec shows
    validate: Callable[[M], None]  # raises InvalidError; the preview shows what a save refuses
    extras: Callable[[M], dict[str, Any]]  # what else the page shows of the spec in force
    revisions: Callable[[int, int], Page[R]]  # (page, page_size), newest first
    revision_dict: Callable[[R], dict[str, Any]]
    changes_of: tuple[str, str]  # (namespace, name) its changes are recorded under
    write: Callable[[Principal, M, int, str | None], str]  # saves; returns the flash message
    revert: Callable[[Principal, RevertRequest, str | None], str]  # likewise
    no_revision: Callable[[int], str]  # the 404 text
    revision_title: Callable[[int], str]
    blank_yaml: str = "{}\n"  # what the editor holds when the spec in force dumps to {}

    def context(self, hub: PushHub, text: str | None = None) -> dict[str, Any]:
        spec, revision = self.current()
        current = self.as_dict(spec)
        current_yaml = to_yaml(current) if current else self.blank_yaml
        changes = policies.recent_changes(self.session, *self.changes_of, limit=1)
        return {
            "section": self.section,
            "service": self.service,
            "kind": self.kind,
            "title": self.title,
            "base_url": self.base_url,
            "revision": revision,
            "current_yaml": current_yaml,
            "text": text if text is not None else current_yaml,
            "revisions": self.revisions(1, REVISIONS_PAGE),
            "progress": progress_view(change_read(changes[0], hub), hub) if changes else None,
            **self.extras(spec),
        }

    def respond(
        self, request: Request, context: dict[str, Any], block: str | None = None, status: int = 200
    ) -> Response:
        principal = current_principal(request)
        if self.service is not None:
            may_change = can(principal, Action.CHANGE_SERVICE, team=self.service.owner_team)
        else:
            may_change = can(principal, Action.CHANGE_MESH)
        base: dict[str, Any] = {
            "errors": [],
            "stale": None,
            "diff": None,
            "previewed": False,
            "alert": None,
        }
        context = {**base, "may_change": may_change, **context}
        return render(request, "policies/editor.html", context, block, status_code=status)

    def page(self, request: Request, hub: PushHub) -> Response:
        return self.respond(request, self.context(hub))

    def preview(self, request: Request, hub: PushHub, form: FormData) -> Response:
        """Validate and diff against the revision in force; stores nothing."""
        text = _text(form, "spec", MAX_YAML_CHARS + 1)
        context = self.context(hub, text)
        spec, issues = parse_yaml_spec(text, self.spec_model)
        if spec is not None:
            try:
                self.validate(spec)
            except InvalidError as exc:
                spec, issues = None, exc.issues
        context["previewed"] = True
        context["errors"] = issues
        if spec is not None:
            context["diff"] = yaml_diff(context["current_yaml"], to_yaml(self.as_dict(spec)))
        return self.respond(request, context, "preview", 422 if issues else 200)

    def save(self, request: Request, hub: PushHub, actor: Principal, form: FormData) -> Response:
        text = _text(form, "spec", MAX_YAML_CHARS + 1)
        spec, issues = parse_yaml_spec(text, self.spec_model)
        if spec is not None:
            try:
                message = self.write(actor, spec, _int(form, "revision") or 0, _reason(form))
            except StaleRevisionError as exc:
                self.session.rollback()
                context = self.context(hub, text)
                context["stale"] = exc
                return self.respond(request, context, "editor", 409)
            except InvalidError as exc:
                self.session.rollback()
                issues = exc.issues
            else:
                return flash(redirect(request, self.base_url), message)
        context = self.context(hub, text)
        context["errors"] = issues
        return self.respond(request, context, "editor", 422)

    def revert_to(
        self, request: Request, hub: PushHub, actor: Principal, form: FormData
    ) -> Response:
        to, revision = _int(form, "to"), _int(form, "revision")
        try:
            if to is None or revision is None:
                raise DomainError("this form is damaged: reload the page and try again")
            message = self.revert(actor, RevertRequest(revision=revision, to=to), _reason(form))
        except DomainError as exc:
            self.session.rollback()
            context = self.context(hub)
            if isinstance(exc, StaleRevisionError):
                context["stale"] = exc
            else:
                context["alert"] = f"Not reverted: {exc.message}"
            return self.respond(request, context, "editor", exc.status_code)
        return flash(redirect(request, self.base_url), message)

    def revision(self, request: Request, number: int) -> Response:
        row = self._revision_at(number)
        if row is None:
            return Response(self.no_revision(number), status_code=404)
        before = self._revision_at(number - 1) if number > 1 else None
        before_yaml = to_yaml(self.revision_dict(before)) if before is not None else ""
        text = to_yaml(self.revision_dict(row))
        page = {
            "row": row,
            "diff": yaml_diff(before_yaml, text),
            "text": text,
            "section": self.section,
            "service": self.service,
            "title": self.revision_title(number),
            "base_url": self.base_url,
        }
        return render(request, "policies/revision.html", page)

    def _revision_at(self, number: int) -> R | None:
        """Revisions are numbered 1..N without gaps and listed newest first, so revision
        ``number`` is alone on page N - number + 1 of a one-per-page listing."""
        total = self.revisions(1, 1).total
        if not 1 <= number <= total:
            return None
        items = self.revisions(total - number + 1, 1).items
        return items[0] if items else None


# ---------------------------------------------------------------------------------------------
# A service's traffic policy


def _traffic_editor(
    session: Session, service: Service
) -> YamlEditor[TrafficPolicySpec, TrafficPolicyRevision]:
    namespace, name = service.namespace, service.name

    def current() -> tuple[TrafficPolicySpec, int]:
        row = policies.current_policy(session, service)
        return policies.spec_of(row), row.revision if row else 0

    def effective(spec: TrafficPolicySpec) -> dict[str, Any]:
        try:
            found = effective_config(session, service, spec)
        except ValidationError as exc:
            # A catalog entry the agents' models refuse (e.g. an instance at port 0) must not
            # take the editor down with it: say so where the effective config would be.
            problems = "; ".join(str(e["msg"]) for e in exc.errors(include_url=False))
            found = {"config": None, "warnings": [f"cannot compile this service: {problems}"]}
        return {
            "service_url": _service_url(service),
            "effective_yaml": to_yaml(without_nulls(found["config"])) if found["config"] else None,
            "warnings": found["warnings"],
        }

    def write(actor: Principal, spec: TrafficPolicySpec, revision: int, reason: str | None) -> str:
        row, change = policies.put_policy(
            session,
            actor,
            namespace=namespace,
            name=name,
            data=TrafficPolicyWrite(revision=revision, spec=spec),
            reason=reason,
        )
        if change is None:
            return "Nothing changed: the policy is already exactly this."
        return f"Saved revision {row.revision} of {namespace}/{name}; pushing to agents."

    def revert(actor: Principal, data: RevertRequest, reason: str | None) -> str:
        row, _ = policies.revert_policy(
            session, actor, namespace=namespace, name=name, data=data, reason=reason
        )
        return f"Reverted to revision {data.to}: saved as revision {row.revision}."

    return YamlEditor(
        session=session,
        service=service,
        kind="traffic",
        section="services",
        title=f"Traffic policy of {name}",
        base_url=f"{_service_url(service)}/traffic",
        spec_model=TrafficPolicySpec,
        current=current,
        as_dict=policies.spec_dict,
        validate=lambda spec: policies.validate_policy(session, service, spec),
        extras=effective,
        revisions=lambda page, size: policies.list_revisions(
            session, namespace, name, page=page, page_size=size
        ),
        revision_dict=lambda row: policies.spec_dict(policies.spec_of(row)),
        changes_of=(namespace, name),
        write=write,
        revert=revert,
        no_revision=lambda number: f"{namespace}/{name} has no revision {number}",
        revision_title=lambda number: f"Revision {number} of {name}'s traffic policy",
        blank_yaml="routes: []\n",
    )


@router.get("/services/{namespace}/{name}/traffic")
def traffic_editor(
    request: Request, session: SessionDep, hub: HubDep, namespace: str, name: str
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _traffic_editor(session, service).page(request, hub)


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
    return _traffic_editor(session, service).preview(request, hub, form)


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
    return _traffic_editor(session, service).save(request, hub, actor, form)


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
    return _traffic_editor(session, service).revert_to(request, hub, actor, form)


@router.get("/services/{namespace}/{name}/traffic/revisions/{number}")
def traffic_revision(
    request: Request, session: SessionDep, namespace: str, name: str, number: int
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _traffic_editor(session, service).revision(request, number)


# ---------------------------------------------------------------------------------------------
# Mesh-wide defaults


def _defaults_editor(session: Session) -> YamlEditor[MeshDefaultsSpec, MeshDefaultsRevision]:
    def current() -> tuple[MeshDefaultsSpec, int]:
        spec, row = policies.current_defaults(session)
        return spec, row.revision if row else 0

    def write(actor: Principal, spec: MeshDefaultsSpec, revision: int, reason: str | None) -> str:
        data = MeshDefaultsWrite(revision=revision, spec=spec)
        row = policies.put_defaults(session, actor, data=data, reason=reason)
        return f"Saved mesh defaults revision {row.revision}; every service inherits them."

    def revert(actor: Principal, data: RevertRequest, reason: str | None) -> str:
        row = policies.revert_defaults(session, actor, data=data, reason=reason)
        return (
            f"Reverted the mesh defaults to revision {data.to}: saved as revision {row.revision}."
        )

    return YamlEditor(
        session=session,
        service=None,
        kind="defaults",
        section="defaults",
        title="Mesh defaults",
        base_url="/mesh/defaults",
        spec_model=MeshDefaultsSpec,
        current=current,
        as_dict=lambda spec: spec.model_dump(mode="json"),
        validate=lambda spec: None,
        extras=lambda spec: {"effective_yaml": None, "warnings": []},
        revisions=lambda page, size: policies.list_defaults_revisions(
            session, page=page, page_size=size
        ),
        revision_dict=lambda row: dict(row.spec),
        # Mesh-wide changes are recorded without a service.
        changes_of=("", ""),
        write=write,
        revert=revert,
        no_revision=lambda number: f"the mesh defaults have no revision {number}",
        revision_title=lambda number: f"Mesh defaults revision {number}",
    )


@router.get("/mesh/defaults")
def defaults_editor(request: Request, session: SessionDep, hub: HubDep) -> Response:
    return _defaults_editor(session).page(request, hub)


@router.post("/mesh/defaults/preview")
def defaults_preview(request: Request, session: SessionDep, hub: HubDep, form: FormDep) -> Response:
    return _defaults_editor(session).preview(request, hub, form)


@router.post("/mesh/defaults")
def defaults_save(
    request: Request, session: SessionDep, hub: HubDep, actor: ActorDep, form: FormDep
) -> Response:
    return _defaults_editor(session).save(request, hub, actor, form)


@router.post("/mesh/defaults/revert")
def defaults_revert(
    request: Request, session: SessionDep, hub: HubDep, actor: ActorDep, form: FormDep
) -> Response:
    return _defaults_editor(session).revert_to(request, hub, actor, form)


@router.get("/mesh/defaults/changes/{change_id}")
def defaults_change_progress(
    request: Request, session: SessionDep, hub: HubDep, change_id: int
) -> Response:
    return _progress_fragment(request, session, hub, change_id, "", "", "/mesh/defaults/changes")


@router.get("/mesh/defaults/revisions/{number}")
def defaults_revision(request: Request, session: SessionDep, number: int) -> Response:
    return _defaults_editor(session).revision(request, number)
