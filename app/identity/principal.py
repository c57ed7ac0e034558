"""Who is acting, as the service layer sees it, and what each role may do.

Every change goes through a service function that takes a ``Principal`` and calls
``authorize`` before it writes: the one place the rules live, so the JSON API, the console and
``meshctl`` obey the same ones. Templates ask ``can`` only to hide what would be refused anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from app.errors import DomainError

__all__ = [
    "Action",
    "ForbiddenError",
    "Principal",
    "Role",
    "authorize",
    "can",
]


class Role(IntEnum):
    """Ordered: each role may do everything the one below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}; use viewer, operator or admin") from None


ROLE_NAMES = tuple(role.label for role in Role)

PrincipalKind = Literal["user", "token", "agent", "system"]


class Action:
    """What a principal asks to do. Team-scoped actions name the team that owns the target."""

    CHANGE_SERVICE = "change_service"  # catalog entries, versions, instances, traffic policy
    CHANGE_MESH = "change_mesh"  # mesh-wide defaults
    MANAGE_ACCESS = "manage_access"  # users, teams, other people's tokens and sessions


class ForbiddenError(DomainError):
    """Signed in, but not allowed to do this: 403 with the reason."""

    status_code = 403


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    id: int | None
    name: str  # an e-mail address, a token's name, an agent id, a system component
    role: Role
    # The teams whose services an operator may change; admins may change every team's.
    teams: frozenset[str] = field(default_factory=frozenset)
    client_address: str = ""
    # For tokens: the person the token acts for, shown in the audit log.
    on_behalf_of: str = ""
    session_id: int | None = None

    @classmethod
    def system(cls, component: str) -> Principal:
        """A control-plane component acting on its own (``meshctl`` on the server, the demo)."""
        return cls(kind="system", id=None, name=component, role=Role.ADMIN)

    @classmethod
    def agent(cls, agent_id: str, client_address: str = "") -> Principal:
        return cls(
            kind="agent", id=None, name=agent_id, role=Role.VIEWER, client_address=client_address
        )

    @property
    def actor(self) -> str:
        """Who acted, as the audit log shows it."""
        if self.kind == "token":
            owner = f"{self.on_behalf_of} " if self.on_behalf_of else ""
            return f"{owner}(token {self.name})"
        if self.kind == "agent":
            return f"agent:{self.name}"
        if self.kind == "system":
            return f"system:{self.name}"
        return self.name

    @property
    def actor_id(self) -> str:
        """A stable id: names can be reused after a deletion, ids cannot."""
        if self.id is None:
            return f"{self.kind}:{self.name}"
        return f"{self.kind}:{self.id}"

    @property
    def is_admin(self) -> bool:
        return self.role >= Role.ADMIN

    def owns_team(self, team: str) -> bool:
        return self.is_admin or team in self.teams


def _refusal(principal: Principal, action: str, team: str | None) -> str | None:
    if action == Action.CHANGE_SERVICE:
        if principal.kind == "agent":
            # An agent changes only its own registration (service, version, instance); the
            # agents API has checked that its join token admits it to that namespace.
            return None
        if principal.role < Role.OPERATOR:
            return "viewers may look but not change; ask an admin for the operator role"
        if team is not None and not principal.owns_team(team):
            yours = ", ".join(sorted(principal.teams)) or "none"
            return (
                f"operators may change only their own team's services: this one belongs to "
                f"team {team!r}, and your teams are: {yours}"
            )
        return None
    if action in (Action.CHANGE_MESH, Action.MANAGE_ACCESS):
        if not principal.is_admin:
            what = "mesh-wide settings" if action == Action.CHANGE_MESH else "users and tokens"
            return f"only admins may change {what}"
        return None
    raise ValueError(f"unknown action {action!r}")


def can(principal: Principal | None, action: str, *, team: str | None = None) -> bool:
    return principal is not None and _refusal(principal, action, team) is None


def authorize(principal: Principal, action: str, *, team: str | None = None) -> None:
    """Raise ``ForbiddenError`` with the reason unless ``principal`` may do ``action``."""
    reason = _refusal(principal, action, team)
    if reason is not None:
        raise ForbiddenError(reason)
