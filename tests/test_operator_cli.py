"""meshctl get / export / apply against the real app (TestClient transport, SQLite and
PostgreSQL), and against no server at all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import app.operator.apply as operator_apply
import app.operator.client as operator_client
from app.cli import cli

runner = CliRunner()


@pytest.fixture
def meshctl(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run meshctl with its API calls going to the test app."""
    monkeypatch.setattr(operator_client, "make_client", lambda base_url: client)
    monkeypatch.setenv("MESH_SERVER", "http://testserver")  # the name the test app answers to

    def run(*args: str) -> Any:
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return run


def audit_total(client: TestClient) -> int:
    total: int = client.get("/api/v1/audit").json()["total"]
    return total


def make_shop(client: TestClient) -> None:
    for name, deps in (("frontend", ["catalog"]), ("catalog", [])):
        created = client.post(
            "/api/v1/services",
            json={
                "namespace": "shop",
                "name": name,
                "owner_team": "web",
                "description": f"the {name}",
                "links": [{"title": "Runbook", "url": f"https://runbooks.example.com/{name}"}],
                "labels": {"app": name},
                "dependencies": deps,
            },
        )
        assert created.status_code == 201, created.text
        for version in ("v1", "v2") if name == "catalog" else ("v1",):
            added = client.post(
                f"/api/v1/services/{name}/versions",
                params={"namespace": "shop"},
                json={"name": version, "labels": {"track": "stable"}},
            )
            assert added.status_code == 201, added.text
    shifted = client.post(
        "/api/v1/services/catalog/traffic/weights",
        params={"namespace": "shop"},
        json={"weights": {"v1": 90, "v2": 10}},
    )
    assert shifted.status_code == 200, shifted.text


def export_to(meshctl: Callable[..., Any], path: Path, *args: str) -> dict[str, Any]:
    result = meshctl("export", "-o", str(path), *args)
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def test_get_services_as_table_json_and_yaml(
    client: TestClient, meshctl: Callable[..., Any]
) -> None:
    make_shop(client)

    table = meshctl("get", "services")
    assert table.exit_code == 0, table.output
    header, *rows = table.output.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "TEAM", "DEPENDENCIES", "REV", "DESCRIPTION"]
    # Aligned: every row's NAME starts in the column its header does.
    column = header.index(" NAME ") + 1
    assert rows[0][column:].startswith("catalog") and rows[1][column:].startswith("frontend")
    assert "2 service(s)" in table.output

    as_json = json.loads(meshctl("get", "services", "-o", "json").output)
    assert [s["name"] for s in as_json] == ["catalog", "frontend"]
    as_yaml = yaml.safe_load(meshctl("get", "services", "-n", "shop", "-o", "yaml").output)
    assert as_yaml[1]["dependencies"] == ["catalog"]
    assert meshctl("get", "services", "-n", "elsewhere", "-o", "json").output.strip() == "[]"

    one = meshctl("get", "services", "catalog", "-n", "shop")
    assert one.exit_code == 0, one.output
    assert "Service:      shop/catalog" in one.output
    assert "Runbook: https://runbooks.example.com/catalog" in one.output
    assert "v2       track=stable" in one.output


def test_get_traffic_audit_and_agents(client: TestClient, meshctl: Callable[..., Any]) -> None:
    make_shop(client)

    listing = meshctl("get", "traffic", "-n", "shop")
    assert listing.exit_code == 0, listing.output
    catalog_row = next(line for line in listing.output.splitlines() if "shop/catalog" in line)
    assert "default: v1=90 v2=10" in catalog_row
    one = meshctl("get", "traffic", "catalog", "-n", "shop", "-o", "json")
    assert json.loads(one.output)["spec"]["routes"][0]["backends"][1] == {
        "version": "v2",
        "weight": 10,
    }
    full = meshctl("get", "traffic", "catalog", "-n", "shop")
    assert "revision 1" in full.output and "weight: 90" in full.output

    audit = meshctl("get", "audit", "catalog", "-n", "shop", "--limit", "2")
    assert audit.exit_code == 0, audit.output
    lines = audit.output.splitlines()
    assert lines[0].split()[:4] == ["SEQ", "TIME", "(UTC)", "ACTOR"]
    assert "traffic.weights" in lines[1] and "shop/catalog" in lines[1]
    assert "2 of 4 event(s)" in audit.output  # the service, two versions, the shift
    events = json.loads(meshctl("get", "audit", "-o", "json").output)
    assert events["total"] == 6

    agents = meshctl("get", "agents", "-o", "yaml")
    assert yaml.safe_load(agents.output)["total"] == 0
    assert "0 agent(s)" in meshctl("get", "agents").output


def test_get_unknown_service_is_one_line(meshctl: Callable[..., Any]) -> None:
    result = runner.invoke(cli, ["get", "services", "nope", "-n", "shop"])
    assert result.exit_code == 2
    assert result.output.strip() == "meshctl: error: 404: service shop/nope not found"


def test_export_then_apply_is_a_no_op(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    document = export_to(meshctl, path)
    assert document["apiVersion"] == "mesh/v1" and document["kind"] == "List"
    kinds = [(item["kind"], item.get("metadata", {}).get("name")) for item in document["items"]]
    assert kinds == [
        ("MeshDefaults", None),
        ("Service", "catalog"),
        ("TrafficPolicy", "catalog"),  # the frontend has no policy: none is exported
        ("Service", "frontend"),
    ]
    catalog = document["items"][1]["spec"]
    assert catalog["versions"] == [
        {"name": "v1", "labels": {"track": "stable"}},
        {"name": "v2", "labels": {"track": "stable"}},
    ]
    assert "instances" not in catalog
    before = audit_total(client)

    dry = meshctl("apply", "-f", str(path), "--dry-run")
    applied = meshctl("apply", "-f", str(path))

    assert dry.output.strip() == "nothing to change"
    assert applied.exit_code == 0 and applied.output.strip() == "nothing to change"
    assert audit_total(client) == before
    assert export_to(meshctl, tmp_path / "again.yaml") == document


def test_export_of_one_namespace_leaves_out_the_mesh_defaults(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    client.post("/api/v1/services", json={"name": "other", "owner_team": "t"})
    document = export_to(meshctl, tmp_path / "shop.yaml", "-n", "shop")
    assert {item["kind"] for item in document["items"]} == {"Service", "TrafficPolicy"}
    assert {item["metadata"]["namespace"] for item in document["items"]} == {"shop"}


def test_dry_run_shows_the_diff_and_changes_nothing_then_apply_does(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    document = export_to(meshctl, path)
    items = document["items"]
    items[1]["spec"]["description"] = "the catalog, now with search"
    items[1]["spec"]["versions"].append({"name": "v3", "labels": {}})
    items[2]["spec"]["routes"][0]["backends"] = [
        {"version": "v1", "weight": 50},
        {"version": "v2", "weight": 25},
        {"version": "v3", "weight": 25},
    ]
    items[0]["spec"]["timeout_ms"] = 9000
    items.append(
        {
            "kind": "Service",
            "metadata": {"namespace": "shop", "name": "search"},
            "spec": {"owner_team": "discovery", "versions": [{"name": "v1"}]},
        }
    )
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    before = audit_total(client)

    dry = meshctl("apply", "-f", str(path), "--dry-run")

    assert dry.exit_code == 0, dry.output
    assert "~ update mesh defaults (revision 0)" in dry.output
    assert "+    weight: 25" in dry.output
    assert '"the catalog" -> "the catalog, now with search"' in dry.output
    assert "+ create version shop/catalog v3" in dry.output
    assert "+ create service shop/search (team discovery)" in dry.output
    assert "6 change(s) (dry run: nothing was changed)" in dry.output
    assert audit_total(client) == before
    assert client.get("/api/v1/services/search", params={"namespace": "shop"}).status_code == 404

    applied = meshctl("apply", "-f", str(path), "--reason", "search launch")

    assert applied.exit_code == 0, applied.output
    assert "6 change(s) applied" in applied.output
    traffic = client.get("/api/v1/services/catalog/traffic", params={"namespace": "shop"}).json()
    assert [b["weight"] for b in traffic["spec"]["routes"][0]["backends"]] == [50, 25, 25]
    assert traffic["reason"] == "search launch"
    assert client.get("/api/v1/mesh/defaults").json()["spec"]["timeout_ms"] == 9000
    assert meshctl("apply", "-f", str(path)).output.strip() == "nothing to change"


def test_invalid_yaml_names_the_line_and_changes_nothing(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: mesh/v1\nkind: List\nitems:\n- kind: Service\n  metadata: [\n")
    before = audit_total(client)

    result = runner.invoke(cli, ["apply", "-f", str(path)])

    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first.startswith(f"{path}:6:1: invalid YAML"), result.output
    assert "nothing was changed" in result.output
    assert audit_total(client) == before


def test_an_invalid_field_names_file_line_and_field_and_changes_nothing(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    export_to(meshctl, path)
    text = path.read_text()
    # A good change first (it must not be applied either), then three bad ones further down.
    text = text.replace("description: the catalog", "description: changed", 1)
    text = text.replace("app: frontend", "'Bad Key!': frontend", 1)
    text = text.replace("weight: 10", "weight: 15", 1)
    text = text.replace(
        "owner_team: web\n    description: the frontend",
        "owner_team: web\n    colour: red\n    description: the frontend",
        1,
    )
    path.write_text(text)
    lines = text.splitlines()

    def line_of(snippet: str) -> int:
        return next(n for n, line in enumerate(lines, 1) if snippet in line)

    before = audit_total(client)

    result = runner.invoke(cli, ["apply", "-f", str(path)])

    assert result.exit_code == 1, result.output
    errors = result.output.splitlines()
    assert (
        f"{path}:{line_of('backends:')}: TrafficPolicy shop/catalog: spec.routes[0].backends: "
        "weights must sum to 100 (they sum to 105)"
    ) in errors
    label_error = next(e for e in errors if "spec.labels" in e)
    assert label_error.startswith(f"{path}:")
    assert "Service shop/frontend: spec.labels: Value error, label key 'Bad Key!'" in label_error
    assert (
        f"{path}:{line_of('colour: red')}: Service shop/frontend: spec.colour: "
        "Extra inputs are not permitted"
    ) in errors
    assert errors[-1] == "meshctl: error: nothing was changed"
    assert audit_total(client) == before
    catalog = client.get("/api/v1/services/catalog", params={"namespace": "shop"}).json()
    assert catalog["description"] == "the catalog"


def test_policy_checks_run_before_anything_is_written(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    """The server's own policy checks (versions that exist, what an agent would refuse) are run
    locally on the whole file first, so a bad policy late in the file stops an earlier create."""
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    path.write_text(
        """apiVersion: mesh/v1
kind: List
items:
- kind: Service
  metadata: {namespace: shop, name: search}
  spec: {owner_team: discovery, versions: [{name: v1}]}
- kind: TrafficPolicy
  metadata: {namespace: shop, name: search}
  spec:
    routes:
    - name: default
      backends:
      - {version: v1, weight: 50}
      - {version: v9, weight: 50}
- kind: TrafficPolicy
  metadata: {namespace: shop, name: ghost}
  spec: {}
"""
    )
    before = audit_total(client)

    result = runner.invoke(cli, ["apply", "-f", str(path)])

    assert result.exit_code == 1
    assert (
        f"{path}:14: TrafficPolicy shop/search: spec.routes[0].backends[1].version: "
        "search has no version 'v9' (versions: v1)"
    ) in result.output
    assert (
        f"{path}:16: TrafficPolicy shop/ghost: metadata.name: no service shop/ghost on the "
        "server or in this file"
    ) in result.output
    assert audit_total(client) == before
    assert client.get("/api/v1/services/search", params={"namespace": "shop"}).status_code == 404


def test_a_refusal_midway_says_what_was_already_applied(
    client: TestClient,
    meshctl: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    document = export_to(meshctl, path)
    document["items"][1]["spec"]["description"] = "new words"
    document["items"][2]["spec"]["routes"][0]["backends"][0]["weight"] = 80
    document["items"][2]["spec"]["routes"][0]["backends"][1]["weight"] = 20
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    planned = operator_apply.make_plan

    def someone_else_shifts_after_the_read(*args: Any) -> operator_apply.Plan:
        plan = planned(*args)
        client.post(
            "/api/v1/services/catalog/traffic/weights",
            params={"namespace": "shop"},
            json={"weights": {"v1": 0, "v2": 100}},
        )
        return plan

    monkeypatch.setattr(operator_apply, "make_plan", someone_else_shifts_after_the_read)

    result = runner.invoke(cli, ["apply", "-f", str(path)])

    assert result.exit_code == 1
    assert (
        "TrafficPolicy shop/catalog: the server refused to update traffic policy" in result.output
    )
    assert "409: revision 1 is stale" in result.output
    assert "already applied (1):\n    update service shop/catalog (revision 1): description" in (
        result.output
    )
    assert "1 change(s) not applied" in result.output
    traffic = client.get("/api/v1/services/catalog/traffic", params={"namespace": "shop"}).json()
    assert [b["weight"] for b in traffic["spec"]["routes"][0]["backends"]] == [0, 100]


def test_a_version_whose_labels_differ_is_refused_not_half_applied(
    client: TestClient, meshctl: Callable[..., Any], tmp_path: Path
) -> None:
    make_shop(client)
    path = tmp_path / "mesh.yaml"
    document = export_to(meshctl, path)
    document["items"][1]["spec"]["description"] = "new words"
    document["items"][1]["spec"]["versions"][1]["labels"] = {"track": "canary"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    result = runner.invoke(cli, ["apply", "-f", str(path)])

    assert result.exit_code == 1
    assert "Service shop/catalog: spec.versions[1].labels: version v2 exists" in result.output
    catalog = client.get("/api/v1/services/catalog", params={"namespace": "shop"}).json()
    assert catalog["description"] == "the catalog"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("- just\n- a list\n", ":1: expected a mapping with apiVersion"),
        ("apiVersion: mesh/v2\nkind: List\nitems: []\n", ":1: apiVersion: Input should be"),
        (
            "apiVersion: mesh/v1\nkind: List\nitems:\n- kind: Pod\n",
            ":4: Pod: kind: must be one of Service, TrafficPolicy, MeshDefaults",
        ),
        ("apiVersion: mesh/v1\nkind: List\nkind: List\nitems: []\n", ":3: kind: key given twice"),
    ],
)
def test_malformed_documents_are_named(
    meshctl: Callable[..., Any], tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(content)
    result = runner.invoke(cli, ["apply", "-f", str(path)])
    assert result.exit_code == 1
    assert message in result.output, result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [["get", "services"], ["get", "audit"], ["export"], ["apply", "-f", "FILE"]],
)
def test_an_unreachable_server_is_one_line_and_exit_2(args: list[str], tmp_path: Path) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text("apiVersion: mesh/v1\nkind: List\nitems: []\n")
    url = f"http://127.0.0.1:{_closed_port()}"
    process = subprocess.run(
        [sys.executable, "-m", "app", *(str(file) if a == "FILE" else a for a in args)],
        env={**os.environ, "MESH_SERVER": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr == (
        f"meshctl: error: cannot reach the control plane at {url}: [Errno 111] Connection refused\n"
    )
    assert process.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["get"],
        ["get", "services"],
        ["get", "agents"],
        ["get", "audit"],
        ["get", "traffic"],
        ["export"],
        ["apply"],
    ],
)
def test_help_reads_well(args: list[str]) -> None:
    result = runner.invoke(cli, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    assert "--server" in result.output or args == ["get"]
    assert "Traceback" not in result.output


def test_the_client_follows_pages(meshctl: Callable[..., Any], client: TestClient) -> None:
    for n in range(3):
        client.post("/api/v1/services", json={"name": f"s{n}", "owner_team": "t"})
    original = operator_client.PAGE_SIZE
    try:
        operator_client.PAGE_SIZE = 2
        names = [s["name"] for s in json.loads(meshctl("get", "services", "-o", "json").output)]
    finally:
        operator_client.PAGE_SIZE = original
    assert names == ["s0", "s1", "s2"]


def test_api_errors_keep_fastapi_field_messages() -> None:
    response = httpx.Response(
        422, json={"detail": [{"loc": ["body", "spec", "routes"], "msg": "bad"}]}
    )
    error = operator_client._api_error(response)
    assert error.errors == [{"field": "body.spec.routes", "message": "bad"}]
    assert str(error) == "422: body.spec.routes: bad"


@pytest.mark.e2e
@pytest.mark.slow
def test_round_trip_against_a_real_meshctl_serve(tmp_path: Path) -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MESH_DATA_DIR": str(tmp_path / "data"), "MESH_PORT": str(port)}
    env.pop("MESH_DATABASE_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            for _ in range(600):  # until it answers (or has exited)
                assert server.poll() is None, "meshctl serve exited"
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    try:  # a short wait that also notices the server dying
                        server.wait(timeout=0.1)
                    except subprocess.TimeoutExpired:
                        continue
            made = subprocess.run(
                [sys.executable, "-m", "app", "token", "create", "--user", "admin@mesh.local",
                 "--name", "round-trip", "--role", "admin"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            env["MESH_TOKEN"] = made.stdout.strip()  # what meshctl reads
            http.headers["Authorization"] = f"Bearer {env['MESH_TOKEN']}"
            http.post("/api/v1/services", json={"name": "web", "owner_team": "t"})
            http.post("/api/v1/services/web/versions", json={"name": "v1"})
            before = http.get("/api/v1/audit").json()["total"]

            def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [sys.executable, "-m", "app", *args, "--server", url],
                    env={**os.environ, "MESH_TOKEN": env["MESH_TOKEN"]},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )

            file = tmp_path / "mesh.yaml"
            assert meshctl("export", "-o", str(file)).returncode == 0
            applied = meshctl("apply", "-f", str(file))
            assert (applied.returncode, applied.stdout) == (0, "nothing to change\n")
            assert http.get("/api/v1/audit").json()["total"] == before
    finally:
        server.terminate()
        server.wait(timeout=30)
