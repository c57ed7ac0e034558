"""The demo's catalog entries (owners, descriptions, dependencies) and its starting canary,
written through the service layer like any other change, so the audit log shows them. The
instances are not seeded: the demo's agents register them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog import service as catalog
from app.catalog.models import Service
from app.catalog.schemas import Link, ServiceCreate, VersionCreate
from app.demo.topology import DEMO_NAMESPACE, INITIAL_WEIGHTS, LOADGEN, SERVICES
from app.identity.accounts import create_user, find_user
from app.identity.principal import Principal
from app.identity.schemas import TokenCreate, UserCreate
from app.identity.sign_in import create_sign_in_link
from app.identity.tokens import create_api_token
from app.policies import service as policies
from app.policies.schemas import WeightsWrite

__all__ = ["DEMO_ACTOR", "NEWCOMER", "DemoAccess", "seed_demo_catalog", "seed_demo_people"]

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


NEWCOMER = "you@demo.mesh"
# Two more people, to show the roles: the catalog team's operator may move the catalog canary
# and nothing else; the viewer may look at everything and change nothing.
DEMO_PEOPLE = (
    (NEWCOMER, "admin", ()),
    ("catalog-oncall@demo.mesh", "operator", ("catalog",)),
    ("auditor@demo.mesh", "viewer", ()),
)


@dataclass(frozen=True)
class DemoAccess:
    sign_in_secret: str
    """For ``/sign-in/link/<secret>``: the newcomer's one-time way in."""
    api_token: str
    """The newcomer's token for ``meshctl`` (MESH_TOKEN)."""


def seed_demo_people(session: Session) -> DemoAccess:
    """The demo's people (no passwords: nothing to guess), a one-time sign-in link and a
    ``meshctl`` token for the newcomer, who is an admin of this throw-away mesh."""
    newcomer = None
    for email, role, teams in DEMO_PEOPLE:
        user = find_user(session, email) or create_user(
            session,
            DEMO_ACTOR,
            UserCreate.model_validate({"email": email, "role": role, "teams": list(teams)}),
        )
        if email == NEWCOMER:
            newcomer = user
    assert newcomer is not None
    link = create_sign_in_link(session, newcomer, ttl=timedelta(hours=12))
    token = create_api_token(
        session,
        DEMO_ACTOR,
        TokenCreate(name="meshctl (demo)", role="admin", expires_in_days=1),
        owner=newcomer,
    )
    return DemoAccess(sign_in_secret=link, api_token=token.secret)
