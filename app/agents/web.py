"""The Agents page (like ``istioctl proxy-status``): every agent, its sync state, live."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.agents import service
from app.agents.api import HubDep
from app.agents.status import SyncState
from app.web import clean_url, is_htmx, render, require_same_origin

router = APIRouter(dependencies=[Depends(require_same_origin)])

FILTER_FORM_ID = "agent-filters"
Filter = Annotated[str, Query(max_length=63)]


@router.get("/agents")
def agents_page(
    request: Request,
    hub: HubDep,
    namespace: Filter = "",
    service_name: Annotated[str, Query(alias="service", max_length=63)] = "",
    state: Filter = "",
) -> Response:
    # An unknown state (a hand-edited URL) shows every state rather than an error page.
    sync_state = SyncState(state) if state in SyncState.__members__ else None
    items, counts = service.list_agents(
        hub, namespace=namespace or None, service=service_name or None, state=sync_state
    )
    context = {
        "section": "agents",
        "items": items,
        "counts": {k: v for k, v in counts.items() if v},
        "total": sum(counts.values()),
        "filters": {
            "namespace": namespace,
            "service": service_name,
            "state": sync_state.value if sync_state else "",
        },
        "filtered": bool(namespace or service_name or sync_state),
        "states": [s.value for s in SyncState],
        "self_url": clean_url(request),
    }
    if not is_htmx(request):
        known = hub.status.all()
        context["namespaces"] = sorted({a.namespace for a in known})
        context["services"] = sorted({a.service for a in known})
    response = render(request, "agents/list.html", context, block_name="results")
    # The filter form's requests move the address bar; the 2 s refresh of the table must not
    # (it would add a history entry every time).
    if is_htmx(request) and request.headers.get("hx-trigger") == FILTER_FORM_ID:
        response.headers["HX-Push-Url"] = clean_url(request)
    return response
