"""OpenID Connect single sign-on: the authorization code flow with PKCE, state and nonce.

Authlib builds the protocol messages (the authorization URL, the PKCE challenge, the token
request and the client's authentication at the token endpoint) and checks the ID token's
claims (iss, aud, exp, nonce, azp, at_hash); joserfc, Authlib's JOSE library, verifies the
token's signature against the keys the provider publishes.

The flow's secrets (state, nonce, PKCE verifier) and where to go afterwards travel in a
short-lived cookie, encrypted and authenticated with a key derived from the console key: no
server-side store is needed (several workers can share the flow) and the browser can neither
read nor alter it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.auth import ClientAuth  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from authlib.oidc.core import CodeIDToken  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import APIRouter, Request, status
from fastapi.responses import RedirectResponse, Response
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from app.catalog.schemas import TeamName
from app.config import Settings
from app.db import Database
from app.deps import SettingsDep
from app.errors import DomainError
from app.identity import sign_in
from app.identity.auth import client_address, current_principal
from app.identity.models import User
from app.identity.principal import ROLE_NAMES, Role
from app.identity.web import safe_next, sign_in_response
from app.web import render

__all__ = [
    "FLOW_COOKIE",
    "OidcIdentity",
    "SingleSignOnError",
    "identity_from_claims",
    "oidc_router",
    "role_from_claims",
]

log = logging.getLogger(__name__)

oidc_router = APIRouter()

FLOW_COOKIE = "mesh_oidc_flow"
_FLOW_PATH = "/sign-in/oidc"  # the cookie goes to the start and callback routes only
FLOW_SECONDS = 600  # time to sign in at the provider, including a password manager's fumbling
_DISCOVERY_SECONDS = 3600
_KEY_REFRESH_SECONDS = 60  # an unknown key id refetches the key set at most this often
_CLOCK_LEEWAY_SECONDS = 60
_HTTP_TIMEOUT = httpx.Timeout(10.0)
_MAX_TEAMS = 50  # what UserCreate accepts
# Asymmetric signatures only: an HS256 token would be "signed" with the client secret, which
# the console also knows, and "none" is no signature at all.
_SIGNING_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "Ed25519",
    "EdDSA",  # Ed25519's older, less specific name (RFC 9864), still what most providers say
)
_UNKNOWN_EMAIL = "(single sign-on)"
_TRY_AGAIN = "Try again, or sign in with your password."


class SingleSignOnError(Exception):
    """A sign-in that cannot go on: shown on the sign-in page, recorded as a failure."""

    def __init__(self, message: str, *, reason: str, status_code: int, email: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = f"single sign-on: {reason}"[:63]
        self.status_code = status_code
        self.email = email


# ---------------------------------------------------------------------------------------------
# The provider: discovery and signing keys, cached


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    signing_algorithms: tuple[str, ...]
    token_auth_methods: tuple[str, ...]


def _unreachable(what: str, exc: Exception) -> SingleSignOnError:
    log.warning("single sign-on: %s failed: %s", what, exc)
    return SingleSignOnError(
        f"The single sign-on provider could not be reached ({what} failed). {_TRY_AGAIN}",
        reason=f"provider unreachable ({what})",
        status_code=status.HTTP_502_BAD_GATEWAY,
    )


def _not_usable(problem: str) -> SingleSignOnError:
    log.warning("single sign-on: the provider's discovery document is not usable: %s", problem)
    return SingleSignOnError(
        f"The single sign-on provider's settings do not fit this console ({problem}); an admin "
        f"should check MESH_OIDC_ISSUER. {_TRY_AGAIN}",
        reason="provider not usable (discovery)",
        status_code=status.HTTP_502_BAD_GATEWAY,
    )


def _get_json(url: str, what: str) -> dict[str, Any]:
    try:
        with httpx.Client(timeout=_HTTP_TIMEOUT) as http:
            answer = http.get(url, headers={"Accept": "application/json"})
        answer.raise_for_status()
        document = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise _unreachable(what, exc) from exc
    if not isinstance(document, dict):
        raise _unreachable(what, ValueError("not a JSON object"))
    return document


def _metadata_from(issuer: str, document: dict[str, Any]) -> ProviderMetadata:
    # OpenID Connect Discovery 1.0, section 4.3: the document must be the configured issuer's,
    # or a look-alike provider could hand out tokens for another issuer.
    if str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise _not_usable("it names another issuer")
    endpoints = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = document.get(name)
        if not isinstance(value, str) or not value.startswith(("https://", "http://")):
            raise _not_usable(f"no {name}")
        endpoints[name] = value
    algorithms = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    return ProviderMetadata(
        issuer=str(document["issuer"]),
        signing_algorithms=tuple(a for a in algorithms if a in _SIGNING_ALGORITHMS),
        token_auth_methods=tuple(str(m) for m in methods),
        **endpoints,
    )


class ProviderCache:
    """What the provider publishes, fetched on first use: the discovery document for an hour,
    the signing keys until a token names a key id they lack (the provider rotated its keys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metadata: dict[str, tuple[float, ProviderMetadata]] = {}
        self._keys: dict[str, tuple[float, KeySet]] = {}

    def metadata(self, issuer: str) -> ProviderMetadata:
        with self._lock:
            cached = self._metadata.get(issuer)
        if cached is not None and time.monotonic() - cached[0] < _DISCOVERY_SECONDS:
            return cached[1]
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        metadata = _metadata_from(issuer, _get_json(url, "discovery"))
        with self._lock:
            self._metadata[issuer] = (time.monotonic(), metadata)
        return metadata

    def keys(self, metadata: ProviderMetadata, *, refresh: bool = False) -> KeySet:
        with self._lock:
            cached = self._keys.get(metadata.jwks_uri)
        if cached is not None and (
            not refresh or time.monotonic() - cached[0] < _KEY_REFRESH_SECONDS
        ):
            return cached[1]
        document = _get_json(metadata.jwks_uri, "fetching the signing keys")
        try:
            key_set = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise _unreachable("reading the signing keys", exc) from exc
        with self._lock:
            self._keys[metadata.jwks_uri] = (time.monotonic(), key_set)
        return key_set


_CACHE_LOCK = threading.Lock()


def _providers(request: Request) -> ProviderCache:
    state = request.app.state
    with _CACHE_LOCK:
        cache: ProviderCache | None = getattr(state, "oidc_providers", None)
        if cache is None:
            cache = state.oidc_providers = ProviderCache()
    return cache


# ---------------------------------------------------------------------------------------------
# The flow cookie


@dataclass(frozen=True)
class Flow:
    state: str
    nonce: str
    verifier: str
    next_path: str
    started: int

    @classmethod
    def begin(cls, next_path: str) -> Flow:
        # 48 characters of [A-Za-z0-9]: within RFC 7636's 43..128 for the verifier.
        return cls(
            state=generate_token(32),
            nonce=generate_token(32),
            verifier=generate_token(48),
            next_path=next_path,
            started=int(time.time()),
        )


class FlowCookies:
    """Seals a ``Flow`` with AES-GCM under a key derived from the console key (HKDF), so a
    flow cookie can be neither read (the PKCE verifier stays secret) nor forged."""

    _CONTEXT = b"mesh-oidc-flow-v1"

    def __init__(self, console_key: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=self._CONTEXT).derive(
            console_key
        )
        self._aead = AESGCM(key)

    def seal(self, flow: Flow) -> str:
        nonce = secrets.token_bytes(12)
        plain = json.dumps(flow.__dict__, separators=(",", ":")).encode()
        sealed = nonce + self._aead.encrypt(nonce, plain, self._CONTEXT)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, cookie: str | None) -> Flow | None:
        if not cookie or len(cookie) > 4000:
            return None
        try:
            sealed = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            plain = self._aead.decrypt(sealed[:12], sealed[12:], self._CONTEXT)
            flow = Flow(**json.loads(plain))
        except (InvalidTag, ValueError, TypeError):
            return None
        if not 0 <= time.time() - flow.started <= FLOW_SECONDS:
            return None
        return flow


def _flow_cookies(request: Request) -> FlowCookies:
    state = request.app.state
    with _CACHE_LOCK:
        cookies: FlowCookies | None = getattr(state, "oidc_flow_cookies", None)
        if cookies is None:
            cookies = state.oidc_flow_cookies = FlowCookies(state.console_key)
    return cookies


def _flow_cookie_header(request: Request, value: str, max_age: int) -> tuple[str, str]:
    secure = "; Secure" if request.url.scheme == "https" else ""
    return (
        "set-cookie",
        f"{FLOW_COOKIE}={value}; Path={_FLOW_PATH}; Max-Age={max_age}; HttpOnly; "
        f"SameSite=Lax{secure}",
    )


# ---------------------------------------------------------------------------------------------
# From claims to an account


@dataclass(frozen=True)
class OidcIdentity:
    subject: str
    email: str
    display_name: str
    role: str
    teams: list[str]


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name reaches into objects (Keycloak's ``realm_access.roles``)
    unless a claim has that very name (URL-style names such as ``https://example.com/groups``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


_TEAM_NAME: TypeAdapter[str] = TypeAdapter(TeamName)


def teams_from_claims(settings: Settings, claims: dict[str, Any]) -> list[str]:
    """The teams claim's values that make valid team names (Keycloak's full group paths lose
    their leading slash); others are skipped rather than refusing the person."""
    teams: list[str] = []
    for group in _strings(_claim(claims, settings.oidc_teams_claim)):
        try:
            name = _TEAM_NAME.validate_python(group.removeprefix("/"))
        except ValidationError:
            log.info("single sign-on: group %r is not a usable team name; skipped", group)
            continue
        if name not in teams:
            teams.append(name)
    if len(teams) > _MAX_TEAMS:
        log.warning(
            "single sign-on: %d groups; only the first %d become teams", len(teams), _MAX_TEAMS
        )
    return sorted(teams[:_MAX_TEAMS])


def role_from_claims(settings: Settings, claims: dict[str, Any]) -> str:
    """The role claim's highest role if it names one; else admin groups > operator groups >
    viewer, matched against the teams claim."""
    if settings.oidc_role_claim:
        named = [
            Role.parse(value.lower())
            for value in _strings(_claim(claims, settings.oidc_role_claim))
            if value.lower() in ROLE_NAMES
        ]
        if named:
            return max(named).label
    listed = _strings(_claim(claims, settings.oidc_teams_claim))
    groups = set(listed) | {group.removeprefix("/") for group in listed}
    if groups & set(settings.oidc_admin_groups):
        return Role.ADMIN.label
    if groups & set(settings.oidc_operator_groups):
        return Role.OPERATOR.label
    return Role.VIEWER.label


def identity_from_claims(settings: Settings, claims: dict[str, Any]) -> OidcIdentity:
    email = claims.get("email")
    if not isinstance(email, str) or not email.strip():
        raise SingleSignOnError(
            "The identity provider did not share your e-mail address (the console needs the "
            "'email' scope).",
            reason="no email claim",
            status_code=status.HTTP_403_FORBIDDEN,
        )
    email = email.strip().lower()
    verified = claims.get("email_verified", True)
    if verified is not True and str(verified).lower() != "true":
        raise SingleSignOnError(
            f"The identity provider has not verified the address {email}; verify it there first.",
            reason="email not verified",
            status_code=status.HTTP_403_FORBIDDEN,
            email=email,
        )
    name = claims.get("name") or claims.get("preferred_username") or ""
    return OidcIdentity(
        # "issuer subject": a subject is unique only within its issuer.
        subject=f"{claims['iss']} {claims['sub']}",
        email=email,
        display_name=str(name).strip()[:255],
        role=role_from_claims(settings, claims),
        teams=teams_from_claims(settings, claims),
    )


# ---------------------------------------------------------------------------------------------
# The exchange: code → tokens → validated ID token


def _redirect_uri(settings: Settings) -> str:
    return f"{settings.effective_public_url}/sign-in/oidc/callback"


def _token_auth_method(settings: Settings, metadata: ProviderMetadata) -> str:
    if not settings.oidc_client_secret:
        return "none"  # a public client: PKCE alone binds the code to this browser's flow
    if "client_secret_basic" not in metadata.token_auth_methods and (
        "client_secret_post" in metadata.token_auth_methods
    ):
        return "client_secret_post"
    return "client_secret_basic"


def _exchange_code(
    settings: Settings, metadata: ProviderMetadata, code: str, flow: Flow
) -> dict[str, Any]:
    body = prepare_token_request(
        "authorization_code",
        code=code,
        redirect_uri=_redirect_uri(settings),
        code_verifier=flow.verifier,
    )
    client = ClientAuth(
        settings.oidc_client_id,
        settings.oidc_client_secret or None,
        _token_auth_method(settings, metadata),
    )
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    url, headers, body = client.prepare("POST", metadata.token_endpoint, headers, body)
    try:
        with httpx.Client(timeout=_HTTP_TIMEOUT) as http:
            answer = http.post(url, headers=headers, content=body)
    except httpx.HTTPError as exc:
        raise _unreachable("exchanging the code", exc) from exc
    try:
        document = answer.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise _unreachable("exchanging the code", ValueError(f"HTTP {answer.status_code}"))
    if answer.status_code != 200 or "error" in document:
        error = str(document.get("error", answer.status_code))[:40]
        raise SingleSignOnError(
            f"The identity provider refused to complete the sign-in ({error}). {_TRY_AGAIN}",
            reason=f"code exchange refused ({error})",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    if not isinstance(document.get("id_token"), str):
        raise SingleSignOnError(
            "The identity provider sent no ID token (is 'openid' among the scopes?).",
            reason="no id_token",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    return document


def _invalid_token(problem: str) -> SingleSignOnError:
    return SingleSignOnError(
        f"The identity provider's answer did not pass validation ({problem}). {_TRY_AGAIN}",
        reason=f"invalid ID token ({problem})",
        status_code=status.HTTP_401_UNAUTHORIZED,
    )


def validate_id_token(
    providers: ProviderCache,
    settings: Settings,
    metadata: ProviderMetadata,
    tokens: dict[str, Any],
    flow: Flow,
) -> dict[str, Any]:
    """The ID token's claims once its signature (the provider's published keys), issuer,
    audience, expiry and nonce have all checked out."""
    id_token: str = tokens["id_token"]
    # An explicit registry: joserfc's default admits only RS256, ES256 and HS256.
    registry = JWSRegistry(algorithms=list(metadata.signing_algorithms or ("RS256",)))
    try:
        try:
            token = jwt.decode(id_token, providers.keys(metadata), registry=registry)
        except InvalidKeyIdError:
            # A key id we do not know yet: the provider may have rotated its keys.
            token = jwt.decode(id_token, providers.keys(metadata, refresh=True), registry=registry)
    except JoseError as exc:
        raise _invalid_token(f"signature: {exc.error}") from exc
    claims = CodeIDToken(
        token.claims,
        token.header,
        {
            "iss": {"essential": True, "value": metadata.issuer},
            # Explicit: Authlib checks azp, but the audience only when asked to.
            "aud": {"essential": True, "value": settings.oidc_client_id},
        },
        {
            "nonce": flow.nonce,
            "client_id": settings.oidc_client_id,
            "access_token": tokens.get("access_token"),
        },
    )
    try:
        claims.validate(leeway=_CLOCK_LEEWAY_SECONDS)
    except JoseError as exc:
        raise _invalid_token(exc.description or exc.error) from exc
    if not isinstance(token.claims.get("sub"), str) or not token.claims["sub"]:
        raise _invalid_token("no subject")
    return dict(token.claims)


# ---------------------------------------------------------------------------------------------
# Routes


def _require_configured(settings: Settings) -> None:
    if not settings.oidc_issuer or not settings.oidc_client_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "single sign-on is not configured")


def record_failure(session: Session, request: Request, email: str, reason: str) -> None:
    """A failed single sign-on on the admins' page, next to failed password sign-ins."""
    # The service layer has no public function for this (yet): its private one keeps the
    # failure log written in one place.
    sign_in.record_failure(session, email or _UNKNOWN_EMAIL, client_address(request), reason)


def _refuse(
    request: Request, failure: SingleSignOnError, session: Session | None = None
) -> Response:
    if session is None:
        database: Database = request.app.state.database
        with database.session(write=True) as own_session:
            record_failure(own_session, request, failure.email, failure.reason)
            own_session.commit()
    else:
        record_failure(session, request, failure.email, failure.reason)
        session.commit()
    response = render(
        request,
        "identity/sign_in.html",
        {"next_path": "/", "error": failure.message, "email": "", "oidc": True},
        status_code=failure.status_code,
    )
    response.headers.append(*_flow_cookie_header(request, "", 0))
    return response


@oidc_router.get("/sign-in/oidc")
def start_single_sign_on(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    _require_configured(settings)
    next_path = safe_next(next)
    if current_principal(request) is not None:
        return RedirectResponse(next_path, status_code=status.HTTP_303_SEE_OTHER)
    try:
        metadata = _providers(request).metadata(settings.oidc_issuer)
    except SingleSignOnError as failure:
        return _refuse(request, failure)
    flow = Flow.begin(next_path)
    url = prepare_grant_uri(
        metadata.authorization_endpoint,
        client_id=settings.oidc_client_id,
        response_type="code",
        redirect_uri=_redirect_uri(settings),
        scope=settings.oidc_scopes,
        state=flow.state,
        nonce=flow.nonce,
        code_challenge=create_s256_code_challenge(flow.verifier),
        code_challenge_method="S256",
    )
    response = RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)
    sealed = _flow_cookies(request).seal(flow)
    response.headers.append(*_flow_cookie_header(request, sealed, FLOW_SECONDS))
    return response


def _validated_flow(request: Request) -> tuple[Flow, str]:
    """This browser's flow and the code the provider sent back, or why not."""
    flow = _flow_cookies(request).open(request.cookies.get(FLOW_COOKIE))
    if flow is None:
        raise SingleSignOnError(
            "This sign-in was started too long ago or in another browser. Start again.",
            reason="no or expired flow cookie",
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    state = request.query_params.get("state", "")
    if not secrets.compare_digest(
        hashlib.sha256(state.encode("utf-8", "surrogatepass")).digest(),
        hashlib.sha256(flow.state.encode()).digest(),
    ):
        raise SingleSignOnError(
            "This sign-in answer does not belong to the sign-in this browser started. Start again.",
            reason="state mismatch",
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    error = request.query_params.get("error")
    if error:
        error = error[:40]
        raise SingleSignOnError(
            f"The identity provider did not sign you in ({error}). {_TRY_AGAIN}",
            reason=f"provider said {error}",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    code = request.query_params.get("code", "")
    if not code or len(code) > 2000:
        raise SingleSignOnError(
            "The identity provider's answer carries no sign-in code. Start again.",
            reason="no code",
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    return flow, code


def _sign_in(session: Session, identity: OidcIdentity) -> User:
    try:
        return sign_in.sign_in_oidc_user(
            session,
            subject=identity.subject,
            email=identity.email,
            display_name=identity.display_name,
            role=identity.role,
            teams=identity.teams,
        )
    except DomainError as exc:
        raise SingleSignOnError(
            f"Single sign-on is not possible for this account: {exc.message}.",
            reason="account refused",
            status_code=status.HTTP_403_FORBIDDEN,
            email=identity.email,
        ) from exc
    except ValidationError as exc:
        fields = ", ".join(str(error["loc"][-1]) for error in exc.errors())
        raise SingleSignOnError(
            f"The identity provider's details for you are not usable here ({fields}).",
            reason="unusable claims",
            status_code=status.HTTP_403_FORBIDDEN,
            email=identity.email,
        ) from exc


@oidc_router.get("/sign-in/oidc/callback")
def finish_single_sign_on(request: Request, settings: SettingsDep) -> Response:
    _require_configured(settings)
    database: Database = request.app.state.database
    providers = _providers(request)
    # Everything that talks to the provider happens before the write transaction opens:
    # a slow provider must not hold the database's write lock.
    try:
        flow, code = _validated_flow(request)
        metadata = providers.metadata(settings.oidc_issuer)
        tokens = _exchange_code(settings, metadata, code, flow)
        claims = validate_id_token(providers, settings, metadata, tokens, flow)
        identity = identity_from_claims(settings, claims)
    except SingleSignOnError as failure:
        return _refuse(request, failure)
    for attempt in range(2):
        with database.session(write=True) as session:
            try:
                user = _sign_in(session, identity)
            except SingleSignOnError as failure:
                session.rollback()
                return _refuse(request, failure, session)
            except IntegrityError:
                # The same person's first sign-in in another tab (or a new team named by
                # someone else's) committed first; on a second try the rows are there.
                session.rollback()
                if attempt == 1:
                    raise
                continue
            response = sign_in_response(
                request, session, settings, user, method="oidc", next_path=flow.next_path
            )
        response.headers.append(*_flow_cookie_header(request, "", 0))
        return response
    raise AssertionError("unreachable")  # the loop returns or raises
