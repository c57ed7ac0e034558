"""What the identity modules share: the digest stored in place of a secret (sign-in links,
sessions, tokens), how often last-seen times are written, and ending a person's sessions
(which disabling an account does too)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.identity.models import WebSession

# Writing last_seen/last_used on every request would make every read a write.
_TOUCH_EVERY = timedelta(seconds=60)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _revoke_sessions(session: Session, user_id: int) -> int:
    result = session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)
