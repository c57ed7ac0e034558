"""Single sign-on against a small OpenID provider started by each test (http.server on
127.0.0.1): discovery, a key set, an authorization endpoint that signs anyone in at once, and a
token endpoint that checks PKCE and the client's secret, then hands out an RSA-signed ID token
whose claims each test chooses."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.identity import passwords
from app.identity import sign_in as sign_in_service
from app.identity.models import SignInFailure, User
from app.identity.oidc import FLOW_COOKIE, role_from_claims

CLIENT_ID = "mesh-console"
CLIENT_SECRET = "console-secret-for-tests"


@pytest.fixture(scope="module")
def signing_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "provider-key-1"}, private=True)


@dataclass
class Grant:
    nonce: str
    challenge: str
    redirect_uri: str


@dataclass
class Provider:
    """What the provider puts in its next ID tokens; tests change ``claims`` between sign-ins."""

    key: RSAKey
    issuer: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    sign_with: RSAKey | None = None  # another key (same key id): a forged signature
    algorithm: str = "RS256"
    advertised_issuer: str = ""  # what discovery says, if not the real issuer
    grants: dict[str, Grant] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)

    def id_token(self, grant: Grant) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": "user-7f3a",
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            "email": "ada@example.com",
            "email_verified": True,
            "name": "Ada Lovelace",
            "groups": ["payments"],
            **self.claims,
        }
        claims = {name: value for name, value in claims.items() if value is not None}
        header = {"alg": self.algorithm, "kid": self.key.kid}
        registry = JWSRegistry(algorithms=[self.algorithm])
        return jwt.encode(header, claims, self.sign_with or self.key, registry=registry)


def _handler(provider: Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/.well-known/openid-configuration":
                self._json(
                    200,
                    {
                        "issuer": provider.advertised_issuer or provider.issuer,
                        "authorization_endpoint": f"{provider.issuer}/authorize",
                        "token_endpoint": f"{provider.issuer}/token",
                        "jwks_uri": f"{provider.issuer}/jwks",
                        "response_types_supported": ["code"],
                        "id_token_signing_alg_values_supported": [provider.algorithm],
                        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                    },
                )
            elif url.path == "/jwks":
                self._json(200, {"keys": [provider.key.as_dict(private=False)]})
            elif url.path == "/authorize":
                query = {name: values[0] for name, values in parse_qs(url.query).items()}
                provider.authorize_requests.append(query)
                code = secrets.token_urlsafe(16)
                provider.grants[code] = Grant(
                    nonce=query.get("nonce", ""),
                    challenge=query.get("code_challenge", ""),
                    redirect_uri=query["redirect_uri"],
                )
                back = urlencode({"code": code, "state": query.get("state", "")})
                self.send_response(302)
                self.send_header("Location", f"{query['redirect_uri']}?{back}")
                self.end_headers()
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {expected}":
                self._json(401, {"error": "invalid_client"})
                return
            grant = provider.grants.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            if (
                grant is None
                or form.get("grant_type") != "authorization_code"
                or form.get("redirect_uri") != grant.redirect_uri
                or challenge != grant.challenge
            ):
                self._json(400, {"error": "invalid_grant"})
                return
            self._json(
                200,
                {
                    "access_token": secrets.token_urlsafe(16),
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": provider.id_token(grant),
                },
            )

    return Handler


@pytest.fixture
def provider(signing_key: RSAKey) -> Iterator[Provider]:
    provider = Provider(key=signing_key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider))
    provider.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield provider
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _oidc_settings(tmp_path: Path, db_url: str, issuer: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        allowed_hosts=["testserver"],
        public_url="http://testserver",
        oidc_issuer=issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_admin_groups=["mesh-admins"],
        oidc_operator_groups=["payments"],
    )


@pytest.fixture
def browser(
    tmp_path: Path, db_url: str, database: Database, provider: Provider
) -> Iterator[TestClient]:
    """A browser that is not signed in, on a console set up for the test provider."""
    from app.main import create_app

    settings = _oidc_settings(tmp_path, db_url, provider.issuer)
    with TestClient(create_app(settings, database)) as test_client:
        yield test_client


def _to_provider(browser: TestClient, next_path: str = "/") -> str:
    """Start single sign-on; the address of the provider's page the console sends us to."""
    started = browser.get("/sign-in/oidc", params={"next": next_path}, follow_redirects=False)
    assert started.status_code == 303, started.text
    return started.headers["location"]


def _at_provider(authorize_url: str) -> str:
    """The provider signs us in at once: the console address it sends the browser back to."""
    answer = httpx.get(authorize_url, follow_redirects=False)
    assert answer.status_code == 302
    back = urlsplit(answer.headers["location"])
    assert back.netloc == "testserver"
    return f"{back.path}?{back.query}"


def sign_in(browser: TestClient, next_path: str = "/") -> httpx.Response:
    callback = _at_provider(_to_provider(browser, next_path))
    return browser.get(callback, follow_redirects=False)


def _me(browser: TestClient) -> httpx.Response:
    return browser.get("/api/v1/me")


def _failures(database: Database) -> list[str]:
    with database.session(write=False) as session:
        return list(session.scalars(select(SignInFailure.reason).order_by(SignInFailure.id)))


def _users(database: Database) -> list[User]:
    with database.session(write=False) as session:
        return list(session.scalars(select(User).order_by(User.id)))


def _local_account(database: Database, email: str) -> None:
    """An admin who signs in with a password."""
    with database.session(write=True) as session:
        session.add(
            User(
                email=email,
                role="admin",
                password_hash=passwords.hash_password("a long local password"),
            )
        )
        session.commit()


def test_first_sign_in_creates_the_account_with_role_and_teams_from_the_claims(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    provider.claims = {"groups": ["payments", "/checkout"]}

    answer = sign_in(browser, next_path="/services")

    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/services"
    me = _me(browser)
    assert me.status_code == 200
    assert me.json() == {
        "kind": "user",
        "name": "ada@example.com",
        "role": "operator",  # "payments" is an operator group
        "teams": ["checkout", "payments"],
    }
    [user] = _users(database)
    assert user.display_name == "Ada Lovelace"
    assert user.oidc_subject == f"{provider.issuer} user-7f3a"
    assert user.password_hash is None
    assert _failures(database) == []
    assert FLOW_COOKIE not in browser.cookies  # used once, then gone


def test_the_provider_is_asked_for_a_code_with_pkce_state_and_nonce_kept_out_of_sight(
    browser: TestClient, provider: Provider
) -> None:
    authorize = urlsplit(_to_provider(browser))
    query = {name: values[0] for name, values in parse_qs(authorize.query).items()}

    assert query["response_type"] == "code"
    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == "http://testserver/sign-in/oidc/callback"
    assert query["code_challenge_method"] == "S256"
    assert set(query["scope"].split()) >= {"openid", "email"}
    assert len(query["state"]) >= 32 and len(query["nonce"]) >= 32
    # The flow cookie is sealed: neither the state nor the nonce can be read from it.
    sealed = browser.cookies[FLOW_COOKIE]
    opened = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    for secret in (query["state"], query["nonce"]):
        assert secret not in sealed
        assert secret.encode() not in opened


def test_a_returning_persons_role_and_teams_follow_the_claims(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    _local_account(database, "root@example.com")  # so Ada is not the last admin at the end
    provider.claims = {"groups": ["payments"]}
    assert sign_in(browser).status_code == 303
    assert _me(browser).json()["role"] == "operator"

    browser.cookies.clear()
    provider.claims = {"groups": ["mesh-admins", "search"], "name": "Ada King"}
    assert sign_in(browser).status_code == 303
    me = _me(browser).json()
    assert (me["role"], me["teams"]) == ("admin", ["mesh-admins", "search"])

    browser.cookies.clear()
    provider.claims = {"groups": [], "name": "Ada King"}
    assert sign_in(browser).status_code == 303
    assert (_me(browser).json()["role"], _me(browser).json()["teams"]) == ("viewer", [])
    [_root, user] = _users(database)  # one account for Ada throughout
    assert user.display_name == "Ada King"


def test_a_changed_state_is_refused(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    callback = _at_provider(_to_provider(browser))
    path, _, query = callback.partition("?")
    params = {name: values[0] for name, values in parse_qs(query).items()}
    params["state"] = "attacker-" + params["state"][9:]

    answer = browser.get(f"{path}?{urlencode(params)}", follow_redirects=False)

    assert answer.status_code == 400
    assert "does not belong to the sign-in this browser started" in answer.text
    assert _me(browser).status_code == 401
    assert _users(database) == []
    assert _failures(database) == ["single sign-on: state mismatch"]


def test_an_answer_without_the_browsers_flow_cookie_is_refused(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    # Login CSRF: an attacker's own code and state, opened in the victim's browser.
    callback = _at_provider(_to_provider(browser))
    browser.cookies.clear()

    answer = browser.get(callback, follow_redirects=False)

    assert answer.status_code == 400
    assert "Start again" in answer.text
    assert _me(browser).status_code == 401
    assert _failures(database) == ["single sign-on: no or expired flow cookie"]


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"nonce": "a-nonce-from-another-sign-in"}, "nonce"),
        ({"aud": "some-other-application"}, "aud"),
        # Authorized for us (azp) but meant for another audience: only the aud check sees it.
        ({"aud": "some-other-application", "azp": CLIENT_ID}, "aud"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
        ({"iss": "https://impostor.example"}, "iss"),
    ],
    ids=["wrong-nonce", "wrong-audience", "wrong-audience-with-azp", "expired", "wrong-issuer"],
)
def test_an_id_token_that_fails_validation_is_refused(
    browser: TestClient,
    provider: Provider,
    database: Database,
    claims: dict[str, Any],
    problem: str,
) -> None:
    provider.claims = claims

    answer = sign_in(browser)

    assert answer.status_code == 401
    assert "did not pass validation" in answer.text
    assert problem in answer.text
    assert _me(browser).status_code == 401
    assert _users(database) == []
    [failure] = _failures(database)
    assert failure.startswith("single sign-on: invalid ID token")


def test_an_id_token_signed_with_another_key_is_refused(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    provider.sign_with = RSAKey.generate_key(2048, parameters={"kid": provider.key.kid})

    answer = sign_in(browser)

    assert answer.status_code == 401
    assert "signature" in answer.text
    assert _me(browser).status_code == 401
    assert _users(database) == []


def test_a_first_sign_in_that_loses_a_race_is_tried_again_not_a_server_error(
    browser: TestClient, provider: Provider, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tabs finishing the same person's first sign-in at once: the second one's insert
    hits the unique e-mail address the first just committed."""
    real = sign_in_service.sign_in_oidc_user
    calls: list[int] = []

    def lose_the_race_once(session: Session, **identity: Any) -> User:
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO users", {}, Exception("duplicate key"))
        return real(session, **identity)

    monkeypatch.setattr(sign_in_service, "sign_in_oidc_user", lose_the_race_once)

    assert sign_in(browser).status_code == 303
    assert len(calls) == 2
    assert _me(browser).json()["name"] == "ada@example.com"


def test_a_provider_signing_with_another_asymmetric_algorithm_is_understood(
    browser: TestClient, provider: Provider
) -> None:
    provider.algorithm = "PS256"  # RSASSA-PSS, as some providers are configured

    assert sign_in(browser).status_code == 303
    assert _me(browser).json()["name"] == "ada@example.com"


def test_an_unverified_email_address_is_refused(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    provider.claims = {"email_verified": False}

    answer = sign_in(browser)

    assert answer.status_code == 403
    assert "has not verified the address ada@example.com" in answer.text
    assert _users(database) == []


def test_a_local_password_account_with_the_same_address_is_not_taken_over(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    _local_account(database, "ada@example.com")
    provider.claims = {"groups": ["mesh-admins"]}

    answer = sign_in(browser)

    assert answer.status_code == 403
    assert "ada@example.com is a local account" in answer.text
    assert _me(browser).status_code == 401
    [user] = _users(database)
    assert user.oidc_subject is None
    assert _failures(database) == ["single sign-on: account refused"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_an_unreachable_provider_gives_a_clear_page_not_a_server_error(
    tmp_path: Path, db_url: str, database: Database
) -> None:
    from app.main import create_app

    settings = _oidc_settings(tmp_path, db_url, f"http://127.0.0.1:{_closed_port()}")
    with TestClient(create_app(settings, database)) as browser:
        answer = browser.get("/sign-in/oidc", follow_redirects=False)

    assert answer.status_code == 502
    assert "The single sign-on provider could not be reached" in answer.text
    assert 'action="/sign-in"' in answer.text  # the password form is still there
    assert _failures(database) == ["single sign-on: provider unreachable (discovery)"]


def test_a_discovery_document_of_another_issuer_is_not_trusted(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    provider.advertised_issuer = "https://impostor.example"

    answer = browser.get("/sign-in/oidc", follow_redirects=False)

    assert answer.status_code == 502
    assert "settings do not fit this console (it names another issuer)" in answer.text
    assert _failures(database) == ["single sign-on: provider not usable (discovery)"]


def test_a_provider_that_goes_away_during_the_sign_in_gives_a_clear_page(
    browser: TestClient, provider: Provider, database: Database
) -> None:
    callback = _at_provider(_to_provider(browser))
    provider.grants.clear()  # the provider restarted and forgot the code

    answer = browser.get(callback, follow_redirects=False)

    assert answer.status_code == 401
    assert "refused to complete the sign-in (invalid_grant)" in answer.text
    assert _me(browser).status_code == 401


def test_single_sign_on_is_absent_when_not_configured(bare_client: TestClient) -> None:
    assert "Sign in with single sign-on" not in bare_client.get("/sign-in").text
    assert bare_client.get("/sign-in/oidc", follow_redirects=False).status_code == 404
    assert bare_client.get("/sign-in/oidc/callback?code=x&state=y").status_code == 404


@pytest.mark.parametrize(
    ("claims", "role"),
    [
        ({"groups": ["mesh-admins", "payments"]}, "admin"),
        ({"groups": ["/payments"]}, "operator"),
        ({"groups": ["search"]}, "viewer"),
        ({"realm_access": {"roles": ["offline_access", "operator"]}}, "operator"),
        ({"realm_access": {"roles": ["viewer", "Admin"]}, "groups": []}, "admin"),
        ({"realm_access": {"roles": ["unknown"]}, "groups": ["mesh-admins"]}, "admin"),
    ],
)
def test_role_mapping(claims: dict[str, Any], role: str) -> None:
    settings = Settings(
        oidc_role_claim="realm_access.roles",
        oidc_admin_groups=["mesh-admins"],
        oidc_operator_groups=["payments"],
    )
    assert role_from_claims(settings, claims) == role
