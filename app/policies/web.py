"""Console pages of traffic policies, the traffic section of a service's page: the canary
control, the traffic panel, the timeline and a change's progress. The YAML editors (a service's
policy and the mesh-wide defaults) are in ``app/policies/editors.py`` and use the helpers here.

Thin like every ``web.py``: parse the form, call ``app.policies.service``, render named blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from app.agents.api import HubDep, change_read
from app.agents.hub import PushHub
from app.agents.models import ConfigChange
from app.catalog import service as catalog
from app.catalog.models import Service
from app.deps import ActorDep, SessionDep
from app.errors import InvalidError, NotFoundError, StaleRevisionError
from app.policies import service as policies
from app.policies.schemas import ChangeRead, WeightsWrite
from app.web import FormDep, fragment, hx_trigger, render, require_same_origin, toast

router = APIRouter(dependencies=[Depends(require_same_origin)])

PRESETS = (0, 1, 5, 10, 25, 50, 100)
TIMELINE_LENGTH = 20
# Fired when a change settles, so the timeline re-reads its final state.
CHANGED_EVENT = "traffic-changed"


def _text(form: FormData, name: str, limit: int = 1000) -> str:
    value = form.get(name, "")
    return value[:limit] if isinstance(value, str) else ""


def _int(form: FormData, name: str) -> int | None:
    raw = _text(form, name, 12).strip()
    return int(raw) if raw.isdigit() else None


def _reason(form: FormData) -> str | None:
    return _text(form, "reason").strip() or None


# ---------------------------------------------------------------------------------------------
# Changes and their progress


@dataclass(frozen=True, slots=True)
class Rejection:
    agent_id: str
    where: str
    error: str


def progress_view(change: ChangeRead, hub: PushHub) -> dict[str, Any]:
    """What the progress line says; NACKs name the agent (and where it runs) with its error."""
    rejections = []
    for item in change.errors:
        agent_id = str(item.get("agent_id", "?"))
        state = hub.status.get(agent_id)
        where = f"{state.service} {state.version} at {state.address}" if state else ""
        rejections.append(Rejection(agent_id, where, str(item.get("error", ""))))
    answered = change.synced + change.nacked
    return {
        "change": change,
        "rejections": rejections,
        "silent": max(0, change.targeted - answered) if change.state == "partial" else 0,
    }


# ---------------------------------------------------------------------------------------------
# The traffic section of a service page


def _service_url(service: Service) -> str:
    return f"/services/{service.namespace}/{service.name}"


def _versions_by_age(service: Service) -> list[str]:
    return [v.name for v in sorted(service.versions, key=lambda v: (v.created_at, v.id))]


def _baseline(by_age: list[str], candidate: str) -> str | None:
    return next((v for v in by_age if v != candidate), None)


def _traffic_context(
    session: Session,
    hub: PushHub,
    service: Service,
    *,
    candidate: str | None = None,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    stale: StaleRevisionError | None = None,
    change: ConfigChange | None = None,
) -> dict[str, Any]:
    row = policies.current_policy(session, service)
    spec = policies.spec_of(row)
    by_age = _versions_by_age(service)
    if candidate not in by_age:
        candidate = by_age[-1] if by_age else None
    baseline = _baseline(by_age, candidate) if candidate else None
    weights = policies.default_weights(spec)
    split = [(v, weights.get(v, 0)) for v in by_age] if weights else []
    changes = [
        change_read(c, hub)
        for c in policies.recent_changes(
            session, service.namespace, service.name, limit=TIMELINE_LENGTH
        )
    ]
    # The progress line follows the change just made, else the newest one still moving.
    latest = change_read(change, hub) if change is not None else None
    if latest is None and changes and changes[0].state == "pending":
        latest = changes[0]
    share = weights.get(candidate, 0) if candidate else 0
    return {
        "service": service,
        "service_url": _service_url(service),
        "changes_url": f"{_service_url(service)}/traffic/changes",
        "revision": row.revision if row else 0,
        "versions": by_age,
        "candidate": candidate,
        "baseline": baseline,
        "split": split,
        "instances": {v: sum(1 for i in service.instances if i.version == v) for v in by_age},
        "presets": PRESETS,
        "values": values or {"share": str(share), "reason": ""},
        "errors": errors or {},
        "stale": stale,
        "progress": progress_view(latest, hub) if latest else None,
        "changes": [progress_view(c, hub) for c in changes],
    }


def _traffic_panel(
    request: Request,
    session: Session,
    hub: PushHub,
    service: Service,
    *,
    status_code: int = 200,
    **kwargs: Any,
) -> Response:
    context = _traffic_context(session, hub, service, **kwargs)
    return render(request, "policies/traffic.html", context, "panel", status_code=status_code)


def _service_or_404(
    request: Request, session: Session, namespace: str, name: str
) -> Service | Response:
    try:
        return catalog.get_service(session, namespace, name)
    except NotFoundError:
        context = {
            "section": "services",
            "title": "Service not found",
            "message": f"There is no service {namespace}/{name}. It may have been deleted.",
        }
        return render(request, "error.html", context, status_code=404)


@router.get("/services/{namespace}/{name}/traffic/panel")
def traffic_panel(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    namespace: str,
    name: str,
    candidate: str | None = Query(None, max_length=63),
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    return _traffic_panel(request, session, hub, service, candidate=candidate)


SHARE_FOR_ACTION = {"promote": 100, "rollback": 0}


@router.post("/services/{namespace}/{name}/traffic/weights")
def apply_weights(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    actor: ActorDep,
    form: FormDep,
    namespace: str,
    name: str,
) -> Response:
    """Apply (the slider's share), Promote (100 % to the candidate) or Roll back (0 %)."""
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    candidate = _text(form, "candidate", 63)
    action = _text(form, "action", 16)
    values = {"share": _text(form, "share", 12), "reason": _text(form, "reason")}
    share = SHARE_FOR_ACTION.get(action, _int(form, "share"))
    errors: dict[str, str] = {}
    if share is None or not 0 <= share <= 100:
        errors["share"] = "the canary share is a whole number from 0 to 100"
    by_age = _versions_by_age(service)
    baseline = _baseline(by_age, candidate)
    if candidate not in by_age:
        errors["candidate"] = f"{namespace}/{name} has no version {candidate!r}"
    elif baseline is None:
        errors["candidate"] = "a canary needs a second version to take the rest of the traffic"
    if not errors and share is not None and baseline is not None:
        weights = {baseline: 100 - share, candidate: share}
        try:
            _, change = policies.set_weights(
                session,
                actor,
                namespace=namespace,
                name=name,
                data=WeightsWrite(weights=weights, revision=_int(form, "revision")),
                reason=_reason(form),
            )
        except StaleRevisionError as exc:
            session.rollback()
            return _traffic_panel(
                request, session, hub, service, candidate=candidate, stale=exc, status_code=409
            )
        except InvalidError as exc:
            session.rollback()
            errors = {"share": "; ".join(message for _, message in exc.issues)}
        else:
            if change is None:
                values["reason"] = ""
                response = _traffic_panel(
                    request, session, hub, service, candidate=candidate, values=values
                )
                return toast(response, "Nothing changed: that split is already in force.", "info")
            response = _traffic_panel(
                request, session, hub, service, candidate=candidate, change=change
            )
            return toast(response, f"Applied: {change.summary}.")
    response = _traffic_panel(
        request,
        session,
        hub,
        service,
        candidate=candidate,
        values=values,
        errors=errors,
        status_code=422,
    )
    return response


@router.get("/services/{namespace}/{name}/traffic/changes/{change_id}")
def change_progress(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    namespace: str,
    name: str,
    change_id: int,
) -> Response:
    """The progress line, polled every 300 ms while the change is pending. Once it settles the
    answer carries no poll trigger (so polling stops) and tells the timeline to refresh."""
    return _progress_fragment(
        request,
        session,
        hub,
        change_id,
        namespace,
        name,
        f"/services/{namespace}/{name}/traffic/changes",
    )


def _progress_fragment(
    request: Request,
    session: Session,
    hub: PushHub,
    change_id: int,
    namespace: str,
    name: str,
    changes_url: str,
) -> Response:
    row = session.get(ConfigChange, change_id)
    if row is None or (row.namespace, row.service) != (namespace, name):
        return Response("no such change", status_code=404)
    view = progress_view(change_read(row, hub), hub)
    context = {"progress": view, "changes_url": changes_url}
    response = fragment(request, "policies/traffic.html", "progress", context)
    if view["change"].state != "pending":
        hx_trigger(response, CHANGED_EVENT)
    return response


@router.get("/services/{namespace}/{name}/traffic/timeline")
def timeline(
    request: Request, session: SessionDep, hub: HubDep, namespace: str, name: str
) -> Response:
    service = _service_or_404(request, session, namespace, name)
    if isinstance(service, Response):
        return service
    context = _traffic_context(session, hub, service)
    return fragment(request, "policies/traffic.html", "timeline", context)
