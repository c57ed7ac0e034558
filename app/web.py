"""HTML plumbing shared by every domain's ``web.py``: templates, htmx helpers, flashes, CSRF.

Pages are Jinja templates whose named blocks double as htmx partials: a request carrying
``HX-Request`` gets only the block the route names, a plain request gets the whole page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlencode

import jinja2
from fastapi import Depends, Request, status
from fastapi.responses import RedirectResponse, Response
from jinja2_fragments.fastapi import Jinja2Blocks
from pydantic import ValidationError
from starlette.datastructures import FormData

from app.config import REPO_ROOT
from app.csrf import csrf_token, require_csrf_token
from app.identity.auth import current_principal
from app.identity.principal import Action, Principal, can

__all__ = [
    "FLASH_COOKIE",
    "FieldChange",
    "FormDep",
    "clean_url",
    "field_errors",
    "flash",
    "fragment",
    "hx_redirect",
    "hx_trigger",
    "is_htmx",
    "json_diff",
    "redirect",
    "render",
    "require_csrf_token",
    "require_same_origin",
    "templates",
    "toast",
]

TEMPLATES_DIR = REPO_ROOT / "templates"
FLASH_COOKIE = "mesh_flash"

# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc(value: datetime | None) -> str:
    """``2024-05-01 12:03:04 UTC``: the audit log speaks one time zone."""
    if value is None:
        return "—"
    return _as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def isoformat(value: datetime | None) -> str:
    return "" if value is None else _as_utc(value).isoformat()


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """A coarse relative time (``3 min ago``) for glanceable columns such as *last seen*."""
    if value is None:
        return "never"
    seconds = int(((now or datetime.now(UTC)) - _as_utc(value)).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return "just now" if seconds < 5 else f"{seconds} s ago"


def compact_json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    old: Any
    new: Any
    kind: Literal["added", "removed", "changed", "unchanged"]


_MISSING: Any = object()
# Bookkeeping every write touches; listing it as a change would drown the real one.
_NOISE_FIELDS = frozenset({"id", "created_at", "updated_at"})


def _flatten(value: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in (value or {}).items():
        path = f"{prefix}{key}"
        if not prefix and key in _NOISE_FIELDS:
            continue
        if isinstance(item, Mapping) and item:
            flat.update(_flatten(item, f"{path}."))
        else:
            flat[path] = item
    return flat


def _is_blank(value: Any) -> bool:
    # A created or deleted resource's empty fields say nothing; listing them is noise.
    return value is None or value == "" or value == [] or value == {}


def json_diff(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[FieldChange]:
    """Field-by-field comparison of two audit snapshots; nested dicts become dotted paths."""
    old, new = _flatten(before), _flatten(after)
    changes: list[FieldChange] = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING:
            if not _is_blank(b):
                changes.append(FieldChange(key, None, b, "added"))
        elif b is _MISSING:
            if not _is_blank(a):
                changes.append(FieldChange(key, a, None, "removed"))
        elif a != b:
            changes.append(FieldChange(key, a, b, "changed"))
        else:
            changes.append(FieldChange(key, a, b, "unchanged"))
    return changes


def query_with(request: Request, **overrides: Any) -> str:
    """The current query string with some parameters replaced; empty values are dropped."""
    params: dict[str, Any] = dict(request.query_params)
    params.update(overrides)
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def clean_url(request: Request) -> str:
    """This request's path and query without empty parameters: what the address bar shows."""
    return request.url.path + query_with(request)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(utc=utc, isoformat=isoformat, ago=ago, compact_json=compact_json)
    env.globals.update(
        json_diff=json_diff,
        query_with=query_with,
        csrf_token=csrf_token,
        can=_can,
        Action=Action,
    )
    return env


@jinja2.pass_context
def _can(context: Any, action: str, team: str | None = None) -> bool:
    """``{% if can(Action.CHANGE_SERVICE, service.owner_team) %}``: hide what the server would
    refuse anyway (it checks again, in the service layer)."""
    principal: Principal | None = context.get("principal")
    return can(principal, action, team=team)


templates = Jinja2Blocks(env=_environment())
# Macros as a global so that blocks rendered on their own (htmx partials) can use them too:
# a top-level ``{% import %}`` in a page does not run when only one block is rendered.
templates.env.globals["ui"] = templates.env.get_template("_components/ui.html").make_module()


# ---------------------------------------------------------------------------------------------
# htmx
# ---------------------------------------------------------------------------------------------


def is_htmx(request: Request) -> bool:
    """True for requests made by htmx, except history restores, which need the whole page."""
    return (
        request.headers.get("hx-request") == "true"
        and request.headers.get("hx-history-restore-request") != "true"
    )


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    block_name: str | Sequence[str] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The named block(s) for htmx requests, the whole page otherwise.

    The flash message left by the previous redirect is shown (and cleared) on full pages only.
    """
    ctx: dict[str, Any] = {
        "htmx": is_htmx(request),
        "flash": None,
        "principal": current_principal(request),
        **(context or {}),
    }
    if ctx["htmx"] and block_name is not None:
        names = [block_name] if isinstance(block_name, str) else list(block_name)
        response = templates.TemplateResponse(
            request, template, ctx, status_code, headers, block_names=names
        )
        response.headers.setdefault("Vary", "HX-Request")
        return response
    raw_flash = request.cookies.get(FLASH_COOKIE)
    if raw_flash:
        ctx["flash"] = unquote(raw_flash)[:300]
    response = templates.TemplateResponse(request, template, ctx, status_code, headers)
    if raw_flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    # Pages and partials share a URL (hx-push-url); caches must keep them apart.
    response.headers.setdefault("Vary", "HX-Request")
    return response


def fragment(
    request: Request, template: str, block_name: str, context: dict[str, Any] | None = None
) -> Response:
    """One block, whoever asks: for URLs that only ever serve a piece of a page."""
    ctx: dict[str, Any] = {
        "htmx": is_htmx(request),
        "principal": current_principal(request),
        **(context or {}),
    }
    return templates.TemplateResponse(request, template, ctx, block_name=block_name)


def hx_redirect(url: str) -> Response:
    """Tell htmx to navigate the whole page (a 3xx would be followed inside the XHR)."""
    return Response(status_code=200, headers={"HX-Redirect": url})


def redirect(request: Request, url: str) -> Response:
    """POST-redirect-GET for both worlds: ``HX-Redirect`` for htmx, 303 for plain forms."""
    if is_htmx(request):
        return hx_redirect(url)
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def hx_trigger(response: Response, event: str, detail: Any = True) -> Response:
    """Add a client-side event to ``HX-Trigger``, keeping any already set."""
    current = response.headers.get("HX-Trigger")
    events: dict[str, Any] = json.loads(current) if current else {}
    events[event] = detail
    response.headers["HX-Trigger"] = json.dumps(events)
    return response


def toast(response: Response, message: str, level: str = "success") -> Response:
    """A toast shown by base.html's listener, for changes made without leaving the page."""
    return hx_trigger(response, "toast", {"message": message, "level": level})


def flash(response: Response, message: str) -> Response:
    """A one-shot message that survives the redirect and shows on the next full page."""
    response.set_cookie(
        FLASH_COOKIE, quote(message), max_age=60, path="/", httponly=True, samesite="lax"
    )
    return response


# ---------------------------------------------------------------------------------------------
# Forms
# ---------------------------------------------------------------------------------------------


async def _form_data(request: Request) -> FormData:
    return await request.form()


FormDep = Annotated[FormData, Depends(_form_data)]
"""The posted form, read up front so that routes can stay sync: their database calls then run
in the thread pool instead of blocking the event loop."""


def field_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic errors keyed by form field, first message per field, in plain words.

    List items are reported by line (``links.2.url`` → "line 3: …" on the links textarea, which
    holds one link per line).
    """
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = [part for part in error["loc"] if part not in ("body", "__root__")]
        name = str(loc[0]) if loc else "__all__"
        message = _friendly(error)
        if len(loc) > 1 and isinstance(loc[1], int):
            message = f"line {loc[1] + 1}: {message}"
        elif len(loc) > 1:
            message = f"{loc[1]}: {message}"
        errors.setdefault(name, message)
    return errors


def _friendly(error: Any) -> str:
    """Pydantic's wording, minus the parts that only make sense to programmers."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing" or (kind == "string_too_short" and ctx.get("min_length") == 1):
        return "required"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "url_parsing":
        return "not a valid URL (write it in full, e.g. https://example.com/runbook)"
    if kind == "string_pattern_mismatch":
        return "may contain only lower-case letters, digits, '-' and '.'"
    return str(error["msg"]).removeprefix("Value error, ")


# HTML routers depend on this. The Origin/Host checks themselves run for every route in
# ``app.middleware.RequestOriginMiddleware``; what HTML forms add is the CSRF token.
require_same_origin = require_csrf_token
