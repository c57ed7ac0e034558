"""Signing in: passwords, one-time sign-in links and OpenID Connect accounts.

Sign-in itself is not audited (it would drown the changes people look for); sessions and the
failure log are where it shows.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.identity import passwords
from app.identity.accounts import create_user, find_user, get_user, update_user
from app.identity.common import digest
from app.identity.models import SignInFailure, SignInLink, User
from app.identity.principal import ForbiddenError, Principal
from app.identity.schemas import UserCreate, UserUpdate

SIGN_IN_LINK_TTL = timedelta(minutes=30)
# Per client address, whatever the account: a run over many accounts is slowed down too.
_ADDRESS_FAILURE_LIMIT = 30
_ADDRESS_FAILURE_WINDOW = timedelta(minutes=15)

SIGN_IN_REFUSED = "The e-mail address or password is not right, or the account is locked."


def record_failure(session: Session, email: str, address: str, reason: str) -> None:
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
        record_failure(session, email, client_address, "too many attempts from this address")
        return None
    user = find_user(session, email)
    # Always verify (against a dummy hash when there is no account): equal time either way.
    matches = passwords.verify_password(user.password_hash if user else None, password[:1024])
    if user is None:
        record_failure(session, email, client_address, "unknown account")
        return None
    if user.locked_until is not None and user.locked_until > now:
        record_failure(session, email, client_address, "account locked")
        return None
    if not matches:
        user.failed_sign_ins += 1
        reason = "wrong password"
        if user.failed_sign_ins >= settings.sign_in_max_failures:
            user.locked_until = now + timedelta(minutes=settings.sign_in_lockout_minutes)
            user.failed_sign_ins = 0
            reason = "wrong password; account locked"
        record_failure(session, email, client_address, reason)
        return None
    if user.disabled:
        record_failure(session, email, client_address, "account disabled")
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
        record_failure(session, "(sign-in link)", client_address, "unknown, used or expired link")
        return None
    user = get_user(session, used.user_id)
    if user.disabled:
        record_failure(session, user.email, client_address, "account disabled")
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
