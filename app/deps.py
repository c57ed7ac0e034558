"""Annotated dependency aliases used by every route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database, session_scope
from app.identity.auth import require_principal
from app.identity.principal import Principal

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; it commits when the route returns and rolls back on error."""
    database = get_database(request)
    yield from session_scope(database, write=request.method not in _READ_METHODS)


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# scope="function": commit before the response leaves, so a client that saw 201 can read
# what it wrote on its very next request.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
# Who acts: a signed-in person or an API token; anyone else gets 401 (or the sign-in page).
ActorDep = Annotated[Principal, Depends(require_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
