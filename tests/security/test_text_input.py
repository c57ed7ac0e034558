"""Names and text: full matches, visible characters only, lone surrogates and invalid UTF-8 are
a 422 (never a 500), pages are bounded."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.catalog.schemas import InstanceCreate, ServiceCreate, VersionCreate
from app.middleware import has_lone_surrogate_escape
from app.pagination import MAX_PAGE
from mesh_agent.protocol import parse_address

API = "/api/v1/services"
JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}

INVISIBLE = {
    "newline": "\n",
    "NUL": "\x00",
    "escape": "\x1b[31m",
    "C1 control": "\x85",
    "right-to-left override": "\u202e",
    "left-to-right embedding": "\u202a",
    "first strong isolate": "\u2068",
    "zero-width space": "\u200b",
    "zero-width joiner": "\u200d",
    "word joiner": "\u2060",
    "byte order mark": "\ufeff",
}


@pytest.mark.parametrize("char", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_names_with_invisible_or_control_characters_are_refused(
    client: TestClient, char: str
) -> None:
    for payload in (
        {"name": f"reviews{char}", "owner_team": "t"},
        {"name": "reviews", "owner_team": f"book{char}info"},
        {
            "name": "reviews",
            "owner_team": "t",
            "links": [{"title": f"a{char}b", "url": "http://x"}],
        },
        {"name": "reviews", "owner_team": "t", "labels": {"tier": f"web{char}"}},
    ):
        response = client.post(API, json=payload)
        assert response.status_code == 422, (payload, response.text)
    assert client.get(API).json()["total"] == 0


def test_the_trailing_newline_name_of_the_issue_is_refused(client: TestClient) -> None:
    response = client.post(API, json={"name": "reviews\n", "owner_team": "t"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "name"]


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\x00", "\x07"])
def test_descriptions_keep_line_breaks_but_not_invisible_characters(
    client: TestClient, char: str
) -> None:
    ok = client.post(API, json={"name": "a", "owner_team": "t", "description": "one\r\ntwo\tthree"})
    assert ok.status_code == 201
    bad = client.post(API, json={"name": "b", "owner_team": "t", "description": f"x{char}y"})
    assert bad.status_code == 422
    assert "U+" in bad.json()["detail"][0]["msg"]


def test_reason_header_with_a_bidi_override_is_refused(client: TestClient) -> None:
    # HTTP headers travel as bytes; Starlette reads them as Latin-1, so UTF-8 text arrives
    # as C1 control characters, which are refused like the override itself.
    reason = "fix \u202eevil".encode()
    response = client.post(
        API, json={"name": "a", "owner_team": "t"}, headers={"X-Mesh-Reason": reason}
    )
    assert response.status_code == 422
    assert client.get(API).json()["total"] == 0


@pytest.mark.parametrize(
    ("schema", "data"),
    [
        (VersionCreate, {"name": "v1\n"}),
        (InstanceCreate, {"address": "10.0.0.1:80", "version": "v1\n"}),
        (ServiceCreate, {"name": "a", "owner_team": "t", "labels": {"k\n": "v"}}),
        (ServiceCreate, {"name": "a", "owner_team": "t", "labels": {"k": "v\n"}}),
        (ServiceCreate, {"namespace": "default\n", "name": "a", "owner_team": "t"}),
    ],
)
def test_every_pattern_is_a_full_match(schema: type, data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        schema.model_validate(data)  # type: ignore[attr-defined]


def test_the_agent_protocol_patterns_are_full_matches_too() -> None:
    assert parse_address("10.0.0.1:80") == ("10.0.0.1", 80)
    with pytest.raises(ValueError, match="host:port"):
        parse_address("10.0.0.1:80\n")


def test_a_lone_surrogate_in_json_is_a_422(client: TestClient) -> None:
    for body in (
        b'{"name": "a", "owner_team": "\\ud800"}',
        b'{"name": "a", "owner_team": "t", "description": "x\\udc00y"}',
        b'{"name": "a", "owner_team": "t", "unknown": "\\ud800"}',  # echoed in the 422
        b'{"name": "a", "owner_team": "\\ud83d\\u0041"}',  # high half, then not a low half
    ):
        response = client.post(API, content=body, headers=JSON)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"][0]["loc"] == ["body"]
    assert client.get(API).json()["total"] == 0


def test_invalid_utf8_in_json_is_a_422(client: TestClient) -> None:
    body = b'{"name": "a", "owner_team": "\xed\xa0\x80"}'  # a surrogate, UTF-8 encoded
    assert client.post(API, content=body, headers=JSON).status_code == 422


def test_an_emoji_written_as_a_surrogate_pair_is_fine(client: TestClient) -> None:
    body = b'{"name": "a", "owner_team": "t", "description": "ship it \\ud83d\\ude80"}'
    response = client.post(API, content=body, headers=JSON)
    assert response.status_code == 201
    assert response.json()["description"] == "ship it \U0001f680"


def test_a_lone_surrogate_in_a_form_or_query_is_a_422(client: TestClient) -> None:
    form = b"namespace=default&name=a&owner_team=%ED%A0%80"
    assert client.post("/services/new", content=form, headers=FORM).status_code == 422
    assert client.get(f"{API}?q=%ED%A0%80").status_code == 422
    assert client.get("/services?q=%ED%A0%80").status_code == 422
    assert client.get("/services/default/%ED%A0%80").status_code == 422
    assert client.get(API).json()["total"] == 0


def test_lone_surrogate_scanner() -> None:
    assert has_lone_surrogate_escape('"\\ud800"')
    assert has_lone_surrogate_escape('"\\uDFFF"')
    assert has_lone_surrogate_escape('"\\ud800\\ud800"')
    assert has_lone_surrogate_escape('"\\ud83d"')
    assert not has_lone_surrogate_escape('"\\ud83d\\ude80"')
    assert not has_lone_surrogate_escape('"\\\\ud800"')  # an escaped backslash, then text
    assert not has_lone_surrogate_escape('"\\u00e9 plain"')
    assert not has_lone_surrogate_escape("no escapes at all")


def test_page_is_bounded_on_the_api_and_the_console(client: TestClient) -> None:
    assert client.get(API, params={"page": MAX_PAGE}).status_code == 200
    assert client.get(API, params={"page": MAX_PAGE + 1}).status_code == 422
    assert client.get(API, params={"page": 1_000_000}).status_code == 422
    assert client.get("/api/v1/audit", params={"page": MAX_PAGE + 1}).status_code == 422
    html = {"Accept": "text/html"}
    assert client.get("/services", params={"page": MAX_PAGE + 1}, headers=html).status_code == 422
    assert client.get("/audit", params={"page": MAX_PAGE + 1}, headers=html).status_code == 422
