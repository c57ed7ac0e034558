"""API tokens (acting for a person, never with more rights) and join tokens (for agents of one
namespace): every write checks the actor's rights and leaves an audit event."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.db import utcnow
from app.errors import InvalidError, NotFoundError
from app.identity.accounts import get_user, user_teams
from app.identity.common import _TOUCH_EVERY, digest
from app.identity.models import ApiToken, User
from app.identity.principal import Action, ForbiddenError, Principal, Role, authorize
from app.identity.schemas import JoinTokenCreate, TokenCreate, TokenRead

TOKEN = "token"  # noqa: S105  (a resource kind, not a secret)
# Prefixes tell a leaked secret's kind at a glance (and let secret scanners match them).
API_TOKEN_PREFIX = "mesh_"  # noqa: S105
JOIN_TOKEN_PREFIX = "meshjoin_"  # noqa: S105


@dataclass(frozen=True)
class NewToken:
    secret: str
    row: ApiToken


def _new_secret(prefix: str) -> tuple[str, str]:
    secret = prefix + secrets.token_urlsafe(32)
    return secret, secret[: len(prefix) + 6]


def create_api_token(
    session: Session, actor: Principal, data: TokenCreate, *, owner: User | None = None
) -> NewToken:
    """A token acting for ``owner`` (default: the signed-in user), never with more rights
    than its owner has."""
    if owner is None:
        if actor.kind != "user" or actor.id is None:
            raise ForbiddenError("only a signed-in person can create a token for themselves")
        owner = get_user(session, actor.id)
    elif not (actor.kind == "user" and actor.id == owner.id):
        authorize(actor, Action.MANAGE_ACCESS)
    owner_role = Role.parse(owner.role)
    issues: list[tuple[str, str]] = []
    if Role.parse(data.role) > owner_role:
        issues.append(("role", f"a token cannot have more rights than its owner ({owner.role})"))
    if (
        data.team is not None
        and owner_role < Role.ADMIN
        and data.team not in user_teams(session, owner.id)
    ):
        issues.append(("team", f"{owner.email} is not in team {data.team!r}"))
    if issues:
        raise InvalidError(issues)
    secret, prefix = _new_secret(API_TOKEN_PREFIX)
    row = ApiToken(
        kind="api",
        name=data.name,
        token_hash=digest(secret),
        prefix=prefix,
        owner_id=owner.id,
        role=data.role,
        team=data.team,
        created_by=actor.actor,
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(days=data.expires_in_days),
    )
    session.add(row)
    session.flush()
    _audit_token(session, actor, row, "token.create", owner.email)
    return NewToken(secret, row)


def create_join_token(session: Session, actor: Principal, data: JoinTokenCreate) -> NewToken:
    """A token agents present to join the mesh, good for one namespace only."""
    authorize(actor, Action.MANAGE_ACCESS)
    secret, prefix = _new_secret(JOIN_TOKEN_PREFIX)
    row = ApiToken(
        kind="join",
        name=data.name,
        token_hash=digest(secret),
        prefix=prefix,
        role="viewer",
        namespace=data.namespace,
        created_by=actor.actor,
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(days=data.expires_in_days),
    )
    session.add(row)
    session.flush()
    _audit_token(session, actor, row, "token.create", None)
    return NewToken(secret, row)


def _audit_token(
    session: Session, actor: Principal, row: ApiToken, action: str, owner: str | None
) -> None:
    audit.record(
        session,
        actor,
        action=action,
        resource_kind=TOKEN,
        resource_name=f"{row.kind}:{row.id}:{row.name}",
        before=None,
        after={
            "kind": row.kind,
            "prefix": row.prefix,
            "owner": owner,
            "role": row.role,
            "team": row.team,
            "namespace": row.namespace,
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
            "revoked": row.revoked_at is not None,
        },
    )


def revoke_token(session: Session, actor: Principal, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no token {token_id}")
    if not (actor.kind == "user" and row.owner_id is not None and actor.id == row.owner_id):
        authorize(actor, Action.MANAGE_ACCESS)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        _audit_token(session, actor, row, "token.revoke", None)
    return row


def _active(row: ApiToken, now: datetime) -> bool:
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def token_read(row: ApiToken, owner: str | None) -> TokenRead:
    return TokenRead(
        id=row.id,
        kind=row.kind,
        name=row.name,
        prefix=row.prefix,
        owner=owner,
        role=row.role,
        team=row.team,
        namespace=row.namespace,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        active=_active(row, utcnow()),
    )


def list_tokens(session: Session, *, owner_id: int | None = None) -> list[TokenRead]:
    query = (
        select(ApiToken, User.email)
        .outerjoin(User, User.id == ApiToken.owner_id)
        .order_by(ApiToken.id.desc())
    )
    if owner_id is not None:
        query = query.where(ApiToken.owner_id == owner_id)
    return [token_read(row, email) for row, email in session.execute(query)]


def _due(row: ApiToken, now: datetime) -> bool:
    return row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY


def touch_token(session: Session, token_id: int) -> None:
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow()))


def principal_for_token(
    session: Session, secret: str, client_address: str
) -> tuple[Principal | None, bool]:
    """The principal an API token acts as: its owner's rights, narrowed to the token's role and
    team, so demoting a person demotes their tokens at once. And whether its last-used time is
    due to be written (``touch_token``)."""
    if not secret.startswith(API_TOKEN_PREFIX):
        return None, False
    now = utcnow()
    found = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.owner_id)
        .where(ApiToken.token_hash == digest(secret), ApiToken.kind == "api")
    ).first()
    if found is None:
        return None, False
    row, owner = found
    if not _active(row, now) or owner.disabled:
        return None, False
    teams = frozenset(user_teams(session, owner.id))
    if row.team is not None:
        teams = frozenset({row.team}) if owner.role == "admin" else teams & {row.team}
    role = min(Role.parse(row.role), Role.parse(owner.role))
    if row.team is not None and role == Role.ADMIN:
        role = Role.OPERATOR  # a team-narrowed token is never mesh-wide
    principal = Principal(
        kind="token",
        id=row.id,
        name=row.name,
        role=role,
        teams=teams,
        client_address=client_address,
        on_behalf_of=owner.email,
    )
    return principal, _due(row, now)


@dataclass(frozen=True)
class JoinGrant:
    token_id: int
    namespace: str
    expires_at: datetime | None


def join_grant(session: Session, secret: str) -> JoinGrant | None:
    """What an active join token admits (agents of one namespace), or None."""
    if not secret.startswith(JOIN_TOKEN_PREFIX):
        return None
    row = session.scalar(
        select(ApiToken).where(ApiToken.token_hash == digest(secret), ApiToken.kind == "join")
    )
    if row is None or not _active(row, utcnow()) or row.namespace is None:
        return None
    return JoinGrant(row.id, row.namespace, row.expires_at)
