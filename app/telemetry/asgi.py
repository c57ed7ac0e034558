"""The OTLP receiver's fast path: ``POST /v1/traces`` and ``POST /v1/metrics`` answered by a
bare ASGI middleware, ahead of FastAPI's routing.

1,000 agents report every 10 s: 100 small requests a second. Through FastAPI each one paid for
route matching over the whole console, dependency solving and the exception middleware, which
was about half of what a metrics report cost the console (bench/telemetry.py). Here a request
for one of the two paths goes straight to the same checks and the same handler the routes in
:mod:`app.telemetry.api` use (join token 401, content type 415, size 413, malformed 400,
429/503 backpressure); everything else, other methods on these paths included, goes on to the
app unchanged. The routes stay for the OpenAPI document and for apps built without this
middleware. It is mounted innermost, so the console's outer middleware (host policy, security
headers) still sees every request.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import DomainError
from app.telemetry import api

__all__ = ["OtlpIngestMiddleware"]

_SIGNALS: dict[str, api.Signal] = {"/v1/traces": "traces", "/v1/metrics": "metrics"}


class OtlpIngestMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        signal = _SIGNALS.get(scope["path"]) if scope["type"] == "http" else None
        if signal is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await api.require_ingest_auth(request)
        except DomainError as exc:
            # The body the console's DomainError handler gives the same refusal on the routes.
            refusal = JSONResponse({"detail": exc.message}, status_code=exc.status_code)
            await refusal(scope, receive, send)
            return
        response = await api.receive(request, signal)
        await response(scope, receive, send)
