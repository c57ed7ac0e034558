"""HTML routes of the audit log: the filtered event list and the chain-verification badge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.audit import service as audit
from app.audit.trust import AuditTrustDep
from app.deps import SessionDep
from app.pagination import PageNumber
from app.web import clean_url, fragment, is_htmx, render, require_csrf_token

# Read-only today; the guard is here so that a form added later is covered from the start.
router = APIRouter(dependencies=[Depends(require_csrf_token)])

PAGE_SIZE = 50
# Offered in the filter; a kind typed into the URL by hand still filters.


def parse_utc(value: str) -> datetime | None:
    """A ``datetime-local`` value (or any ISO 8601 text) read as UTC; None when empty.

    Raises ValueError for text that is not a date.
    """
    value = value.strip()
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@router.get("/audit")
def events_page(
    request: Request,
    session: SessionDep,
    resource_kind: Annotated[str, Query(max_length=63)] = "",
    resource_name: Annotated[str, Query(max_length=255)] = "",
    actor: Annotated[str, Query(max_length=255)] = "",
    since: Annotated[str, Query(max_length=40)] = "",
    until: Annotated[str, Query(max_length=40)] = "",
    page: PageNumber = 1,
) -> Response:
    errors: dict[str, str] = {}
    bounds: dict[str, datetime | None] = {}
    for name, raw in (("since", since), ("until", until)):
        try:
            bounds[name] = parse_utc(raw)
        except ValueError:
            bounds[name] = None
            errors[name] = "not a date and time; use YYYY-MM-DD HH:MM (UTC)"
    events = audit.list_events(
        session,
        resource_kind=resource_kind or None,
        resource_name=resource_name.strip() or None,
        # People filter by a service and expect its versions and instances too.
        include_children=True,
        actor=actor or None,
        since=bounds["since"],
        until=bounds["until"],
        page=page,
        page_size=PAGE_SIZE,
    )
    filters = {
        "resource_kind": resource_kind,
        "resource_name": resource_name,
        "actor": actor,
        "since": since,
        "until": until,
    }
    context = {
        "section": "audit",
        "events": events,
        "filters": filters,
        "filtered": any(filters.values()),
        "errors": errors,
        "kinds": sorted({*audit.list_resource_kinds(session), resource_kind} - {""}),
    }
    if not is_htmx(request):
        context["actors"] = audit.list_actors(session)
    response = render(request, "audit/list.html", context, block_name="events")
    if is_htmx(request):
        response.headers["HX-Push-Url"] = clean_url(request)
    return response


@router.get("/audit/verify")
def verify_badge(request: Request, session: SessionDep, trust: AuditTrustDep) -> Response:
    """Loaded lazily by the page. Reads only the events added since the last view (see
    ``VerifiedPrefix``), against the signed checkpoints."""
    result = trust.verify(session, incremental=True)
    return fragment(request, "audit/list.html", "verify", {"verification": result})
