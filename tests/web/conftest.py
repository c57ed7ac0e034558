"""The console's HTML tests act as a browser that opened a page first: they carry its CSRF
cookie, send the token from the page's meta tag (as ``static/app.js`` does for htmx), and
say where they come from (a same-origin Referer), as browsers do."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


def csrf_token_from(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


@pytest.fixture
def client(client: TestClient) -> TestClient:
    client.headers["X-CSRF-Token"] = csrf_token_from(client.get("/services").text)
    client.headers["Referer"] = "http://testserver/services"
    return client
