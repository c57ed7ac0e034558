"""CSRF tokens on the console's forms: bound to the browser's cookie by a key that lives
outside the database, checked on every unsafe HTML request."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.csrf import CsrfTokens
from app.db import Database
from app.keys import KeyFileError, load_or_create_key_file
from app.main import create_app
from tests.conftest import ADMIN_EMAIL, sign_in_as

FORM = {"namespace": "default", "name": "reviews", "owner_team": "bookinfo"}
SAME_ORIGIN = {"Referer": "http://testserver/services/new"}


@pytest.fixture
def client(bare_client: TestClient, database: Database) -> TestClient:
    """Here the client is a browser that has signed in but not opened a page yet (no CSRF
    cookie, no token)."""
    sign_in_as(bare_client, database, ADMIN_EMAIL)
    return bare_client


def page_token(client: TestClient, url: str = "/services/new") -> str:
    html = client.get(url).text
    meta = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    field = re.search(r'<input type="hidden" name="csrf_token" value="([^"]+)">', html)
    assert meta and field and meta.group(1) == field.group(1)
    return meta.group(1)


def created(client: TestClient) -> bool:
    return client.get("/api/v1/services/reviews").status_code == 200


def test_a_form_posted_with_the_pages_token_is_accepted(client: TestClient) -> None:
    token = page_token(client)
    assert "mesh_csrf" in client.cookies
    response = client.post(
        "/services/new",
        data={**FORM, "csrf_token": token},
        headers=SAME_ORIGIN,
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert created(client)


def test_htmx_sends_the_token_as_a_header(client: TestClient) -> None:
    token = page_token(client)
    headers = {**SAME_ORIGIN, "HX-Request": "true", "X-CSRF-Token": token}
    assert client.post("/services/new", data=FORM, headers=headers).status_code == 200
    assert created(client)


def test_a_form_without_a_token_is_refused(client: TestClient) -> None:
    page_token(client)  # the browser has its cookie; the forged form has no token
    response = client.post("/services/new", data=FORM, headers=SAME_ORIGIN)
    assert response.status_code == 403
    assert not created(client)


def test_a_form_without_the_cookie_is_refused(client: TestClient) -> None:
    token = page_token(client)
    client.cookies.delete("mesh_csrf")
    response = client.post("/services/new", data={**FORM, "csrf_token": token})
    assert response.status_code == 403
    assert not created(client)


def test_another_browsers_token_is_refused(settings: Settings, database: Database) -> None:
    app = create_app(settings, database)
    with TestClient(app) as attacker, TestClient(app) as victim:
        sign_in_as(attacker, database, "attacker@example.com")
        sign_in_as(victim, database, ADMIN_EMAIL)
        attackers_token = page_token(attacker)
        page_token(victim)
        response = victim.post(
            "/services/new", data={**FORM, "csrf_token": attackers_token}, headers=SAME_ORIGIN
        )
        assert response.status_code == 403
        assert not created(victim)


def test_every_form_of_the_console_carries_the_token(client: TestClient) -> None:
    token = page_token(client)
    client.post("/services/new", data={**FORM, "csrf_token": token}, headers=SAME_ORIGIN)
    for url in ("/services/default/reviews", "/services/default/reviews/edit"):
        html = client.get(url).text
        forms = re.findall(r'<form[^>]*method="post".*?</form>', html, re.S)
        assert forms, url
        for form in forms:
            assert f'name="csrf_token" value="{token}"' in form, form[:200]


def test_the_delete_and_version_forms_check_the_token(client: TestClient) -> None:
    token = page_token(client)
    client.post("/services/new", data={**FORM, "csrf_token": token}, headers=SAME_ORIGIN)
    version = client.post(
        "/services/default/reviews/versions", data={"name": "v1"}, headers=SAME_ORIGIN
    )
    delete = client.post(
        "/services/default/reviews/delete", data={"revision": "1"}, headers=SAME_ORIGIN
    )
    assert (version.status_code, delete.status_code) == (403, 403)
    assert client.get("/api/v1/services/reviews").json()["versions"] == []


def test_the_key_is_generated_private_and_differs_per_installation(tmp_path: Path) -> None:
    first = load_or_create_key_file(tmp_path / "one" / "secret.key", lambda: os.urandom(32))
    again = load_or_create_key_file(tmp_path / "one" / "secret.key", lambda: os.urandom(32))
    other = load_or_create_key_file(tmp_path / "two" / "secret.key", lambda: os.urandom(32))
    assert first == again != other
    mode = stat.S_IMODE((tmp_path / "one" / "secret.key").stat().st_mode)
    assert mode == 0o600
    assert CsrfTokens(first * 2).token_for("x") != CsrfTokens(other * 2).token_for("x")


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "secret.key"
    key.write_bytes(b"0" * 64)
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key_file(key, lambda: os.urandom(32))


def test_the_app_creates_its_cookie_key_in_the_data_dir(settings: Settings) -> None:
    key = settings.effective_secret_key_file
    assert key.parent == settings.data_dir
    with TestClient(create_app(settings)):
        pass
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
