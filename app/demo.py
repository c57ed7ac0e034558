"""A sample catalog (the Bookinfo application) so the console has something to show.

It is written through the service layer like any other change, so the audit log shows it.
Later work will start real agents and traffic for it.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog import service as catalog
from app.catalog.models import Service
from app.catalog.schemas import InstanceCreate, Link, ServiceCreate, VersionCreate

DEMO_ACTOR = "demo@meshctl"

_SERVICES: list[tuple[str, str, str, str, dict[str, list[str]]]] = [
    # name, namespace, team, description, {version: [instance addresses]}
    (
        "productpage",
        "bookinfo",
        "storefront",
        "Book detail page; calls details and reviews.",
        {"v1": ["127.0.0.1:19080"]},
    ),
    (
        "details",
        "bookinfo",
        "catalog",
        "Book metadata: ISBN, publisher, pages.",
        {"v1": ["127.0.0.1:19081"]},
    ),
    (
        "reviews",
        "bookinfo",
        "reviews",
        "Reader reviews; v2 adds star ratings (canary).",
        {"v1": ["127.0.0.1:19082"], "v2": ["127.0.0.1:19083"]},
    ),
    ("ratings", "bookinfo", "reviews", "Star ratings store.", {"v1": ["127.0.0.1:19084"]}),
    ("checkout", "shop", "payments", "Checkout API.", {"v1": ["127.0.0.1:19085"]}),
    ("payments", "shop", "payments", "Card payments gateway adapter.", {"v1": ["127.0.0.1:19086"]}),
]


def seed_demo_catalog(session: Session) -> int:
    """Create the sample services unless the catalog already has services; return how many
    were created."""
    if session.scalar(select(func.count()).select_from(Service)):
        return 0
    for name, namespace, team, description, versions in _SERVICES:
        catalog.create_service(
            session,
            DEMO_ACTOR,
            data=ServiceCreate(
                namespace=namespace,
                name=name,
                owner_team=team,
                description=description,
                links=[
                    Link.model_validate(
                        {"title": "Runbook", "url": f"https://runbooks.example.com/{name}"}
                    )
                ],
                labels={"app": name, "part-of": namespace},
            ),
            reason="meshctl demo",
        )
        for version, addresses in versions.items():
            catalog.create_version(
                session,
                DEMO_ACTOR,
                namespace=namespace,
                name=name,
                data=VersionCreate(
                    name=version, labels={"track": "canary" if version == "v2" else "stable"}
                ),
                reason="meshctl demo",
            )
            for address in addresses:
                catalog.create_instance(
                    session,
                    DEMO_ACTOR,
                    namespace=namespace,
                    name=name,
                    data=InstanceCreate(address=address, version=version),
                    reason="meshctl demo",
                )
    return len(_SERVICES)
