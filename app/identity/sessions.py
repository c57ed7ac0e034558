"""Console sessions: started at sign-in, checked on every request, ended by signing out or
for someone (``revoke_session``, ``end_all_sessions``), which leaves an audit event."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.config import Settings
from app.db import utcnow
from app.errors import NotFoundError
from app.identity.accounts import USER, get_user, principal_for_user
from app.identity.common import _TOUCH_EVERY, _revoke_sessions, digest
from app.identity.models import User, WebSession
from app.identity.principal import Action, Principal, authorize
from app.identity.schemas import SessionRead


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
