"""Every domain's routers in one place (after polar's ``api.py``): a new domain is one line in
each list, not an edit to the application factory."""

from __future__ import annotations

from fastapi import APIRouter

from app import metrics
from app.agents import api as agents_api
from app.agents import web as agents_web
from app.audit import api as audit_api
from app.audit import web as audit_web
from app.catalog import api as catalog_api
from app.catalog import web as catalog_web
from app.identity import api as identity_api
from app.identity import oidc as identity_oidc
from app.identity import web as identity_web
from app.policies import api as policies_api
from app.policies import editors as policies_editors
from app.policies import web as policies_web
from app.telemetry import api as telemetry_api
from app.telemetry import web as telemetry_web
from app.topology import api as topology_api
from app.topology import web as topology_web

__all__ = ["API_ROUTERS", "OPEN_API_ROUTERS", "OPEN_WEB_ROUTERS", "WEB_ROUTERS"]

# Reachable without signing in, each with its own credential: agents' registration and
# discovery and the OTLP receiver take the join token; /metrics is Prometheus' (counts only).
OPEN_API_ROUTERS: list[APIRouter] = [
    agents_api.agent_router,
    telemetry_api.receiver,
    metrics.router,
]
# The sign-in pages.
OPEN_WEB_ROUTERS: list[APIRouter] = [identity_web.public_router, identity_oidc.oidc_router]

# JSON API for people and meshctl (a session or an API token): in /openapi.json.
API_ROUTERS: list[APIRouter] = [
    catalog_api.router,
    policies_api.router,
    agents_api.router,
    audit_api.router,
    telemetry_api.router,
    topology_api.router,
    identity_api.router,
]

# Console pages (HTML, signed in): left out of the OpenAPI document.
WEB_ROUTERS: list[APIRouter] = [
    identity_web.router,
    catalog_web.router,
    policies_web.router,
    policies_editors.router,
    agents_web.router,
    audit_web.router,
    telemetry_web.router,
    topology_web.router,
]
