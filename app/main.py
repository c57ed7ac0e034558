"""Application factory: routers, error mapping, middleware and static files."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from app.agents.hub import PushHub
from app.audit.trust import build_audit_trust
from app.config import REPO_ROOT, Settings, get_settings
from app.csrf import CsrfCookieMiddleware, CsrfTokens
from app.db import Database
from app.errors import DomainError, InvalidError
from app.identity.auth import NotSignedInError, SessionCookies, require_principal
from app.keys import load_or_create_key_file
from app.middleware import (
    HostPolicy,
    InputEncodingMiddleware,
    RequestOriginMiddleware,
    SecurityHeadersMiddleware,
)
from app.routers import API_ROUTERS, OPEN_API_ROUTERS, OPEN_WEB_ROUTERS, WEB_ROUTERS
from app.telemetry.asgi import OtlpIngest
from app.telemetry.read import EdgeWindowCache
from app.telemetry.receiver import Receiver
from app.telemetry.retention import Pruner
from app.topology.layout import LayoutCache
from app.web import is_htmx, render

STATIC_DIR = REPO_ROOT / "static"


class ConsoleApp(FastAPI):
    """The console, which hands OTLP exports (``POST /v1/traces``, ``/v1/metrics``) to the
    receiver's own ASGI path ahead of its middleware stack (see app.telemetry.asgi)."""

    otlp_ingest: OtlpIngest | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ingest = self.otlp_ingest
        if ingest is not None and ingest.handles(scope):
            await ingest(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, database: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    owns_database = database is None
    database = database or Database(settings.effective_database_url, echo=settings.sql_echo)

    hub = PushHub(database, settings)
    audit_trust = build_audit_trust(settings, database)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        audit_trust.checkpointer.attach()
        periodic = asyncio.create_task(audit_trust.checkpointer.run())
        hub.start(asyncio.get_running_loop())
        receiver = _app.state.otlp_receiver = Receiver(database, settings)
        pruner = Pruner(database, settings)
        pruner.start()
        try:
            yield
        finally:
            pruner.stop()
            receiver.close()
            hub.stop()
            app.state.edge_cache.close()
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
            audit_trust.checkpointer.detach()
            if audit_trust.checkpointer.pending:
                await asyncio.to_thread(audit_trust.checkpointer.checkpoint_quietly)
            if owns_database:
                database.dispose()

    app = ConsoleApp(
        title="mesh control plane",
        version="0.1.0",
        summary="Service catalog, traffic policy and audit log of the mesh.",
        lifespan=lifespan,
        # Starlette's limit: 413 before a larger body is read, chunked bodies counted as they come.
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.database = database
    app.state.hub = hub
    app.state.edge_cache = EdgeWindowCache(database)
    app.state.layouts = LayoutCache()
    app.state.audit_trust = audit_trust
    console_key = load_or_create_key_file(
        settings.effective_secret_key_file, lambda: secrets.token_hex(32).encode()
    )
    app.state.console_key = console_key  # other keys derive from it, each with its own label
    app.state.csrf = CsrfTokens(console_key)
    app.state.session_cookies = SessionCookies(console_key)

    signed_in = [Depends(require_principal)]
    for router in OPEN_API_ROUTERS:
        app.include_router(router)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=signed_in)
    for router in OPEN_WEB_ROUTERS:
        app.include_router(router, include_in_schema=False)
    for router in WEB_ROUTERS:
        app.include_router(router, include_in_schema=False, dependencies=signed_in)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> Response:
        if isinstance(exc, NotSignedInError):
            return _not_signed_in(request, exc)
        if _wants_html(request) and not is_htmx(request):
            title = "Not allowed" if exc.status_code == 403 else "Something is not right"
            return render(
                request,
                "error.html",
                {"title": title, "message": exc.message},
                status_code=exc.status_code,
            )
        body: dict[str, object] = {"detail": exc.message}
        if exc.field:
            body["field"] = exc.field
        if isinstance(exc, InvalidError):
            body["errors"] = [{"field": field, "message": text} for field, text in exc.issues]
        return JSONResponse(body, status_code=exc.status_code)

    # People who follow a bad link or edit a URL by hand get a page, API clients get JSON.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_html(request):
            title = "Page not found" if exc.status_code == 404 else "Something is not right"
            message = (
                "There is nothing at this address." if exc.status_code == 404 else str(exc.detail)
            )
            return render(
                request,
                "error.html",
                {"title": title, "message": message},
                status_code=exc.status_code,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if _wants_html(request):
            fields = ", ".join(str(error["loc"][-1]) for error in exc.errors())
            return render(
                request,
                "error.html",
                {"title": "This address has a bad parameter", "message": f"Check: {fields}."},
                status_code=422,
            )
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        # A locked or unreachable database is a temporary condition, not a bug in the request.
        return JSONResponse(
            {"detail": "the database is busy or unavailable; try again"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    # The last added runs first: security headers go on every answer, refusals included.
    app.add_middleware(CsrfCookieMiddleware)
    app.add_middleware(InputEncodingMiddleware)
    host_policy = HostPolicy(settings.effective_allowed_hosts)
    app.add_middleware(RequestOriginMiddleware, policy=host_policy)
    app.add_middleware(SecurityHeadersMiddleware)
    # OTLP exports skip the stack above but keep its Host/Origin checks and security headers.
    app.otlp_ingest = OtlpIngest(app.state, host_policy)
    return app


def _not_signed_in(request: Request, exc: NotSignedInError) -> Response:
    """People go to the sign-in page (and come back where they were); programs get 401."""
    sign_in = f"/sign-in?next={exc.next_path}"
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": sign_in})
    if _wants_html(request):
        return RedirectResponse(sign_in, status_code=303)
    return JSONResponse(
        {"detail": exc.message}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/api/", "/v1/", "/static/")):
        return False
    return "text/html" in request.headers.get("accept", "")
