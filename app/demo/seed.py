"""The demo's catalog entries (owners, descriptions, dependencies) and its starting canary,
written through the service layer like any other change, so the audit log shows them. The
instances are not seeded: the demo's agents register them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog import service as catalog
from app.catalog.models import Service
from app.catalog.schemas import Link, ServiceCreate, VersionCreate
from app.demo.topology import DEMO_NAMESPACE, INITIAL_WEIGHTS, LOADGEN, SERVICES
from app.identity.principal import Principal
from app.policies import service as policies
from app.policies.schemas import WeightsWrite

__all__ = ["DEMO_ACTOR", "seed_demo_catalog"]

DEMO_ACTOR = Principal.system("demo")
REASON = "meshctl demo"


def seed_demo_catalog(session: Session) -> int:
    """Create the demo services unless the catalog already has services; return how many were
    created."""
    if session.scalar(select(func.count()).select_from(Service)):
        return 0
    for demo in (*SERVICES, LOADGEN):
        catalog.create_service(
            session,
            DEMO_ACTOR,
            data=ServiceCreate(
                namespace=DEMO_NAMESPACE,
                name=demo.name,
                owner_team=demo.team,
                description=demo.description,
                links=[
                    Link.model_validate(
                        {"title": "Runbook", "url": f"https://runbooks.example.com/{demo.name}"}
                    )
                ],
                labels={"app": demo.name, "part-of": "shop"},
                dependencies=demo.dependencies,
            ),
            reason=REASON,
        )
        for version in demo.versions:
            catalog.create_version(
                session,
                DEMO_ACTOR,
                namespace=DEMO_NAMESPACE,
                name=demo.name,
                data=VersionCreate(
                    name=version, labels={"track": "canary" if version != "v1" else "stable"}
                ),
                reason=REASON,
            )
    for name, weights in INITIAL_WEIGHTS.items():
        policies.set_weights(
            session,
            DEMO_ACTOR,
            namespace=DEMO_NAMESPACE,
            name=name,
            data=WeightsWrite(weights=weights),
            reason="demo: canary of the new search index",
        )
    return len(SERVICES) + 1
