"""Console pages: sign-in (password, one-time link, single sign-on), your account (password,
tokens, sessions) and, for admins, access (users, teams, tokens, sessions, failed sign-ins)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import ActorDep, SessionDep, SettingsDep
from app.errors import DomainError, InvalidError
from app.identity import accounts, passwords, sessions, tokens
from app.identity.auth import SESSION_COOKIE, SessionCookies, client_address, current_principal
from app.identity.models import User
from app.identity.principal import Action, Principal, authorize
from app.identity.schemas import JoinTokenCreate, TokenCreate, UserCreate, UserUpdate
from app.identity.sign_in import (
    SIGN_IN_REFUSED,
    authenticate,
    create_sign_in_link,
    list_failures,
    redeem_sign_in_link,
)
from app.web import FormDep, field_errors, flash, redirect, render, require_csrf_token

__all__ = ["public_router", "router", "safe_next", "sign_in_response"]

# Sign-in carries the CSRF token too: a forged sign-in form could otherwise sign a victim into
# the attacker's account ("login CSRF").
public_router = APIRouter(dependencies=[Depends(require_csrf_token)])
router = APIRouter(dependencies=[Depends(require_csrf_token)])


def safe_next(value: object) -> str:
    """Where to go after signing in: a path on this console only, never another site."""
    text = value if isinstance(value, str) else ""
    if not text.startswith("/") or text.startswith("//") or "\\" in text or len(text) > 2000:
        return "/"
    return text


def sign_in_response(
    request: Request,
    session: Session,
    settings: Settings,
    user: User,
    *,
    method: str,
    next_path: str,
) -> Response:
    secret = sessions.start_session(
        session,
        settings,
        user,
        method=method,
        client_address=client_address(request),
        user_agent=request.headers.get("user-agent", ""),
    )
    session.commit()
    cookies: SessionCookies = request.app.state.session_cookies
    response = RedirectResponse(safe_next(next_path), status_code=status.HTTP_303_SEE_OTHER)
    response.headers.append(
        "set-cookie",
        cookies.header(
            cookies.seal(secret),
            secure=request.url.scheme == "https",
            # A session cookie (no Max-Age): closing the browser ends it on the client side too.
            max_age=None,
        ),
    )
    return response


def _sign_in_page(
    request: Request, settings: Settings, *, next_path: str, error: str = "", status_code: int = 200
) -> Response:
    return render(
        request,
        "identity/sign_in.html",
        {
            "next_path": safe_next(next_path),
            "error": error,
            "email": "",
            "oidc": bool(settings.oidc_issuer),
        },
        status_code=status_code,
    )


@public_router.get("/sign-in")
def sign_in_form(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    if current_principal(request) is not None:
        return RedirectResponse(safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    return _sign_in_page(request, settings, next_path=next)


@public_router.post("/sign-in")
def sign_in(
    request: Request, session: SessionDep, settings: SettingsDep, form: FormDep
) -> Response:
    email, password = form.get("email"), form.get("password")
    next_path = safe_next(form.get("next"))
    user = None
    if isinstance(email, str) and isinstance(password, str) and email and password:
        user = authenticate(
            session,
            settings,
            email=email[:254],
            password=password,
            client_address=client_address(request),
        )
    if user is None:
        session.commit()  # the failure (and any lockout) is recorded even though we refuse
        return _sign_in_page(
            request,
            settings,
            next_path=next_path,
            error=SIGN_IN_REFUSED,
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    return sign_in_response(
        request, session, settings, user, method="password", next_path=next_path
    )


@public_router.get("/sign-in/link/{secret}")
def sign_in_with_link(
    request: Request, session: SessionDep, settings: SettingsDep, secret: str
) -> Response:
    user = redeem_sign_in_link(session, secret[:200], client_address(request))
    if user is None:
        session.commit()
        return _sign_in_page(
            request,
            settings,
            next_path="/",
            error="This sign-in link was already used or has expired. Ask an admin for a new one "
            "(meshctl user link EMAIL).",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    return sign_in_response(request, session, settings, user, method="link", next_path="/")


@public_router.post("/sign-out")
def sign_out(request: Request, session: SessionDep) -> Response:
    cookies: SessionCookies = request.app.state.session_cookies
    secret = cookies.open(request.cookies.get(SESSION_COOKIE))
    if secret is not None:
        sessions.end_session(session, secret)
    response = RedirectResponse("/sign-in", status_code=status.HTTP_303_SEE_OTHER)
    response.headers.append(
        "set-cookie",
        cookies.header("", secure=request.url.scheme == "https", max_age=0),
    )
    return response


# ---------------------------------------------------------------------------------------------
# Your account


def _account_page(
    request: Request,
    session: Session,
    actor: Principal,
    *,
    new_token: str = "",
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    is_user = actor.kind == "user"
    return render(
        request,
        "identity/account.html",
        {
            "section": "account",
            "me": accounts.user_read(session, accounts.get_user(session, actor.id or 0))
            if is_user
            else None,
            "tokens": tokens.list_tokens(session, owner_id=actor.id) if is_user else [],
            "sessions": sessions.list_sessions(session, user_id=actor.id, current=actor.session_id)
            if is_user
            else [],
            "new_token": new_token,
            "errors": errors or {},
        },
        status_code=status_code,
    )


def _form_dict(form: Any, *names: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in names:
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            values[name] = value.strip()
    return values


def _problems(exc: ValidationError | DomainError) -> dict[str, str]:
    if isinstance(exc, ValidationError):
        return field_errors(exc)
    if isinstance(exc, InvalidError):
        return {field: text for field, text in exc.issues}
    return {exc.field or "__all__": exc.message}


@router.get("/account")
def account(request: Request, session: SessionDep, actor: ActorDep) -> Response:
    return _account_page(request, session, actor)


@router.post("/account/tokens")
def create_my_token(
    request: Request, session: SessionDep, actor: ActorDep, form: FormDep
) -> Response:
    try:
        data = TokenCreate.model_validate(
            _form_dict(form, "name", "role", "team", "expires_in_days")
        )
        created = tokens.create_api_token(session, actor, data)
    except (ValidationError, DomainError) as exc:
        session.rollback()
        return _account_page(
            request,
            session,
            actor,
            errors=_problems(exc),
            status_code=status.HTTP_422_UNPROCESSABLE_ENTITY,
        )
    session.commit()
    return _account_page(request, session, actor, new_token=created.secret)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_my_token(
    request: Request, session: SessionDep, actor: ActorDep, token_id: int
) -> Response:
    row = tokens.revoke_token(session, actor, token_id)
    return flash(redirect(request, "/account"), f"Token {row.name} revoked.")


@router.post("/account/password")
def change_password(
    request: Request, session: SessionDep, actor: ActorDep, form: FormDep
) -> Response:
    current, new = form.get("current_password"), form.get("new_password")
    user = accounts.get_user(session, actor.id or 0) if actor.kind == "user" else None
    if user is None or not isinstance(current, str) or not isinstance(new, str):
        return _account_page(
            request, session, actor, errors={"new_password": "required"}, status_code=422
        )
    if user.password_hash is not None and not passwords.verify_password(
        user.password_hash, current
    ):
        return _account_page(
            request,
            session,
            actor,
            errors={"current_password": "this is not your current password"},
            status_code=422,
        )
    try:
        accounts.set_password(session, actor, user.id, new)
    except DomainError as exc:
        session.rollback()
        # The service speaks of "password"; on this form it is the new one.
        problems = {"new_password" if k == "password" else k: v for k, v in _problems(exc).items()}
        return _account_page(request, session, actor, errors=problems, status_code=422)
    return flash(redirect(request, "/account"), "Password changed.")


@router.post("/account/sign-out-everywhere")
def sign_out_everywhere(request: Request, session: SessionDep, actor: ActorDep) -> Response:
    sessions.end_all_sessions(session, actor, actor.id or 0)
    return redirect(request, "/sign-in")


@router.post("/account/sessions/{session_id}/end")
def end_my_session(
    request: Request, session: SessionDep, actor: ActorDep, session_id: int
) -> Response:
    sessions.revoke_session(session, actor, session_id)
    return flash(redirect(request, "/account"), "Session ended.")


# ---------------------------------------------------------------------------------------------
# Access (admins)


def _access_page(
    request: Request,
    session: Session,
    *,
    new_secret: str = "",
    new_secret_label: str = "",
    errors: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    return render(
        request,
        "identity/access.html",
        {
            "section": "access",
            "users": accounts.list_users(session),
            "teams": accounts.list_teams(session),
            "tokens": tokens.list_tokens(session),
            "sessions": sessions.list_sessions(session),
            "failures": list_failures(session, limit=50),
            "new_secret": new_secret,
            "new_secret_label": new_secret_label,
            "errors": errors or {},
            "values": values or {},
        },
        status_code=status_code,
    )


def _teams_field(form: Any) -> list[str]:
    value = form.get("teams")
    text = value if isinstance(value, str) else ""
    return [part.strip() for part in text.split(",") if part.strip()]


@router.get("/access")
def access(request: Request, session: SessionDep, actor: ActorDep) -> Response:
    authorize(actor, Action.MANAGE_ACCESS)
    return _access_page(request, session)


@router.post("/access/users")
def add_user(
    request: Request, session: SessionDep, settings: SettingsDep, actor: ActorDep, form: FormDep
) -> Response:
    authorize(actor, Action.MANAGE_ACCESS)
    values = _form_dict(form, "email", "display_name", "role", "password")
    try:
        data = UserCreate.model_validate({**values, "teams": _teams_field(form)})
        user = accounts.create_user(session, actor, data)
        link = "" if data.password else create_sign_in_link(session, user)
    except (ValidationError, DomainError) as exc:
        session.rollback()
        values.pop("password", None)
        return _access_page(request, session, errors=_problems(exc), values=values, status_code=422)
    session.commit()
    if not link:
        return flash(redirect(request, "/access"), f"{user.email} added.")
    return _access_page(
        request,
        session,
        new_secret=f"{settings.effective_public_url}/sign-in/link/{link}",
        new_secret_label=f"One-time sign-in link for {user.email} (valid 30 minutes)",
    )


@router.post("/access/users/{user_id}")
def edit_user(
    request: Request, session: SessionDep, actor: ActorDep, user_id: int, form: FormDep
) -> Response:
    values = _form_dict(form, "role")
    try:
        data = UserUpdate.model_validate(
            {**values, "teams": _teams_field(form), "disabled": form.get("disabled") == "on"}
        )
        user = accounts.update_user(session, actor, user_id, data)
    except (ValidationError, DomainError) as exc:
        session.rollback()
        problems = _problems(exc)
        return _access_page(
            request,
            session,
            errors={f"user-{user_id}": "; ".join(problems.values())},
            status_code=exc.status_code if isinstance(exc, DomainError) else 422,
        )
    return flash(redirect(request, "/access"), f"{user.email} updated.")


@router.post("/access/users/{user_id}/link")
def new_sign_in_link(
    request: Request, session: SessionDep, settings: SettingsDep, actor: ActorDep, user_id: int
) -> Response:
    authorize(actor, Action.MANAGE_ACCESS)
    user = accounts.get_user(session, user_id)
    link = create_sign_in_link(session, user)
    session.commit()
    return _access_page(
        request,
        session,
        new_secret=f"{settings.effective_public_url}/sign-in/link/{link}",
        new_secret_label=f"One-time sign-in link for {user.email} (valid 30 minutes)",
    )


@router.post("/access/join-tokens")
def add_join_token(
    request: Request, session: SessionDep, actor: ActorDep, form: FormDep
) -> Response:
    values = _form_dict(form, "name", "namespace", "expires_in_days")
    try:
        data = JoinTokenCreate.model_validate(values)
        created = tokens.create_join_token(session, actor, data)
    except (ValidationError, DomainError) as exc:
        session.rollback()
        return _access_page(
            request,
            session,
            errors={f"join_{k}": v for k, v in _problems(exc).items()},
            values={f"join_{k}": v for k, v in values.items()},
            status_code=exc.status_code if isinstance(exc, DomainError) else 422,
        )
    session.commit()
    return _access_page(
        request,
        session,
        new_secret=created.secret,
        new_secret_label=f"Join token {data.name} for namespace {data.namespace}",
    )


@router.post("/access/tokens/{token_id}/revoke")
def revoke_any_token(
    request: Request, session: SessionDep, actor: ActorDep, token_id: int
) -> Response:
    row = tokens.revoke_token(session, actor, token_id)
    return flash(redirect(request, "/access"), f"Token {row.name} revoked.")


@router.post("/access/sessions/{session_id}/end")
def end_any_session(
    request: Request, session: SessionDep, actor: ActorDep, session_id: int
) -> Response:
    sessions.revoke_session(session, actor, session_id)
    return flash(redirect(request, "/access"), "Session ended.")
