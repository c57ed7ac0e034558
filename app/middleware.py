"""Small pure-ASGI middleware (not BaseHTTPMiddleware, which would wrap every response)."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class SecurityHeadersMiddleware:
    """Headers that cost nothing and close whole classes of browser attacks."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            b"script-src 'self'; frame-ancestors 'none'",
        ),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                existing = {key.lower() for key, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in existing]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, add_headers)


# ---------------------------------------------------------------------------------------------
# Host and Origin: DNS rebinding and cross-site requests
# ---------------------------------------------------------------------------------------------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Probes (a load balancer, Kubernetes) address the server by IP; the answer reveals nothing.
HOST_CHECK_EXEMPT_PATHS = frozenset({"/healthz"})


def split_host(value: str) -> tuple[str, str | None] | None:
    """``name[:port]`` or ``[v6][:port]`` as (lower-case host, port or None); None if malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return host, rest[1:]
    host, sep, port = value.partition(":")
    if not host or ":" in port or (sep and not port.isdigit()):
        return None
    return host, (port if sep else None)


class HostPolicy:
    """Which Host (and Origin) names the console answers to.

    An entry without a port matches any port (``localhost`` covers ``localhost:8000``); an entry
    with a port matches only that port; ``*.example.com`` matches sub-domains; ``*`` matches any
    Host, but never makes a foreign Origin acceptable (see ``origin_allowed``).
    """

    def __init__(self, allowed: list[str]) -> None:
        self.any_host = "*" in allowed
        self.entries: list[tuple[str, str | None]] = []
        for entry in allowed:
            if entry == "*":
                continue
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"MESH_ALLOWED_HOSTS: {entry!r} is not a host name[:port]")
            self.entries.append(parsed)

    def listed(self, netloc: str) -> bool:
        parsed = split_host(netloc)
        if parsed is None:
            return False
        host, port = parsed
        for allowed_host, allowed_port in self.entries:
            if allowed_port is not None and allowed_port != port:
                continue
            if host == allowed_host:
                return True
            if allowed_host.startswith("*.") and host.endswith(allowed_host[1:]):
                return True
        return False

    def host_allowed(self, host_header: str) -> bool:
        return (self.any_host and split_host(host_header) is not None) or self.listed(host_header)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """Same origin as the request's (checked) Host, or a host the operator listed."""
        if origin == "null":  # sandboxed frames, file: pages, some redirects
            return False
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        return parts.netloc.lower() == host_header.strip().lower() or self.listed(parts.netloc)


class RequestOriginMiddleware:
    """Refuse requests for a foreign Host (400) and browser writes from a foreign origin (403).

    Applies to every route, the JSON API included: a page on another site can make a browser
    POST to ``http://127.0.0.1:8000/api/v1/...`` as easily as to a console form. Browsers mark
    such requests (``Origin``, ``Sec-Fetch-Site``, or at least ``Referer``); clients that are
    not browsers (meshctl, agents, OTLP exporters, curl) send none of them and no cookie, and
    pass. A request that carries a cookie, the browser's credential, but no way to tell where
    it came from is refused: browsers always label their writes, so it is not one of ours.
    """

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if scope["path"] not in HOST_CHECK_EXEMPT_PATHS and not self.policy.host_allowed(host):
            await _refuse(
                scope,
                receive,
                send,
                400,
                f"Host {host!r} is not served here; add it to MESH_ALLOWED_HOSTS "
                "if this console should answer to that name",
            )
            return
        if scope["method"] not in SAFE_METHODS:
            problem = self._cross_site_problem(headers, host)
            if problem is not None:
                await _refuse(scope, receive, send, 403, problem)
                return
        await self.app(scope, receive, send)

    def _cross_site_problem(self, headers: Headers, host: str) -> str | None:
        origin = headers.get("origin")
        if origin is not None:
            if self.policy.origin_allowed(origin, host):
                return None
            return f"cross-origin request refused: Origin {origin!r} is not an allowed host"
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None:
            if fetch_site in ("same-origin", "none"):
                return None
            return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
        referer = headers.get("referer")
        if referer is not None:
            if self.policy.origin_allowed(_origin_of(referer), host):
                return None
            return "cross-origin request refused: the Referer is not an allowed host"
        if "cookie" in headers:
            return (
                "request refused: it carries a cookie but neither Origin nor Referer, "
                "so it cannot be told apart from a forged cross-site request"
            )
        return None


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Text that is not text: invalid UTF-8 and lone surrogates
# ---------------------------------------------------------------------------------------------

_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)


def has_lone_surrogate_escape(text: str) -> bool:
    """True if JSON text escapes half of a UTF-16 surrogate pair (``"\\ud800"``) on its own.

    ``json.loads`` turns such an escape into a Python string that no encoder accepts, so it
    would surface as a 500 wherever the value is next encoded (the database, the audit hash,
    the error response that echoes the input). A proper pair (an emoji) is fine.
    """
    if "\\u" not in text:
        return False
    high_ends_at = -1  # end of a high-surrogate escape still waiting for its low half
    for match in _JSON_ESCAPE.finditer(text):
        escape = match.group(1)
        code = int(escape[1:], 16) if len(escape) == 5 else None
        if high_ends_at >= 0:
            if match.start() == high_ends_at and code is not None and 0xDC00 <= code <= 0xDFFF:
                high_ends_at = -1
                continue
            return True
        if code is None:
            continue
        if 0xD800 <= code <= 0xDBFF:
            high_ends_at = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return True
    return high_ends_at >= 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class InputEncodingMiddleware:
    """422 for a URL, form or JSON body that is not valid Unicode text.

    Starlette would replace bad bytes in a URL or form with U+FFFD (silently storing mangled
    text) and raise deep inside a JSON route (a 500). Checking the raw input once, before any
    route runs, covers every router, including ones added later. Bodies are already bounded by
    the body-size limit, which runs outside this middleware.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")
        if not _is_utf8(unquote_to_bytes(raw_path)):
            await _unprocessable(scope, receive, send, "path", "the URL path is not UTF-8 text")
            return
        query: bytes = scope.get("query_string", b"")
        if query and not _is_utf8(unquote_to_bytes(query.replace(b"+", b" "))):
            await _unprocessable(scope, receive, send, "query", "the query string is not UTF-8")
            return
        kind = _body_kind(Headers(scope=scope).get("content-type", ""))
        if kind is None:
            await self.app(scope, receive, send)
            return
        body, replay = await _buffer_body(receive)
        problem = _body_problem(kind, body)
        if problem is not None:
            await _unprocessable(scope, replay, send, "body", problem)
            return
        await self.app(scope, replay, send)


def _body_kind(content_type: str) -> str | None:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return "json"
    if media_type == "application/x-www-form-urlencoded":
        return "form"
    return None


def _body_problem(kind: str, body: bytes) -> str | None:
    if kind == "form":
        body = unquote_to_bytes(body.replace(b"+", b" "))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "the request body is not UTF-8 text"
    if kind == "json" and has_lone_surrogate_escape(text):
        return "the JSON text contains a lone surrogate escape (such as \\ud800), not a character"
    return None


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _unprocessable(
    scope: Scope, receive: Receive, send: Send, location: str, message: str
) -> None:
    # Shaped like FastAPI's own 422 so clients parse one error format.
    detail = [{"type": "unicode_error", "loc": [location], "msg": message, "input": None}]
    await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
