"""DNS rebinding and cross-site requests: only configured hosts are served, and a browser
write from any other origin is refused, on the JSON API as on the console."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.db import Database
from app.main import create_app
from app.middleware import HostPolicy, split_host
from tests.conftest import ADMIN_EMAIL, api_token

SERVICE = {"name": "reviews", "owner_team": "bookinfo"}
API = "/api/v1/services"


@pytest.fixture
def default_hosts(settings: Settings, database: Database) -> Iterator[TestClient]:
    """The console as `meshctl serve` runs it by default: on 127.0.0.1, no MESH_ALLOWED_HOSTS."""
    defaults = settings.model_copy(update={"allowed_hosts": [], "host": "127.0.0.1"})
    with TestClient(create_app(defaults, database), base_url="http://127.0.0.1:8000") as client:
        client.headers["Authorization"] = f"Bearer {api_token(database, ADMIN_EMAIL)}"
        yield client


def total(client: TestClient) -> int:
    count: int = client.get(API, headers={"Host": "127.0.0.1:8000"}).json()["total"]
    return count


def test_the_rebinding_probe_of_the_issue_is_refused(default_hosts: TestClient) -> None:
    """Host and Origin both evil.example:18000: the old check compared them with each other."""
    evil = {"Host": "evil.example:18000", "Origin": "http://evil.example:18000"}
    response = default_hosts.post(API, json=SERVICE, headers=evil)
    assert response.status_code == 400
    assert "MESH_ALLOWED_HOSTS" in response.json()["detail"]
    assert default_hosts.get("/services", headers={"Host": "evil.example"}).status_code == 400
    assert total(default_hosts) == 0


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000", "LOCALHOST:9999"]
)
def test_default_hosts_are_the_listen_address_and_loopback_names(
    default_hosts: TestClient, host: str
) -> None:
    assert default_hosts.get(API, headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.2:8000", "[::2]", "", "a:b:c"])
def test_other_hosts_get_400(default_hosts: TestClient, host: str) -> None:
    assert default_hosts.get(API, headers={"Host": host}).status_code == 400


def test_health_probes_by_ip_still_answer(default_hosts: TestClient) -> None:
    assert default_hosts.get("/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 200


def test_a_star_serves_any_host_but_still_refuses_foreign_origins(
    settings: Settings, database: Database
) -> None:
    behind_proxy = settings.model_copy(update={"allowed_hosts": ["*"]})
    with TestClient(create_app(behind_proxy, database), base_url="http://mesh.example") as client:
        client.headers["Authorization"] = f"Bearer {api_token(database, ADMIN_EMAIL)}"
        assert client.get(API).status_code == 200
        foreign = client.post(API, json=SERVICE, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        same = client.post(API, json=SERVICE, headers={"Origin": "http://mesh.example"})
        assert same.status_code == 201


def test_a_listed_public_name_is_accepted_as_origin_behind_a_proxy(
    settings: Settings, database: Database
) -> None:
    """The proxy forwards to 127.0.0.1:8000 without the public Host; Origin is the public name."""
    proxied = settings.model_copy(update={"allowed_hosts": ["127.0.0.1", "mesh.example.com"]})
    with TestClient(create_app(proxied, database), base_url="http://127.0.0.1:8000") as client:
        client.headers["Authorization"] = f"Bearer {api_token(database, ADMIN_EMAIL)}"
        response = client.post(API, json=SERVICE, headers={"Origin": "https://mesh.example.com"})
        assert response.status_code == 201


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1.evil.example:8000"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Referer": "https://evil.example/page"},
    ],
)
def test_browser_writes_from_another_origin_are_refused_on_the_api(
    default_hosts: TestClient, headers: dict[str, str]
) -> None:
    response = default_hosts.post(API, json=SERVICE, headers=headers)
    assert response.status_code == 403, response.text
    assert default_hosts.delete(f"{API}/reviews", headers=headers).status_code == 403
    assert total(default_hosts) == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://127.0.0.1:8000"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Referer": "http://127.0.0.1:8000/services"},
        {},  # meshctl, agents, OTLP exporters, curl: no Origin, no Sec-Fetch-Site, no cookie
    ],
)
def test_same_origin_and_non_browser_writes_pass(
    default_hosts: TestClient, headers: dict[str, str]
) -> None:
    assert default_hosts.post(API, json=SERVICE, headers=headers).status_code == 201


def test_a_cookie_without_origin_or_referer_is_refused(default_hosts: TestClient) -> None:
    response = default_hosts.post(API, json=SERVICE, headers={"Cookie": "mesh_csrf=x"})
    assert response.status_code == 403
    assert "neither Origin nor Referer" in response.json()["detail"]
    assert total(default_hosts) == 0


def test_reads_from_links_on_other_sites_still_work(default_hosts: TestClient) -> None:
    headers = {"Origin": "https://wiki.example.com", "Sec-Fetch-Site": "cross-site"}
    assert default_hosts.get("/services", headers=headers).status_code == 200


def test_refusals_carry_the_security_headers(default_hosts: TestClient) -> None:
    response = default_hosts.get(API, headers={"Host": "evil.example"})
    assert response.headers["x-frame-options"] == "DENY"


def test_host_parsing_and_policy() -> None:
    assert split_host("[::1]:8000") == ("[::1]", "8000")
    assert split_host("Example.COM") == ("example.com", None)
    assert split_host("[::1") is None
    assert split_host("host:port") is None
    policy = HostPolicy(["mesh.example.com:443", "*.corp.example", "localhost"])
    assert policy.host_allowed("mesh.example.com:443")
    assert not policy.host_allowed("mesh.example.com:8443")
    assert policy.host_allowed("console.corp.example")
    assert not policy.host_allowed("corp.example.evil")
    assert policy.host_allowed("localhost:1234")
    with pytest.raises(ValueError, match="not a host"):
        HostPolicy(["http://x"])


def test_allowed_hosts_are_read_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_ALLOWED_HOSTS", "Mesh.Example.com, localhost:8000")
    assert Settings().effective_allowed_hosts == ["mesh.example.com", "localhost:8000"]
    monkeypatch.delenv("MESH_ALLOWED_HOSTS")
    assert Settings(host="0.0.0.0").effective_allowed_hosts == ["localhost", "127.0.0.1", "[::1]"]
    assert Settings(host="::1").effective_allowed_hosts == ["[::1]", "localhost", "127.0.0.1"]


def test_a_malformed_allowed_host_stops_meshctl_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["serve", "--no-migrate"],
        env={"MESH_ALLOWED_HOSTS": "https://mesh.example.com/", "MESH_DATA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "MESH_ALLOWED_HOSTS" in result.output and "not a host name" in result.output
