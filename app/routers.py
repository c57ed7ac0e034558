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
from app.policies import api as policies_api
from app.policies import web as policies_web
from app.telemetry import api as telemetry_api
from app.telemetry import web as telemetry_web
from app.topology import api as topology_api
from app.topology import web as topology_web

__all__ = ["API_ROUTERS", "WEB_ROUTERS"]

# JSON API, OTLP receiver, /metrics: documented in /openapi.json (where they say so).
API_ROUTERS: list[APIRouter] = [
    catalog_api.router,
    policies_api.router,
    agents_api.router,
    audit_api.router,
    telemetry_api.receiver,
    telemetry_api.router,
    topology_api.router,
    metrics.router,
]

# Console pages (HTML): left out of the OpenAPI document.
WEB_ROUTERS: list[APIRouter] = [
    catalog_web.router,
    policies_web.router,
    agents_web.router,
    audit_web.router,
    telemetry_web.router,
    topology_web.router,
]
