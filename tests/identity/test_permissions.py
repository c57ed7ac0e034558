"""The permission matrix: every write endpoint of the JSON API and of the console, against every
kind of caller, with the status each must get. A refused request must also leave no trace (no
audit event). A new write endpoint without a row here fails ``test_the_matrix_covers_*``."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.audit.models import AuditEvent
from app.catalog import service as catalog
from app.catalog.schemas import InstanceCreate, ServiceCreate, VersionCreate
from app.config import Settings
from app.db import Database, utcnow
from app.identity.accounts import create_user, find_user
from app.identity.common import digest
from app.identity.models import ApiToken, User, WebSession
from app.identity.principal import Principal
from app.identity.schemas import TokenCreate, UserCreate
from app.identity.sessions import start_session
from app.identity.tokens import create_api_token
from app.main import create_app
from tests.conftest import api_token, sign_in_as

TEAM = "orders"
SYSTEM = Principal.system("tests")

# Who calls. "own" is an operator of the team that owns the target, "other" an operator of
# another team.
CALLERS = ("anonymous", "expired", "revoked", "viewer", "other", "own", "admin")
PEOPLE = {
    "viewer": ("viewer@example.com", "viewer", ()),
    "other": ("other@example.com", "operator", ("payments",)),
    "own": ("own@example.com", "operator", (TEAM,)),
    "admin": ("boss@example.com", "admin", ()),
}

# Who may do what, per kind of endpoint.
TEAM_SCOPED = {"viewer": 403, "other": 403, "own": "ok", "admin": "ok"}
ADMIN_ONLY = {"viewer": 403, "other": 403, "own": 403, "admin": "ok"}
# People act for themselves (their own tokens and sessions); tokens cannot mint tokens.
TOKENS_MINT_NOTHING = {"viewer": 403, "other": 403, "own": 403, "admin": 403}


@dataclass(frozen=True)
class Target:
    """A service of team ``orders`` with versions v1 (one instance), v2 and v3 (none)."""

    name: str
    user_ids: dict[str, int]
    token_id: int
    session_id: int


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the route's path, as FastAPI lists it
    expected: dict[str, int | str]
    call: Callable[[TestClient, Target, str], Any]


def _own_target(database: Database, name: str) -> None:
    with database.session(write=True) as session:
        catalog.create_service(session, SYSTEM, data=ServiceCreate(name=name, owner_team=TEAM))
        for version in ("v1", "v2", "v3"):
            catalog.create_version(
                session, SYSTEM, namespace="default", name=name, data=VersionCreate(name=version)
            )
        catalog.create_instance(
            session,
            SYSTEM,
            namespace="default",
            name=name,
            data=InstanceCreate(address="127.0.0.1:9001", version="v1"),
        )
        session.commit()


def _victims(database: Database) -> tuple[dict[str, int], int, int]:
    """The viewer's id, and a token and a session of someone who is none of the callers: what
    the user, token and session endpoints act on."""
    with database.session(write=True) as session:
        ids = {
            who: session.scalar(select(User.id).where(User.email == email)) or 0
            for who, (email, _, _) in PEOPLE.items()
        }
        victim = find_user(session, "victim@example.com") or create_user(
            session, SYSTEM, UserCreate(email="victim@example.com")
        )
        token = create_api_token(session, SYSTEM, TokenCreate(name="victim"), owner=victim)
        start_session(
            session,
            Settings(),
            victim,
            method="password",
            client_address="127.0.0.1",
            user_agent="tests",
        )
        session.commit()
        session_id = session.scalar(select(func.max(WebSession.id))) or 0
        return ids, token.row.id, session_id


def _api(method: str, path: str) -> Callable[..., Callable[[TestClient, Target, str], Any]]:
    def with_body(
        body: Callable[[Target, str], Any] | None = None,
    ) -> Callable[[TestClient, Target, str], Any]:
        def call(client: TestClient, target: Target, who: str) -> Any:
            url = path.format(
                name=target.name,
                user_id=target.user_ids["viewer"],
                token_id=target.token_id,
                session_id=target.session_id,
                version="v3",
                address="127.0.0.1:9001",
            )
            kwargs = {"json": body(target, who)} if body is not None else {}
            return client.request(method, url, **kwargs)

        return call

    return with_body


S = "/api/v1/services/{name}"
API_ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/v1/services",
        TEAM_SCOPED,
        _api("POST", "/api/v1/services")(lambda t, who: {"name": f"new-{who}", "owner_team": TEAM}),
    ),
    Endpoint(
        "PATCH",
        "/api/v1/services/{name}",
        TEAM_SCOPED,
        _api("PATCH", S)(lambda t, who: {"revision": 1, "description": "changed"}),
    ),
    Endpoint("DELETE", "/api/v1/services/{name}", TEAM_SCOPED, _api("DELETE", S)()),
    Endpoint(
        "POST",
        "/api/v1/services/{name}/versions",
        TEAM_SCOPED,
        _api("POST", S + "/versions")(lambda t, who: {"name": "v9"}),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/services/{name}/versions/{version}",
        TEAM_SCOPED,
        _api("DELETE", S + "/versions/{version}")(),
    ),
    Endpoint(
        "POST",
        "/api/v1/services/{name}/instances",
        TEAM_SCOPED,
        _api("POST", S + "/instances")(
            lambda t, who: {"address": "127.0.0.1:9100", "version": "v1"}
        ),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/services/{name}/instances/{address}",
        TEAM_SCOPED,
        _api("DELETE", S + "/instances/{address}")(),
    ),
    Endpoint(
        "PUT",
        "/api/v1/services/{name}/traffic",
        TEAM_SCOPED,
        _api("PUT", S + "/traffic")(lambda t, who: {"revision": 0, "spec": {"timeout_ms": 900}}),
    ),
    Endpoint(
        "POST",
        "/api/v1/services/{name}/traffic/weights",
        TEAM_SCOPED,
        _api("POST", S + "/traffic/weights")(lambda t, who: {"weights": {"v1": 75, "v2": 25}}),
    ),
    Endpoint(
        "POST",
        "/api/v1/services/{name}/traffic/revert",
        TEAM_SCOPED,
        _api("POST", S + "/traffic/revert")(lambda t, who: {"revision": 0, "to": 0}),
    ),
    Endpoint(
        "PUT",
        "/api/v1/mesh/defaults",
        ADMIN_ONLY,
        _api("PUT", "/api/v1/mesh/defaults")(
            lambda t, who: {"revision": 0, "spec": {"timeout_ms": 1500}}
        ),
    ),
    Endpoint(
        "POST",
        "/api/v1/mesh/defaults/revert",
        ADMIN_ONLY,
        _api("POST", "/api/v1/mesh/defaults/revert")(lambda t, who: {"revision": 0, "to": 0}),
    ),
    Endpoint(
        "POST",
        "/api/v1/users",
        ADMIN_ONLY,
        _api("POST", "/api/v1/users")(lambda t, who: {"email": f"new-{who}@example.com"}),
    ),
    Endpoint(
        "PATCH",
        "/api/v1/users/{user_id}",
        ADMIN_ONLY,
        _api("PATCH", "/api/v1/users/{user_id}")(lambda t, who: {"display_name": who}),
    ),
    Endpoint(
        "POST",
        "/api/v1/tokens",
        TOKENS_MINT_NOTHING,
        _api("POST", "/api/v1/tokens")(lambda t, who: {"name": "more"}),
    ),
    Endpoint(
        "POST",
        "/api/v1/join-tokens",
        ADMIN_ONLY,
        _api("POST", "/api/v1/join-tokens")(lambda t, who: {"name": "j", "namespace": "default"}),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/tokens/{token_id}",
        ADMIN_ONLY,
        _api("DELETE", "/api/v1/tokens/{token_id}")(),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/sessions/{session_id}",
        ADMIN_ONLY,
        _api("DELETE", "/api/v1/sessions/{session_id}")(),
    ),
]

# Written by agents (join token) or the sign-in flow, not by people's credentials: covered by
# tests/agents, tests/telemetry and tests/identity/test_sign_in.py.
NOT_IN_THE_API_MATRIX = {
    ("POST", "/api/v1/agents"),
    ("DELETE", "/api/v1/agents/{agent_id}"),
    ("POST", "/api/v1/agents/{agent_id}/discovery"),
    ("POST", "/v1/traces"),
    ("POST", "/v1/metrics"),
}


def _write_routes(app: Any) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for included in app.router.routes:
        for route in getattr(getattr(included, "original_router", None), "routes", [included]):
            for method in getattr(route, "methods", set()) - {"GET", "HEAD", "OPTIONS"}:
                found.add((method, route.path))
    return found


@pytest.fixture
def app_and_db(settings: Settings, database: Database) -> tuple[Any, Database]:
    return create_app(settings, database), database


def _events(database: Database) -> int:
    with database.session(write=False) as session:
        return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


def _credentials(database: Database) -> dict[str, str]:
    tokens = {
        who: api_token(database, email, role=role, teams=teams)
        for who, (email, role, teams) in PEOPLE.items()
    }
    tokens["expired"] = api_token(database, "boss@example.com", role="admin")
    tokens["revoked"] = api_token(database, "boss@example.com", role="admin")
    with database.session(write=True) as session:
        for who, column in (("expired", "expires_at"), ("revoked", "revoked_at")):
            session.execute(
                update(ApiToken)
                .where(ApiToken.token_hash == digest(tokens[who]))
                .values({column: utcnow() - timedelta(minutes=1)})
            )
        session.commit()
    return tokens


def test_the_matrix_covers_every_write_endpoint_of_the_api(
    app_and_db: tuple[Any, Database],
) -> None:
    app, _ = app_and_db
    api_writes = {(m, p) for m, p in _write_routes(app) if p.startswith(("/api/", "/v1/"))}
    covered = {(e.method, e.path) for e in API_ENDPOINTS} | NOT_IN_THE_API_MATRIX
    assert api_writes == covered


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", API_ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_api_permission_matrix(app_and_db: tuple[Any, Database], endpoint: Endpoint) -> None:
    app, database = app_and_db
    tokens = _credentials(database)
    user_ids, token_id, session_id = _victims(database)
    with TestClient(app) as client:
        for who in CALLERS:
            name = f"svc-{who}"
            _own_target(database, name)
            target = Target(name, user_ids, token_id, session_id)
            headers = {} if who == "anonymous" else {"Authorization": f"Bearer {tokens[who]}"}
            client.headers.clear()
            client.headers.update(headers)
            before = _events(database)
            response = endpoint.call(client, target, who)
            expected = endpoint.expected.get(who, 401)
            if expected == "ok":
                assert response.status_code < 300, (who, response.status_code, response.text)
                assert _events(database) > before, f"{who}: a change with no audit event"
            else:
                assert response.status_code == expected, (who, response.status_code, response.text)
                assert _events(database) == before, f"{who}: a refused request left an event"
                if expected == 403:
                    assert response.json()["detail"], "a 403 says why"


# ---------------------------------------------------------------------------------------------
# The console: the same rules through the forms (sessions and CSRF tokens, as a browser).


def _form(path: str, fields: Callable[[Target, str], dict[str, str]]) -> Callable[..., Any]:
    def call(client: TestClient, target: Target, who: str) -> Any:
        page = client.get("/services").text
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        token = match.group(1) if match else ""
        data = {"csrf_token": token, **fields(target, who)}
        url = path.format(
            name=target.name,
            user_id=target.user_ids["viewer"],
            token_id=target.token_id,
            session_id=target.session_id,
        )
        return client.post(
            url,
            data=data,
            headers={"Referer": "http://testserver/services", "Accept": "text/html"},
            follow_redirects=False,
        )

    return call


C = "/services/default/{name}"
POLICY = "timeout_ms: 900\n"
CONSOLE_ENDPOINTS = [
    Endpoint(
        "POST",
        "/services/new",
        TEAM_SCOPED,
        _form(
            "/services/new",
            lambda t, who: {"namespace": "default", "name": f"new-{who}", "owner_team": TEAM},
        ),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/edit",
        TEAM_SCOPED,
        _form(
            C + "/edit",
            lambda t, who: {
                "namespace": "default",
                "name": t.name,
                "owner_team": TEAM,
                "description": "changed",
                "revision": "1",
            },
        ),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/delete",
        TEAM_SCOPED,
        _form(C + "/delete", lambda t, who: {"revision": "1"}),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/versions",
        TEAM_SCOPED,
        _form(C + "/versions", lambda t, who: {"name": "v9"}),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/traffic/weights",
        TEAM_SCOPED,
        _form(
            C + "/traffic/weights",
            lambda t, who: {"candidate": "v2", "share": "25", "action": "apply", "revision": "0"},
        ),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/traffic",
        TEAM_SCOPED,
        _form(C + "/traffic", lambda t, who: {"spec": POLICY, "revision": "0"}),
    ),
    Endpoint(
        "POST",
        "/services/{namespace}/{name}/traffic/revert",
        TEAM_SCOPED,
        _form(C + "/traffic/revert", lambda t, who: {"to": "0", "revision": "0"}),
    ),
    Endpoint(
        "POST",
        "/mesh/defaults",
        ADMIN_ONLY,
        _form("/mesh/defaults", lambda t, who: {"spec": POLICY, "revision": "0"}),
    ),
    Endpoint(
        "POST",
        "/mesh/defaults/revert",
        ADMIN_ONLY,
        _form("/mesh/defaults/revert", lambda t, who: {"to": "0", "revision": "0"}),
    ),
    Endpoint(
        "POST",
        "/access/users",
        ADMIN_ONLY,
        _form(
            "/access/users", lambda t, who: {"email": f"new-{who}@example.com", "role": "viewer"}
        ),
    ),
    Endpoint(
        "POST",
        "/access/users/{user_id}",
        ADMIN_ONLY,
        _form("/access/users/{user_id}", lambda t, who: {"role": "viewer", "teams": "search"}),
    ),
    Endpoint(
        "POST",
        "/access/users/{user_id}/link",
        ADMIN_ONLY,
        _form("/access/users/{user_id}/link", lambda t, who: {}),
    ),
    Endpoint(
        "POST",
        "/access/join-tokens",
        ADMIN_ONLY,
        _form("/access/join-tokens", lambda t, who: {"name": "j", "namespace": "default"}),
    ),
    Endpoint(
        "POST",
        "/access/tokens/{token_id}/revoke",
        ADMIN_ONLY,
        _form("/access/tokens/{token_id}/revoke", lambda t, who: {}),
    ),
    Endpoint(
        "POST",
        "/access/sessions/{session_id}/end",
        ADMIN_ONLY,
        _form("/access/sessions/{session_id}/end", lambda t, who: {}),
    ),
]

# Previews store nothing; sign-in, sign-out and "your account" act on the caller's own account
# (tests/identity/test_sign_in.py); a sign-in link for a user is not an audited change, so it
# is covered above by status only.
NOT_IN_THE_CONSOLE_MATRIX = {
    ("POST", "/services/{namespace}/{name}/traffic/preview"),
    ("POST", "/mesh/defaults/preview"),
    ("POST", "/sign-in"),
    ("POST", "/sign-out"),
    ("POST", "/account/tokens"),
    ("POST", "/account/tokens/{token_id}/revoke"),
    ("POST", "/account/password"),
    ("POST", "/account/sign-out-everywhere"),
    ("POST", "/account/sessions/{session_id}/end"),
}
UNAUDITED = {"/access/users/{user_id}/link"}
CONSOLE_CALLERS = ("anonymous", "viewer", "other", "own", "admin")


def test_the_matrix_covers_every_write_endpoint_of_the_console(
    app_and_db: tuple[Any, Database],
) -> None:
    app, _ = app_and_db
    html_writes = {(m, p) for m, p in _write_routes(app) if not p.startswith(("/api/", "/v1/"))}
    covered = {(e.method, e.path) for e in CONSOLE_ENDPOINTS} | NOT_IN_THE_CONSOLE_MATRIX
    assert html_writes == covered


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", CONSOLE_ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_console_permission_matrix(app_and_db: tuple[Any, Database], endpoint: Endpoint) -> None:
    app, database = app_and_db
    with TestClient(app) as browser:
        cookies: dict[str, dict[str, str]] = {"anonymous": {}}
        for who in CONSOLE_CALLERS[1:]:
            email, role, teams = PEOPLE[who]
            browser.cookies.clear()
            sign_in_as(browser, database, email, role=role, teams=teams)
            cookies[who] = dict(browser.cookies)
        user_ids, token_id, session_id = _victims(database)
        for who in CONSOLE_CALLERS:
            name = f"svc-{who}"
            _own_target(database, name)
            target = Target(name, user_ids, token_id, session_id)
            browser.cookies.clear()
            browser.cookies.update(cookies[who])
            before = _events(database)
            response = endpoint.call(browser, target, who)
            if who == "anonymous":
                assert response.status_code == 303, response.text
                assert response.headers["location"].startswith("/sign-in?next=")
                assert _events(database) == before
                continue
            expected = endpoint.expected[who]
            if expected == "ok":
                assert response.status_code < 400, (who, response.status_code, response.text[:500])
                if endpoint.path not in UNAUDITED:
                    assert _events(database) > before, f"{who}: a change with no audit event"
            else:
                assert response.status_code == expected, (who, response.status_code)
                assert _events(database) == before, f"{who}: a refused request left an event"
