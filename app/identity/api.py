"""JSON API for people, teams, tokens and sessions. Reads of other people's records and every
write but your own tokens and sessions are for admins (checked in the service layer)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from fastapi.responses import Response

from app.deps import ActorDep, SessionDep
from app.identity import accounts, sessions, sign_in, tokens
from app.identity.principal import Action, authorize
from app.identity.schemas import (
    JoinTokenCreate,
    Me,
    SessionRead,
    SignInFailureRead,
    TeamRead,
    TokenCreate,
    TokenCreated,
    TokenRead,
    UserCreate,
    UserRead,
    UserUpdate,
)

router = APIRouter(prefix="/api/v1", tags=["identity"])

IdPath = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/me", response_model=Me, summary="Who this request acts as")
def me(actor: ActorDep) -> Me:
    return Me(
        kind=actor.kind,
        name=actor.actor,
        role=actor.role.label,
        teams=sorted(actor.teams),
    )


@router.get("/users", response_model=list[UserRead], summary="Users (admins)")
def list_users(session: SessionDep, actor: ActorDep) -> list[UserRead]:
    authorize(actor, Action.MANAGE_ACCESS)
    return accounts.list_users(session)


@router.post(
    "/users", response_model=UserRead, status_code=status.HTTP_201_CREATED, summary="Add a user"
)
def create_user(session: SessionDep, actor: ActorDep, data: UserCreate) -> UserRead:
    user = accounts.create_user(session, actor, data)
    return accounts.user_read(session, user)


@router.patch("/users/{user_id}", response_model=UserRead, summary="Change role, teams, status")
def update_user(
    session: SessionDep, actor: ActorDep, user_id: IdPath, data: UserUpdate
) -> UserRead:
    user = accounts.update_user(session, actor, user_id, data)
    return accounts.user_read(session, user)


@router.get("/teams", response_model=list[TeamRead], summary="Teams, members, services owned")
def list_teams(session: SessionDep, actor: ActorDep) -> list[TeamRead]:
    return accounts.list_teams(session)


@router.get("/tokens", response_model=list[TokenRead], summary="Your tokens (admins: all)")
def list_tokens(session: SessionDep, actor: ActorDep) -> list[TokenRead]:
    if actor.is_admin:
        return tokens.list_tokens(session)
    if actor.kind != "user":
        authorize(actor, Action.MANAGE_ACCESS)
    return tokens.list_tokens(session, owner_id=actor.id)


@router.post(
    "/tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an API token for yourself (the secret is in this answer only)",
)
def create_token(session: SessionDep, actor: ActorDep, data: TokenCreate) -> TokenCreated:
    created = tokens.create_api_token(session, actor, data)
    return TokenCreated(token=created.secret, details=tokens.token_read(created.row, actor.name))


@router.post(
    "/join-tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an agent join token for one namespace (admins)",
)
def create_join_token(session: SessionDep, actor: ActorDep, data: JoinTokenCreate) -> TokenCreated:
    created = tokens.create_join_token(session, actor, data)
    return TokenCreated(token=created.secret, details=tokens.token_read(created.row, None))


@router.delete(
    "/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke a token"
)
def revoke_token(session: SessionDep, actor: ActorDep, token_id: IdPath) -> Response:
    tokens.revoke_token(session, actor, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/sessions", response_model=list[SessionRead], summary="Your sessions (admins: all)")
def list_sessions(session: SessionDep, actor: ActorDep) -> list[SessionRead]:
    if actor.is_admin:
        return sessions.list_sessions(session, current=actor.session_id)
    if actor.kind != "user":
        authorize(actor, Action.MANAGE_ACCESS)
    return sessions.list_sessions(session, user_id=actor.id, current=actor.session_id)


@router.delete(
    "/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT, summary="End a session"
)
def end_session(session: SessionDep, actor: ActorDep, session_id: IdPath) -> Response:
    sessions.revoke_session(session, actor, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/sign-in-failures",
    response_model=list[SignInFailureRead],
    summary="Recent failed sign-ins (admins)",
)
def sign_in_failures(session: SessionDep, actor: ActorDep) -> list[SignInFailureRead]:
    authorize(actor, Action.MANAGE_ACCESS)
    return [SignInFailureRead.model_validate(row) for row in sign_in.list_failures(session)]
