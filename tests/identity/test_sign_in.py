"""Signing in and out, sessions and tokens, as a person and a program would notice them."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from app.audit.models import AuditEvent
from app.cli import bootstrap_sign_in, cli
from app.config import Settings
from app.db import Database, utcnow
from app.errors import ConflictError
from app.identity import passwords
from app.identity.accounts import create_user, find_user, update_user
from app.identity.common import digest
from app.identity.models import ApiToken, SignInFailure, SignInLink, User, WebSession
from app.identity.principal import Principal
from app.identity.schemas import UserCreate, UserUpdate
from app.identity.sign_in import create_sign_in_link, list_failures
from app.main import create_app
from tests.conftest import ADMIN_EMAIL, api_token, sign_in_as

PASSWORD = "correct horse battery staple"
REFUSED = "The e-mail address or password is not right, or the account is locked."
HTML = {"Accept": "text/html"}


@pytest.fixture
def browser(bare_client: TestClient, database: Database) -> TestClient:
    """A browser on the sign-in page (it holds the CSRF cookie), with an account to sign in to."""
    with database.session(write=True) as session:
        create_user(
            session,
            Principal.system("tests"),
            UserCreate(
                email="ada@example.com", role="operator", teams=["orders"], password=PASSWORD
            ),
        )
        session.commit()
    bare_client.headers["Referer"] = "http://testserver/sign-in"
    return bare_client


def sign_in(client: TestClient, email: str, password: str) -> object:
    page = client.get("/sign-in").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    return client.post(
        "/sign-in",
        data={
            "email": email,
            "password": password,
            "csrf_token": token.group(1),
            "next": "/topology",
        },
        follow_redirects=False,
    )


def signed_in_as(client: TestClient) -> str | None:
    answer = client.get("/api/v1/me")
    return answer.json()["name"] if answer.status_code == 200 else None


def test_a_console_page_sends_a_stranger_to_sign_in_and_back(browser: TestClient) -> None:
    answer = browser.get("/services?page=2", headers=HTML, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/sign-in?next=/services?page=2"
    assert browser.get("/api/v1/services").status_code == 401


def test_the_right_password_signs_in_with_a_private_cookie(browser: TestClient) -> None:
    answer = sign_in(browser, "Ada@Example.com", PASSWORD)
    assert answer.status_code == 303  # type: ignore[attr-defined]
    assert answer.headers["location"] == "/topology"  # type: ignore[attr-defined]
    cookie = answer.headers["set-cookie"]  # type: ignore[attr-defined]
    assert "mesh_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert signed_in_as(browser) == "ada@example.com"


def test_wrong_password_and_unknown_account_get_the_same_answer(
    browser: TestClient, database: Database
) -> None:
    wrong = sign_in(browser, "ada@example.com", "not the password")
    unknown = sign_in(browser, "nobody@example.com", PASSWORD)
    for answer in (wrong, unknown):
        assert answer.status_code == 401  # type: ignore[attr-defined]
        assert REFUSED in answer.text  # type: ignore[attr-defined]
    assert signed_in_as(browser) is None
    with database.session(write=False) as session:
        reasons = [f.reason for f in list_failures(session)]
    assert sorted(reasons) == ["unknown account", "wrong password"]


def test_repeated_failures_lock_the_account_even_for_the_right_password(
    browser: TestClient, database: Database, settings: Settings
) -> None:
    for _ in range(settings.sign_in_max_failures):
        assert sign_in(browser, "ada@example.com", "guess").status_code == 401  # type: ignore[attr-defined]
    locked = sign_in(browser, "ada@example.com", PASSWORD)
    assert locked.status_code == 401  # type: ignore[attr-defined]
    assert REFUSED in locked.text  # type: ignore[attr-defined]
    assert signed_in_as(browser) is None
    # The lockout ends on its own.
    with database.session(write=True) as session:
        session.execute(update(User).values(locked_until=utcnow() - timedelta(seconds=1)))
        session.commit()
    assert sign_in(browser, "ada@example.com", PASSWORD).status_code == 303  # type: ignore[attr-defined]


def test_the_sign_in_form_needs_its_csrf_token(browser: TestClient) -> None:
    answer = browser.post(
        "/sign-in", data={"email": "ada@example.com", "password": PASSWORD}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert signed_in_as(browser) is None


def test_only_paths_of_this_console_are_followed_after_sign_in(browser: TestClient) -> None:
    page = browser.get("/sign-in").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    answer = browser.post(
        "/sign-in",
        data={
            "email": "ada@example.com",
            "password": PASSWORD,
            "csrf_token": token.group(1),
            "next": "//evil.example/phish",
        },
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/"


@pytest.mark.parametrize("expiry", ["idle", "absolute", "revoked"])
def test_an_ended_session_is_refused(
    browser: TestClient, database: Database, settings: Settings, expiry: str
) -> None:
    sign_in(browser, "ada@example.com", PASSWORD)
    assert signed_in_as(browser) == "ada@example.com"
    past = utcnow() - timedelta(seconds=1)
    changes = {
        "idle": {"last_seen_at": past - timedelta(minutes=settings.session_idle_minutes)},
        "absolute": {"expires_at": past},
        "revoked": {"revoked_at": past},
    }[expiry]
    with database.session(write=True) as session:
        session.execute(update(WebSession).values(**changes))
        session.commit()
    assert signed_in_as(browser) is None


def test_sign_out_ends_the_session_for_good(browser: TestClient) -> None:
    sign_in(browser, "ada@example.com", PASSWORD)
    stolen = browser.cookies["mesh_session"]
    page = browser.get("/account").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    out = browser.post("/sign-out", data={"csrf_token": token.group(1)}, follow_redirects=False)
    assert out.status_code == 303
    assert signed_in_as(browser) is None
    browser.cookies.set("mesh_session", stolen)  # replaying the old cookie does not work
    assert signed_in_as(browser) is None


def test_sign_out_everywhere_ends_every_session_of_the_person(
    settings: Settings, database: Database, browser: TestClient
) -> None:
    app = browser.app
    with TestClient(app) as laptop, TestClient(app) as phone:
        for device in (laptop, phone):
            device.headers["Referer"] = "http://testserver/account"
            sign_in(device, "ada@example.com", PASSWORD)
            assert signed_in_as(device) == "ada@example.com"
        token = re.search(r'name="csrf_token" value="([^"]+)"', laptop.get("/account").text)
        assert token
        laptop.post("/account/sign-out-everywhere", data={"csrf_token": token.group(1)})
        assert signed_in_as(laptop) is None
        assert signed_in_as(phone) is None


def test_a_forged_session_cookie_is_refused(browser: TestClient) -> None:
    sign_in(browser, "ada@example.com", PASSWORD)
    secret, mac = browser.cookies["mesh_session"].split(".")
    # The last character changed to one it is not (a fixed "A" matched it 1 time in 64).
    forged_last = "B" if secret.endswith("A") else "A"
    browser.cookies.set("mesh_session", f"{secret[:-1]}{forged_last}.{mac}")
    assert signed_in_as(browser) is None


def test_a_sign_in_link_works_once_and_not_after_it_expires(
    bare_client: TestClient, database: Database
) -> None:
    with database.session(write=True) as session:
        user = find_user(session, "ada@example.com") or create_user(
            session, Principal.system("tests"), UserCreate(email="ada@example.com")
        )
        fresh = create_sign_in_link(session, user)
        stale = create_sign_in_link(session, user, ttl=timedelta(seconds=-1))
        session.commit()
    assert bare_client.get(f"/sign-in/link/{fresh}", follow_redirects=False).status_code == 303
    assert signed_in_as(bare_client) == "ada@example.com"
    bare_client.cookies.clear()
    for used_or_stale in (fresh, stale):
        answer = bare_client.get(f"/sign-in/link/{used_or_stale}", follow_redirects=False)
        assert answer.status_code == 401
        assert "already used or has expired" in answer.text
        assert signed_in_as(bare_client) is None
    with database.session(write=False) as session:
        stored = session.scalars(select(SignInLink.token_hash)).all()
    assert fresh not in stored  # only digests are kept


def test_passwords_are_stored_as_argon2id_hashes(browser: TestClient, database: Database) -> None:
    with database.session(write=False) as session:
        stored = session.scalar(select(User.password_hash).where(User.email == "ada@example.com"))
    assert stored and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert passwords.verify_password(stored, PASSWORD)
    assert not passwords.verify_password(stored, PASSWORD + "!")


# ---------------------------------------------------------------------------------------------
# API tokens


def test_a_token_is_shown_once_stored_hashed_and_revocable(
    client: TestClient, database: Database
) -> None:
    created = client.post("/api/v1/tokens", json={"name": "ci", "role": "operator"})
    assert created.status_code == 201
    secret = created.json()["token"]
    assert secret.startswith("mesh_")
    with database.session(write=False) as session:
        hashes = session.scalars(select(ApiToken.token_hash)).all()
    assert secret not in hashes and digest(secret) in hashes
    listed = client.get("/api/v1/tokens").json()
    assert all("token" not in item for item in listed)

    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(client.app) as program:
        assert program.get("/api/v1/me", headers=headers).json()["role"] == "operator"
        token_id = created.json()["details"]["id"]
        assert client.delete(f"/api/v1/tokens/{token_id}").status_code == 204
        assert program.get("/api/v1/me", headers=headers).status_code == 401


def test_a_token_has_at_most_its_owners_rights_even_after_a_demotion(
    client: TestClient, database: Database
) -> None:
    secret = api_token(database, "ops@example.com", role="admin")
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(client.app) as program:
        assert program.get("/api/v1/users", headers=headers).status_code == 200
        with database.session(write=True) as session:
            user = find_user(session, "ops@example.com")
            assert user
            update_user(session, Principal.system("tests"), user.id, UserUpdate(role="viewer"))
            session.commit()
        refused = program.get("/api/v1/users", headers=headers)
        assert refused.status_code == 403
        assert "only admins" in refused.json()["detail"]
    over = client.post("/api/v1/tokens", json={"name": "x", "role": "admin"})
    assert over.status_code == 201  # the admin may; an operator may not:
    with TestClient(client.app) as operator_browser:
        sign_in_as(operator_browser, database, "op@example.com", role="operator")
        operator_browser.headers["Referer"] = "http://testserver/account"
        too_much = operator_browser.post("/api/v1/tokens", json={"name": "x", "role": "admin"})
        assert too_much.status_code == 422
        assert too_much.json()["errors"][0]["field"] == "role"


def test_meshctl_reads_its_token_from_the_environment_or_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.identity.cli_token import TokenFileError, auth_headers

    monkeypatch.delenv("MESH_TOKEN", raising=False)
    token_file = tmp_path / "token"
    monkeypatch.setenv("MESH_TOKEN_FILE", str(token_file))
    assert auth_headers() == {}
    token_file.write_text("mesh_fromfile\n")
    token_file.chmod(0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        auth_headers()
    token_file.chmod(0o600)
    assert auth_headers() == {"Authorization": "Bearer mesh_fromfile"}
    monkeypatch.setenv("MESH_TOKEN", "mesh_fromenv")
    assert auth_headers() == {"Authorization": "Bearer mesh_fromenv"}


# ---------------------------------------------------------------------------------------------
# Who acted, in the audit log


def test_every_change_names_its_real_actor_and_client_address(
    client: TestClient, database: Database
) -> None:
    client.post("/api/v1/services", json={"name": "by-session", "owner_team": "t"})
    secret = api_token(database, ADMIN_EMAIL)
    with TestClient(client.app) as program:
        program.post(
            "/api/v1/services",
            json={"name": "by-token", "owner_team": "t"},
            headers={"Authorization": f"Bearer {secret}"},
        )
    with database.session(write=False) as session:
        events = {e.resource_name: e for e in session.scalars(select(AuditEvent)).all()}
        admin_id = session.scalar(select(User.id).where(User.email == ADMIN_EMAIL))
        token_id = session.scalar(select(ApiToken.id).where(ApiToken.token_hash == digest(secret)))
    by_session, by_token = events["default/by-session"], events["default/by-token"]
    assert (by_session.actor, by_session.actor_id) == (ADMIN_EMAIL, f"user:{admin_id}")
    assert (by_token.actor, by_token.actor_id) == (
        f"{ADMIN_EMAIL} (token tests)",
        f"token:{token_id}",
    )
    assert by_session.client_address == by_token.client_address == "testclient"
    assert client.get("/api/v1/audit/verify").json()["ok"] is True


# ---------------------------------------------------------------------------------------------
# No default password, ever


def test_the_first_start_creates_an_admin_with_a_one_time_link_only(
    settings: Settings, database: Database
) -> None:
    link = bootstrap_sign_in(settings, database)
    assert link and "/sign-in/link/" in link
    assert bootstrap_sign_in(settings, database) is None  # only on an empty user table
    with database.session(write=False) as session:
        admin = find_user(session, settings.initial_admin_email)
    assert admin and admin.role == "admin" and admin.password_hash is None
    with TestClient(create_app(settings, database)) as browser:
        path = "/sign-in/link/" + link.rsplit("/sign-in/link/", 1)[1]
        assert browser.get(path, follow_redirects=False).status_code == 303
        assert signed_in_as(browser) == settings.initial_admin_email


def test_meshctl_user_create_prints_a_link_and_token_create_a_token(
    db_url: str, tmp_path: Path, database: Database
) -> None:
    env = {"MESH_DATABASE_URL": db_url, "MESH_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    made = runner.invoke(cli, ["user", "create", "ops@example.com", "--admin"], env=env)
    assert made.exit_code == 0, made.output
    assert "/sign-in/link/" in made.output
    again = runner.invoke(cli, ["user", "create", "ops@example.com"], env=env)
    assert again.exit_code == 2 and "exists already" in again.output
    token = runner.invoke(
        cli, ["token", "create", "--user", "ops@example.com", "--name", "ci"], env=env
    )
    assert token.exit_code == 0, token.output
    assert token.output.strip().startswith("mesh_")


def test_the_last_admin_cannot_be_demoted(database: Database) -> None:
    with database.session(write=True) as session:
        only = create_user(
            session, Principal.system("tests"), UserCreate(email="only@example.com", role="admin")
        )
        with pytest.raises(ConflictError, match="last admin"):
            update_user(session, Principal.system("tests"), only.id, UserUpdate(role="viewer"))


def test_failures_are_recorded_with_their_address(browser: TestClient, database: Database) -> None:
    sign_in(browser, "ada@example.com", "nope")
    with database.session(write=False) as session:
        failure = session.scalars(select(SignInFailure)).one()
    assert (failure.email, failure.client_address) == ("ada@example.com", "testclient")
    with database.session(write=False) as session:
        assert session.execute(text("SELECT COUNT(*) FROM web_sessions")).scalar() == 0


def test_a_person_changes_their_password_knowing_the_current_one(browser: TestClient) -> None:
    sign_in(browser, "ada@example.com", PASSWORD)
    token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/account").text)
    assert token
    new = "an even longer passphrase"
    wrong = browser.post(
        "/account/password",
        data={"csrf_token": token.group(1), "current_password": "guess", "new_password": new},
    )
    assert wrong.status_code == 422
    assert "not your current password" in wrong.text
    short = browser.post(
        "/account/password",
        data={"csrf_token": token.group(1), "current_password": PASSWORD, "new_password": "short"},
    )
    assert short.status_code == 422
    assert "at least 12 characters" in short.text
    done = browser.post(
        "/account/password",
        data={"csrf_token": token.group(1), "current_password": PASSWORD, "new_password": new},
        follow_redirects=False,
    )
    assert done.status_code == 303
    browser.cookies.delete("mesh_session")
    assert sign_in(browser, "ada@example.com", PASSWORD).status_code == 401  # type: ignore[attr-defined]
    assert sign_in(browser, "ada@example.com", new).status_code == 303  # type: ignore[attr-defined]
