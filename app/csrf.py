"""CSRF tokens for the console's forms: a per-browser id in a cookie, and a token bound to it.

The token is an HMAC of the browser id under a key kept outside the database (see
``app.keys``). A site that can plant a cookie (a sibling sub-domain) still cannot produce a
matching token without the key, and a page on another site cannot read the token from ours.
Pages carry the token in a hidden ``csrf_token`` field of every form and in a
``<meta name="csrf-token">`` tag, from which ``static/app.js`` adds the ``X-CSRF-Token`` header
to every htmx request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from http.cookies import SimpleCookie
from typing import Any

import jinja2
from fastapi import HTTPException, Request, status
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware import SAFE_METHODS

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "CsrfCookieMiddleware",
    "CsrfTokens",
    "csrf_token",
    "require_csrf_token",
]

CSRF_COOKIE = "mesh_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
# A year: a token in a tab left open over a weekend must still work on Monday.
COOKIE_MAX_AGE = 365 * 24 * 3600
_BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_NEW_ID_STATE = "mesh_csrf_new_browser_id"


class CsrfTokens:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the CSRF key must be at least 32 bytes")
        self._key = key

    def token_for(self, browser_id: str) -> str:
        digest = hmac.new(self._key, b"mesh-csrf-v1:" + browser_id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def valid(self, browser_id: str | None, token: str | None) -> bool:
        if not browser_id or not token or not _BROWSER_ID.fullmatch(browser_id):
            return False
        return hmac.compare_digest(self.token_for(browser_id), token)


def _browser_id(request: Request) -> str:
    """This browser's id: from its cookie, or a new one the response will set."""
    current = request.cookies.get(CSRF_COOKIE)
    if current and _BROWSER_ID.fullmatch(current):
        return current
    state = request.scope.setdefault("state", {})
    if _NEW_ID_STATE not in state:
        state[_NEW_ID_STATE] = secrets.token_urlsafe(32)
    new_id: str = state[_NEW_ID_STATE]
    return new_id


def csrf_token_for_request(request: Request) -> str:
    tokens: CsrfTokens = request.app.state.csrf
    return tokens.token_for(_browser_id(request))


@jinja2.pass_context
def csrf_token(context: Any) -> str:
    """Template global: ``{{ csrf_token() }}`` in a form or the page's meta tag."""
    return csrf_token_for_request(context["request"])


async def require_csrf_token(request: Request) -> None:
    """Router dependency for HTML routes: every unsafe request must carry this browser's token,
    in the ``X-CSRF-Token`` header (htmx) or the ``csrf_token`` form field (plain forms)."""
    if request.method in SAFE_METHODS:
        return
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.form()
        field = form.get(CSRF_FIELD)
        token = field if isinstance(field, str) else None
    tokens: CsrfTokens = request.app.state.csrf
    if not tokens.valid(request.cookies.get(CSRF_COOKIE), token):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "This form has expired or did not come from this console. "
            "Reload the page and try again.",
        )


class CsrfCookieMiddleware:
    """Sets the browser-id cookie when a page handed out a token for a browser without one.

    A middleware rather than a step in ``render`` so that every template that shows a form
    gets the cookie, whichever helper produced the response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            new_id = scope.get("state", {}).get(_NEW_ID_STATE)
            if message["type"] == "http.response.start" and new_id:
                cookie: SimpleCookie = SimpleCookie()
                cookie[CSRF_COOKIE] = new_id
                morsel = cookie[CSRF_COOKIE]
                morsel["path"] = "/"
                morsel["max-age"] = COOKIE_MAX_AGE
                morsel["httponly"] = True
                morsel["samesite"] = "Lax"
                if scope.get("scheme") == "https":
                    morsel["secure"] = True
                headers = MutableHeaders(scope=message)
                headers.append("set-cookie", morsel.OutputString())
            await send(message)

        await self.app(scope, receive, send_with_cookie)
