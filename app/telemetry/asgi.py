"""The OTLP receiver's own ASGI path: ``POST /v1/traces`` and ``POST /v1/metrics`` answered
ahead of the console's application stack.

1,000 agents report every 10 s: 100 small requests a second, and each one's share of the
console's CPU is mostly the path to the handler, not the handler. Inside the console a report
went through FastAPI's native-telemetry check (environment look-ups), its server-error, telemetry
and body-limit middlewares (three layers that wrap ``send``), the console's input-encoding and
CSRF-cookie middlewares (one buffers the body, the other wraps ``send``) and Starlette's Request
and Response objects (bench/telemetry.py, profiled with py-spy). Here :class:`OtlpIngest` is
called by the console app itself (``app.main.ConsoleApp``) before any of that, for exactly these
two paths and this method; everything else, other methods on these paths included, goes on to
the console unchanged.

What the console's middleware gave these requests and still applies here:

- the Host and Origin checks (400, 403) and the security headers: the same middleware
  classes wrap this path;
- a size limit: MESH_OTLP_MAX_BYTES (413) while the body streams in, and again after gunzip.
  The console's 1 MiB limit no longer applies to exports, which are allowed larger;
- an answer for an error: a database that is busy or unreachable is a 503 with Retry-After
  (the console's OperationalError handler), anything else a logged 500.

Not applied, being the console's only: the CSRF cookie (no page here) and the check that a
form or JSON body is valid UTF-8 (an OTLP JSON body that is not is refused whole as malformed,
400, by the decoder).

The answers themselves are :func:`app.telemetry.api.answer`'s, as the FastAPI routes give them
(401 without the join token, 415, 413, 400, 429 with Retry-After, 503). The routes stay, for
the OpenAPI document and for an app without this path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from sqlalchemy.exc import OperationalError
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import DomainError
from app.middleware import HostPolicy, RequestOriginMiddleware, SecurityHeadersMiddleware
from app.telemetry import api

__all__ = ["OtlpIngest"]

log = logging.getLogger(__name__)

_SIGNALS: dict[str, api.Signal] = {"/v1/traces": "traces", "/v1/metrics": "metrics"}
# The request headers the receiver reads; others are not decoded.
_WANTED = frozenset(
    {
        b"authorization",
        b"content-type",
        b"content-encoding",
        b"content-length",
        b"x-mesh-agent",
    }
)


class OtlpIngest:
    """ASGI app for the two receiver paths, with the console's state (settings, hub, receiver)."""

    def __init__(self, state: State, policy: HostPolicy) -> None:
        self._state = state
        self._app: ASGIApp = SecurityHeadersMiddleware(
            RequestOriginMiddleware(self._answer, policy=policy)
        )

    @staticmethod
    def handles(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] in _SIGNALS and scope["method"] == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        signal = _SIGNALS[scope["path"]]
        state = self._state
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            # ASGI servers give names in lower case; only the first of a repeated one counts,
            # as with Starlette's Headers.get.
            if name in _WANTED:
                headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        client = scope.get("client")
        address = client[0] if client else None
        try:
            try:
                await api.check_ingest_auth(state, headers.get("authorization", ""), address)
            except DomainError as exc:
                # The body the console's DomainError handler gives the same refusal.
                await _send(send, exc.status_code, _detail(exc.message), "application/json")
                return
            status, body, media, extra = await api.answer(
                api.receiver_of(state), signal, headers, address, _chunks(receive)
            )
        except ClientDisconnect:
            return  # nobody to answer; nothing was stored (the body never arrived whole)
        except OperationalError:
            # As the console's handler answers it: a temporary condition, not a bad request.
            status, body, media, extra = api.error_answer(
                503, "the database is busy or unavailable; try again", {"Retry-After": "1"}
            )
        except Exception:
            log.exception("OTLP %s export failed", signal)
            status, body, media, extra = api.error_answer(500, "internal error")
        await _send(send, status, body, media, extra)


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _detail(message: str) -> bytes:
    return json.dumps({"detail": message}, ensure_ascii=False, separators=(",", ":")).encode()


async def _send(
    send: Send, status: int, body: bytes, media: str, extra: dict[str, str] | None = None
) -> None:
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", media.encode("latin-1")),
    ]
    if extra:
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
