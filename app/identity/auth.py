"""From a request to a ``Principal``: an API token (``Authorization: Bearer mesh_…``) or the
console's session cookie, else nobody.

The session cookie holds a random secret and an HMAC of it under the console's key, which is
kept outside the database (``app.keys``): a cookie cannot be forged from a database dump, and
a cookie that was never issued is refused before any query runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.errors import DomainError
from app.identity import sessions, tokens
from app.identity.principal import Principal

__all__ = [
    "SESSION_COOKIE",
    "NotSignedInError",
    "OptionalPrincipalDep",
    "PrincipalDep",
    "SessionCookies",
    "client_address",
    "current_principal",
    "require_principal",
]

SESSION_COOKIE = "mesh_session"
_STATE_KEY = "mesh_principal"


class NotSignedInError(DomainError):
    """No valid credentials: 401 for API clients, the sign-in page for people."""

    status_code = 401

    def __init__(self, next_path: str = "/") -> None:
        super().__init__(
            "sign in first: a console session, or an API token as "
            "'Authorization: Bearer <token>' (meshctl reads MESH_TOKEN)"
        )
        self.next_path = next_path


class SessionCookies:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"mesh-session-v1:" + key).digest()

    def _mac(self, secret: str) -> str:
        digest = hmac.new(self._key, secret.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def seal(self, secret: str) -> str:
        return f"{secret}.{self._mac(secret)}"

    def open(self, cookie: str | None) -> str | None:
        if not cookie or cookie.count(".") != 1:
            return None
        secret, mac = cookie.split(".")
        if not secret or len(cookie) > 200 or not hmac.compare_digest(self._mac(secret), mac):
            return None
        return secret

    def header(self, value: str, *, secure: bool, max_age: int | None) -> str:
        cookie: SimpleCookie = SimpleCookie()
        cookie[SESSION_COOKIE] = value
        morsel = cookie[SESSION_COOKIE]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"
        if max_age is not None:
            morsel["max-age"] = max_age
        if secure:
            morsel["secure"] = True
        return morsel.OutputString()


def client_address(request: Request) -> str:
    # The peer address only: X-Forwarded-For is whatever the client wants it to be, unless a
    # proxy in front rewrites it, and uvicorn's --proxy-headers handles that case.
    return request.client.host if request.client else ""


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def current_principal(request: Request) -> Principal | None:
    """Who sent this request (resolved once per request), or None."""
    state = request.scope.setdefault("state", {})
    if _STATE_KEY in state:
        cached: Principal | None = state[_STATE_KEY]
        return cached
    principal: Principal | None = None
    address = client_address(request)
    bearer = _bearer(request)
    settings = request.app.state.settings
    database = request.app.state.database
    touch: Callable[[Session], None] | None = None
    if bearer is not None:
        with database.session(write=False) as session:
            principal, due = tokens.principal_for_token(session, bearer, address)
        if principal is not None and due:
            token_id = principal.id or 0
            touch = lambda session: tokens.touch_token(session, token_id)  # noqa: E731
    else:
        cookies: SessionCookies = request.app.state.session_cookies
        secret = cookies.open(request.cookies.get(SESSION_COOKIE))
        if secret is not None:
            with database.session(write=False) as session:
                principal, due = sessions.principal_for_session(session, settings, secret, address)
            if principal is not None and due:
                session_id = principal.session_id or 0
                touch = lambda session: sessions.touch_session(session, session_id)  # noqa: E731
    if touch is not None:
        # Last-seen times are a convenience: a busy database must not fail the request.
        with contextlib.suppress(OperationalError), database.session(write=True) as session:
            touch(session)
            session.commit()
    state[_STATE_KEY] = principal
    return principal


def require_principal(request: Request) -> Principal:
    principal = current_principal(request)
    if principal is None:
        next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise NotSignedInError(quote(next_path, safe="/?=&"))
    return principal


PrincipalDep = Annotated[Principal, Depends(require_principal)]
OptionalPrincipalDep = Annotated[Principal | None, Depends(current_principal)]
