"""Teams: the owners named in the catalog. A service's ``owner_team`` is always a row here."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.identity.models import Team
from app.identity.principal import Action, Principal, authorize


def ensure_team(session: Session, actor: Principal, name: str) -> Team:
    """The team called ``name``, created if new. Naming a new team in the catalog (or in a
    user's teams) is how an admin, or an agent registering an unowned service, brings one into
    being; operators can only name teams they belong to, which exist already. No event of its
    own: the change that named the team (``service.create``, ``user.update``) records it."""
    team = session.scalar(select(Team).where(Team.name == name))
    if team is not None:
        return team
    if actor.kind != "agent":
        authorize(actor, Action.MANAGE_ACCESS)
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def list_teams(session: Session) -> list[Team]:
    return list(session.scalars(select(Team).order_by(Team.name)))
