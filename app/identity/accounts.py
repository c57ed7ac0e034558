"""People and teams: every write checks the actor's rights and leaves an audit event."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.catalog.models import Service
from app.db import utcnow
from app.errors import ConflictError, InvalidError, NotFoundError
from app.identity import passwords
from app.identity.common import _revoke_sessions
from app.identity.models import Team, TeamMember, User
from app.identity.principal import Action, Principal, Role, authorize
from app.identity.schemas import TeamRead, UserCreate, UserRead, UserUpdate
from app.identity.teams import ensure_team

USER = "user"


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
