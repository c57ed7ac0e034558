"""People, sessions and tokens: every write checks the actor's rights and leaves an audit event.

Sign-in itself is not audited (it would drown the changes people look for); sessions and the
failure log are where it shows.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.catalog.models import Service
from app.config import Settings
from app.db import utcnow
from app.errors import ConflictError, InvalidError, NotFoundError
from app.identity import passwords
from app.identity.models import (
    ApiToken,
    SignInFailure,
    SignInLink,
    Team,
    TeamMember,
    User,
    WebSession,
)
from app.identity.principal import Action, ForbiddenError, Principal, Role, authorize
from app.identity.schemas import (
    JoinTokenCreate,
    SessionRead,
    TeamRead,
    TokenCreate,
    TokenRead,
    UserCreate,
    UserRead,
    UserUpdate,
)
from app.identity.teams import ensure_team

USER = "user"
TOKEN = "token"  # noqa: S105  (a resource kind, not a secret)
# Prefixes tell a leaked secret's kind at a glance (and let secret scanners match them).
API_TOKEN_PREFIX = "mesh_"  # noqa: S105
JOIN_TOKEN_PREFIX = "meshjoin_"  # noqa: S105
SIGN_IN_LINK_TTL = timedelta(minutes=30)
# Writing last_seen/last_used on every request would make every read a write.
_TOUCH_EVERY = timedelta(seconds=60)
# Per client address, whatever the account: a run over many accounts is slowed down too.
_ADDRESS_FAILURE_LIMIT = 30
_ADDRESS_FAILURE_WINDOW = timedelta(minutes=15)

SIGN_IN_REFUSED = "The e-mail address or password is not right, or the account is locked."


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Users and teams


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user with id {user_id}")
    return user


def find_user(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == email.strip().lower()))


def user_teams(session: Session, user_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Team.name)
            .join(TeamMember, TeamMember.team_id == Team.id)
            .where(TeamMember.user_id == user_id)
            .order_by(Team.name)
        )
    )


def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0


def user_read(session: Session, user: User) -> UserRead:
    locked = user.locked_until is not None and user.locked_until > utcnow()
    return UserRead(
        id=user.id,
        email=user.email,
        display_name=user.display_name,
        role=user.role,
        teams=user_teams(session, user.id),
        disabled=user.disabled,
        locked=locked,
        single_sign_on=user.oidc_subject is not None,
        created_at=user.created_at,
        last_sign_in_at=user.last_sign_in_at,
    )


def list_users(session: Session) -> list[UserRead]:
    return [user_read(session, u) for u in session.scalars(select(User).order_by(User.email))]


def _snapshot(session: Session, user: User) -> dict[str, object]:
    return {
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role,
        "teams": user_teams(session, user.id),
        "disabled": user.disabled,
    }


def _set_teams(session: Session, actor: Principal, user: User, names: list[str]) -> None:
    wanted = {ensure_team(session, actor, name).id for name in dict.fromkeys(names)}
    session.execute(delete(TeamMember).where(TeamMember.user_id == user.id))
    for team_id in sorted(wanted):
        session.add(TeamMember(user_id=user.id, team_id=team_id))
    session.flush()


def create_user(session: Session, actor: Principal, data: UserCreate) -> User:
    authorize(actor, Action.MANAGE_ACCESS)
    if data.password is not None and (problem := passwords.password_problem(data.password)):
        raise InvalidError([("password", problem)])
    if find_user(session, data.email) is not None:
        raise ConflictError(f"a user {data.email} exists already", field="email")
    user = User(
        email=data.email,
        display_name=data.display_name,
        role=data.role,
        password_hash=passwords.hash_password(data.password) if data.password else None,
        created_at=utcnow(),
    )
    session.add(user)
    session.flush()
    _set_teams(session, actor, user, data.teams)
    audit.record(
        session,
        actor,
        action="user.create",
        resource_kind=USER,
        resource_name=user.email,
        before=None,
        after=_snapshot(session, user),
    )
    return user


def _admins_left(session: Session, without: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(User)
            .where(User.role == "admin", User.disabled.is_(False), User.id != without)
        )
        or 0
    )


def update_user(session: Session, actor: Principal, user_id: int, data: UserUpdate) -> User:
    authorize(actor, Action.MANAGE_ACCESS)
    user = get_user(session, user_id)
    before = _snapshot(session, user)
    demoted = data.role is not None and data.role != "admin"
    if user.role == "admin" and (demoted or data.disabled) and _admins_left(session, user.id) == 0:
        raise ConflictError("this is the last admin: make someone else admin first", field="role")
    if data.display_name is not None:
        user.display_name = data.display_name
    if data.role is not None:
        user.role = data.role
    if data.disabled is not None:
        user.disabled = data.disabled
        if data.disabled:
            _revoke_sessions(session, user.id)
    if data.teams is not None:
        _set_teams(session, actor, user, data.teams)
    session.flush()
    after = _snapshot(session, user)
    if after != before:
        changed = [key for key in after if after[key] != before[key]]
        audit.record(
            session,
            actor,
            action="user.update",
            resource_kind=USER,
            resource_name=user.email,
            before={key: before[key] for key in changed},
            after={key: after[key] for key in changed},
        )
    return user


def set_password(session: Session, actor: Principal, user_id: int, password: str) -> None:
    """A user may set their own password; admins anyone's."""
    if not (actor.kind == "user" and actor.id == user_id):
        authorize(actor, Action.MANAGE_ACCESS)
    if problem := passwords.password_problem(password):
        raise InvalidError([("password", problem)])
    user = get_user(session, user_id)
    user.password_hash = passwords.hash_password(password)
    user.failed_sign_ins, user.locked_until = 0, None
    session.flush()
    audit.record(
        session,
        actor,
        action="user.password",
        resource_kind=USER,
        resource_name=user.email,
        before=None,
        after={"password": "changed"},
    )


def list_teams(session: Session) -> list[TeamRead]:
    members: dict[str, list[str]] = {}
    for team, email in session.execute(
        select(Team.name, User.email)
        .join(TeamMember, TeamMember.team_id == Team.id)
        .join(User, User.id == TeamMember.user_id)
        .order_by(User.email)
    ):
        members.setdefault(team, []).append(email)
    services = dict(
        session.execute(select(Service.owner_team, func.count()).group_by(Service.owner_team)).all()
    )
    return [
        TeamRead(name=name, members=members.get(name, []), services=services.get(name, 0))
        for name in session.scalars(select(Team.name).order_by(Team.name))
    ]


def principal_for_user(session: Session, user: User, client_address: str = "") -> Principal:
    return Principal(
        kind="user",
        id=user.id,
        name=user.email,
        role=Role.parse(user.role),
        teams=frozenset(user_teams(session, user.id)),
        client_address=client_address,
    )


# ---------------------------------------------------------------------------------------------
# Signing in


def _record_failure(session: Session, email: str, address: str, reason: str) -> None:
    session.add(SignInFailure(email=email[:254], client_address=address, reason=reason))
    session.flush()


def authenticate(
    session: Session, settings: Settings, *, email: str, password: str, client_address: str
) -> User | None:
    """The user these credentials belong to, or None (and the failure recorded). The caller
    shows one message for every failure, so a guesser learns nothing about accounts."""
    now = utcnow()
    email = email.strip().lower()
    recent = session.scalar(
        select(func.count())
        .select_from(SignInFailure)
        .where(
            SignInFailure.client_address == client_address,
            SignInFailure.occurred_at > now - _ADDRESS_FAILURE_WINDOW,
        )
    )
    if (recent or 0) >= _ADDRESS_FAILURE_LIMIT:
        _record_failure(session, email, client_address, "too many attempts from this address")
        return None
    user = find_user(session, email)
    # Always verify (against a dummy hash when there is no account): equal time either way.
    matches = passwords.verify_password(user.password_hash if user else None, password[:1024])
    if user is None:
        _record_failure(session, email, client_address, "unknown account")
        return None
    if user.locked_until is not None and user.locked_until > now:
        _record_failure(session, email, client_address, "account locked")
        return None
    if not matches:
        user.failed_sign_ins += 1
        reason = "wrong password"
        if user.failed_sign_ins >= settings.sign_in_max_failures:
            user.locked_until = now + timedelta(minutes=settings.sign_in_lockout_minutes)
            user.failed_sign_ins = 0
            reason = "wrong password; account locked"
        _record_failure(session, email, client_address, reason)
        return None
    if user.disabled:
        _record_failure(session, email, client_address, "account disabled")
        return None
    user.failed_sign_ins, user.locked_until, user.last_sign_in_at = 0, None, now
    session.flush()
    return user


def list_failures(session: Session, limit: int = 100) -> list[SignInFailure]:
    return list(
        session.scalars(
            select(SignInFailure).order_by(SignInFailure.occurred_at.desc()).limit(limit)
        )
    )


def create_sign_in_link(session: Session, user: User, ttl: timedelta = SIGN_IN_LINK_TTL) -> str:
    """A one-time secret for ``/sign-in/link/<secret>``; only its digest is stored."""
    secret = secrets.token_urlsafe(32)
    session.add(SignInLink(token_hash=digest(secret), user_id=user.id, expires_at=utcnow() + ttl))
    session.flush()
    return secret


def redeem_sign_in_link(session: Session, secret: str, client_address: str) -> User | None:
    now = utcnow()
    # One UPDATE that only succeeds once: two tabs opening the link cannot both sign in.
    used = session.execute(
        update(SignInLink)
        .where(
            SignInLink.token_hash == digest(secret),
            SignInLink.used_at.is_(None),
            SignInLink.expires_at > now,
        )
        .values(used_at=now)
        .returning(SignInLink.user_id)
    ).first()
    if used is None:
        _record_failure(session, "(sign-in link)", client_address, "unknown, used or expired link")
        return None
    user = get_user(session, used.user_id)
    if user.disabled:
        _record_failure(session, user.email, client_address, "account disabled")
        return None
    user.last_sign_in_at = now
    session.flush()
    return user


def sign_in_oidc_user(
    session: Session,
    *,
    subject: str,
    email: str,
    display_name: str,
    role: str,
    teams: list[str],
) -> User:
    """The account for this OpenID identity, created on first sign-in; its role and teams
    follow the provider's claims at every sign-in (the provider is the source of truth)."""
    system = Principal.system("oidc")
    user = session.scalar(select(User).where(User.oidc_subject == subject))
    if user is None:
        user = find_user(session, email)
        if user is not None and user.password_hash is not None:
            # Taking over a local account because an identity provider asserts its address
            # would let whoever controls that provider's address sign in as an admin.
            raise ForbiddenError(
                f"{email} is a local account; an admin must link it to single sign-on"
            )
    if user is None:
        user = create_user(
            session,
            system,
            UserCreate(email=email, display_name=display_name, role=role, teams=teams),
        )
        user.oidc_subject = subject
    else:
        if user.disabled:
            raise ForbiddenError("this account is disabled")
        user.oidc_subject = subject
        update_user(
            session,
            system,
            user.id,
            UserUpdate(display_name=display_name or None, role=role, teams=teams),
        )
    user.last_sign_in_at = utcnow()
    session.flush()
    return user


# ---------------------------------------------------------------------------------------------
# Console sessions


def start_session(
    session: Session,
    settings: Settings,
    user: User,
    *,
    method: str,
    client_address: str,
    user_agent: str,
) -> str:
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            token_hash=digest(secret),
            user_id=user.id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(hours=settings.session_absolute_hours),
            method=method,
            client_address=client_address,
            user_agent=user_agent[:255],
        )
    )
    session.flush()
    return secret


def principal_for_session(
    session: Session, settings: Settings, secret: str, client_address: str
) -> tuple[Principal | None, bool]:
    """The signed-in person, and whether the session's last-seen time is due to be written
    (``touch_session``, in a write transaction of its own: checking a cookie stays a read)."""
    now = utcnow()
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == digest(secret))
    ).first()
    if row is None:
        return None, False
    web_session, user = row
    idle_limit = timedelta(minutes=settings.session_idle_minutes)
    if (
        web_session.revoked_at is not None
        or web_session.expires_at <= now
        or web_session.last_seen_at + idle_limit <= now
        or user.disabled
    ):
        return None, False
    principal = principal_for_user(session, user, client_address)
    principal = Principal(**{**principal.__dict__, "session_id": web_session.id})
    return principal, now - web_session.last_seen_at > _TOUCH_EVERY


def touch_session(session: Session, session_id: int) -> None:
    session.execute(
        update(WebSession).where(WebSession.id == session_id).values(last_seen_at=utcnow())
    )


def end_session(session: Session, secret: str) -> None:
    session.execute(
        update(WebSession)
        .where(WebSession.token_hash == digest(secret), WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def _revoke_sessions(session: Session, user_id: int) -> int:
    result = session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


def end_all_sessions(session: Session, actor: Principal, user_id: int) -> int:
    """Sign out everywhere: yourself, or (admins) anyone."""
    if not (actor.kind == "user" and actor.id == user_id):
        authorize(actor, Action.MANAGE_ACCESS)
    user = get_user(session, user_id)
    ended = _revoke_sessions(session, user_id)
    audit.record(
        session,
        actor,
        action="user.sign_out_everywhere",
        resource_kind=USER,
        resource_name=user.email,
        before=None,
        after={"sessions_ended": ended},
    )
    return ended


def revoke_session(session: Session, actor: Principal, session_id: int) -> None:
    row = session.get(WebSession, session_id)
    if row is None:
        raise NotFoundError(f"no session {session_id}")
    if not (actor.kind == "user" and actor.id == row.user_id):
        authorize(actor, Action.MANAGE_ACCESS)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        audit.record(
            session,
            actor,
            action="session.end",
            resource_kind=USER,
            resource_name=get_user(session, row.user_id).email,
            before=None,
            after={"session": row.id, "client_address": row.client_address},
        )


def list_sessions(
    session: Session, *, user_id: int | None = None, current: int | None = None
) -> list[SessionRead]:
    now = utcnow()
    query = (
        select(WebSession, User.email)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.revoked_at.is_(None), WebSession.expires_at > now)
        .order_by(WebSession.last_seen_at.desc())
    )
    if user_id is not None:
        query = query.where(WebSession.user_id == user_id)
    return [
        SessionRead(
            id=row.id,
            user=email,
            method=row.method,
            client_address=row.client_address,
            user_agent=row.user_agent,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            expires_at=row.expires_at,
            current=row.id == current,
        )
        for row, email in session.execute(query)
    ]


# ---------------------------------------------------------------------------------------------
# API and join tokens


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
