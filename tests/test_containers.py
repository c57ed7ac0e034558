"""docker-compose.yml, Dockerfile and Dockerfile.agent, checked without Docker: the compose file
follows the compose specification (its JSON schema, vendored in tests/fixtures/compose-spec/
from the compose-spec project), and every image, command, flag, port and MESH_* variable it
names is one the code has."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import app.demo.apps as demo_apps
import app.operator.client as operator_client
from app.cli import cli
from app.config import Settings
from app.db import Database
from app.demo.seed import seed_demo_catalog
from app.demo.topology import LOADGEN, SERVICES
from mesh_agent.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES_IN_COMPOSE: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_IMAGE, AGENT_IMAGE = "mesh:dev", "mesh-agent:dev"
# What mesh_agent/ imports, by the distribution that provides it. A new import fails
# test_the_agent_image_installs_what_mesh_agent_imports until it is listed here and in the
# dependencies of agent/pyproject.toml, which the image installs.
AGENT_IMPORTS = {
    "uvloop": "uvloop",
    "httptools": "httptools",
    "yaml": "pyyaml",
    "pydantic": "pydantic",
    "opentelemetry.proto": "opentelemetry-proto",
    "re2": "google-re2",
}
CONTROL_PLANE_ONLY = {
    "fastapi", "starlette", "pydantic-settings", "sqlalchemy", "alembic", "psycopg", "jinja2",
    "jinja2-fragments", "python-multipart", "uvicorn", "typer", "httpx", "prometheus-client",
}  # fmt: skip


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / name).read_text()
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", kept)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def instructions(name: str, kind: str) -> list[str]:
    return [args for instruction, args in dockerfile(name) if instruction == kind]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return json.loads(instructions("Dockerfile", "CMD")[-1])
    return command if isinstance(command, list) else shlex.split(command)


def agents() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in SERVICES_IN_COMPOSE.items() if s.get("image") == AGENT_IMAGE}


def apps() -> dict[str, dict[str, Any]]:
    return {
        n: s
        for n, s in SERVICES_IN_COMPOSE.items()
        if s.get("image") == APP_IMAGE and command_of(s)[:3] == ["python", "-m", "app.demo.apps"]
    }


def parse_apps_command(args: list[str], monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Run app.demo.apps' own argument parsing (its main()) and catch what it would run."""
    seen = SimpleNamespace()

    def fake_run(instances: Any, host: str, rps: float) -> None:
        seen.instances, seen.host, seen.rps = list(instances), host, rps

    monkeypatch.setattr(demo_apps, "run", fake_run)
    monkeypatch.setattr(demo_apps, "asyncio", SimpleNamespace(run=lambda _: None))
    demo_apps.main(args)
    return seen


def parse_meshctl(args: list[str]) -> tuple[str, dict[str, Any]]:
    """The meshctl subcommand path and its parsed parameters, as click would parse them."""
    command: Any = typer.main.get_command(cli)
    assert args[0] == "meshctl", args
    path: list[str] = []
    rest = list(args[1:])
    while hasattr(command, "commands"):  # a group: the next word names the subcommand
        name, *rest = rest
        command = command.commands[name]
        path.append(name)
    ctx = command.make_context(" ".join(path), rest)
    return " ".join(path), dict(ctx.params)


def agent_args(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """mesh-agent's parsed flags for this container, through its real parser (every flag's
    default is its MESH_AGENT_* variable) and the image's entrypoint (the token file)."""
    for key in list(os.environ):
        if key.startswith("MESH_AGENT_"):
            monkeypatch.delenv(key)
    env = env_of(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "MESH_AGENT_TOKEN_FILE" in env:
        monkeypatch.setenv("MESH_AGENT_TOKEN", "from-the-token-file")
    return build_parser().parse_args(service.get("command") or [])


# ---------------------------------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests/fixtures/compose-spec/compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    assert [e.message for e in validator.iter_errors(COMPOSE)] == []
    # The schema does catch mistakes (a misspelt key, an unknown depends_on condition).
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["postgres"]["imag"] = "postgres"
    broken["services"]["seed"]["depends_on"]["control-plane"]["condition"] = "healthy"
    assert len(list(validator.iter_errors(broken))) == 2


def test_references_between_services_and_volumes_resolve() -> None:
    volumes = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES_IN_COMPOSE.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in SERVICES_IN_COMPOSE, f"{name} depends on unknown {dependency}"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in SERVICES_IN_COMPOSE
            assert "ports" not in service, f"{name}: a shared network namespace has no ports"
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            assert source in volumes or source.startswith((".", "/")), f"{name}: {mount}"


def test_every_image_built_has_its_dockerfile_and_one_image_one_dockerfile() -> None:
    built: dict[str, set[str]] = {}
    for name, service in SERVICES_IN_COMPOSE.items():
        build = service.get("build")
        if build is None:
            assert service["image"].split(":")[0] in {"postgres"}, f"{name} pulls an unknown image"
            continue
        dockerfile_name = build.get("dockerfile", "Dockerfile")
        assert (ROOT / build["context"] / dockerfile_name).is_file()
        built.setdefault(service["image"], set()).add(dockerfile_name)
    assert built == {APP_IMAGE: {"Dockerfile"}, AGENT_IMAGE: {"Dockerfile.agent"}}
    for name, service in SERVICES_IN_COMPOSE.items():
        assert service.get("image") in (*built, None) or "build" not in service, name


def test_every_demo_instance_runs_with_its_own_agent_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = {(s.name, v) for s in SERVICES for v in s.versions} | {(LOADGEN.name, "v1")}
    sidecars = {s["network_mode"].removeprefix("service:"): s for s in agents().values()}
    found = set()
    for name, service in apps().items():
        parsed = parse_apps_command(command_of(service)[3:], monkeypatch)
        (instance,) = parsed.instances  # one instance per container
        found.add((instance.service.name, instance.version))
        agent = agent_args(sidecars[name], monkeypatch)
        assert (agent.service, agent.version, agent.namespace) == (
            instance.service.name,
            instance.version,
            "shop",
        )
        assert agent.outbound == ("127.0.0.1", instance.outbound_port)
        if instance.service is LOADGEN:
            assert agent.app is None and instance.listen_port == 0
            continue
        # The agent forwards inbound calls to the port the app listens on, in their shared
        # namespace, and tells callers to reach it at the app container's name.
        assert agent.app == (parsed.host, instance.listen_port)
        assert agent.advertise == (name, agent.inbound[1])
        assert agent.inbound[0] == "0.0.0.0"
    assert found == expected
    assert set(sidecars) == set(apps())


def test_agents_reach_the_control_plane_the_compose_file_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, params = parse_meshctl(command_of(SERVICES_IN_COMPOSE["control-plane"]))
    assert path == "serve"
    for service in agents().values():
        agent = agent_args(service, monkeypatch)
        assert agent.control_plane == f"http://control-plane:{params['port']}"
        assert agent.otlp_endpoint == agent.control_plane
        assert agent.token == "from-the-token-file"
        assert "join-token:/run/mesh:ro" in service["volumes"]
        assert env_of(service)["MESH_AGENT_TOKEN_FILE"] == "/run/mesh/join-token"
    control_plane_env = env_of(SERVICES_IN_COMPOSE["control-plane"])
    assert control_plane_env["MESH_JOIN_TOKEN_FILE"] == "/run/mesh/join-token"
    assert "join-token:/run/mesh" in SERVICES_IN_COMPOSE["control-plane"]["volumes"]
    settings = Settings(
        **{k.removeprefix("MESH_").lower(): v for k, v in control_plane_env.items()}  # type: ignore[arg-type]
    )
    assert settings.effective_database_url.startswith("postgresql+psycopg://mesh:mesh@postgres:")
    postgres = env_of(SERVICES_IN_COMPOSE["postgres"])
    assert settings.database_url == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )


def test_every_mapped_port_is_one_the_command_listens_on() -> None:
    mapped = {n: s["ports"] for n, s in SERVICES_IN_COMPOSE.items() if s.get("ports")}
    assert set(mapped) == {"control-plane"}  # only the console is published, on loopback
    path, params = parse_meshctl(command_of(SERVICES_IN_COMPOSE["control-plane"]))
    assert path == "serve" and params["host"] == "0.0.0.0"
    for port in mapped["control-plane"]:
        host_ip, _, container_port = str(port).split(":")
        assert host_ip == "127.0.0.1"
        assert int(container_port) == params["port"]


def test_the_seed_job_applies_a_file_the_image_has() -> None:
    path, params = parse_meshctl(command_of(SERVICES_IN_COMPOSE["seed"]))
    assert path == "apply"
    assert params["server"] == "http://control-plane:8000"
    # The image's WORKDIR is a copy of the repository root (see the COPY lines).
    assert instructions("Dockerfile", "WORKDIR") == ["/opt/mesh"]
    assert "examples ./examples" in instructions("Dockerfile", "COPY")
    assert (ROOT / params["file"]).is_file()


def test_every_mesh_variable_set_is_one_that_is_read() -> None:
    read = {f"MESH_{name.upper()}" for name in Settings.model_fields}
    read |= set(re.findall(r"\((MESH_AGENT_[A-Z_]+)\)", build_parser().format_help()))
    # meshctl's own token variables (app/identity/cli_token.py), read outside Settings.
    cli_token = (ROOT / "app/identity/cli_token.py").read_text()
    read |= set(re.findall(r'environ\.get\("(MESH_[A-Z_]+)"', cli_token))
    entrypoint = (ROOT / "docker/mesh-agent").read_text()
    read |= set(re.findall(r"\$\{?(MESH_AGENT_[A-Z_]+)", entrypoint))
    assert "MESH_AGENT_TOKEN_FILE" in read
    set_here: dict[str, str] = {}
    for name, service in SERVICES_IN_COMPOSE.items():
        set_here |= {key: name for key in env_of(service) if key.startswith("MESH_")}
    for file in ("Dockerfile", "Dockerfile.agent"):
        for args in instructions(file, "ENV"):
            set_here |= {key: file for key in re.findall(r"(MESH_[A-Z_]+)=", args)}
    unknown = {key: where for key, where in set_here.items() if key not in read}
    assert unknown == {}
    assert len(set_here) > 10


def test_the_dockerfiles_use_the_readmes_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert json.loads(instructions("Dockerfile", "CMD")[-1]) == ["meshctl", "serve"]
    assert "`meshctl serve" in readme
    # Installed as `make` installs it (editable: the console finds templates/ beside app/).
    assert "pip install -e ." in instructions("Dockerfile", "RUN")[0]
    assert "pip install --quiet -e '.[dev]'" in makefile
    for source in (args.split()[:-1] for args in instructions("Dockerfile", "COPY")):
        for item in source:
            assert (ROOT / item).exists(), item
    assert json.loads(instructions("Dockerfile.agent", "ENTRYPOINT")[0]) == ["mesh-agent"]
    assert "`mesh-agent --help`" in readme


def test_the_agent_image_carries_only_mesh_agent() -> None:
    copies = [args.split() for args in instructions("Dockerfile.agent", "COPY")]
    from_context = {
        part
        for args in copies
        if not any(a.startswith("--from=") for a in args)
        for part in args[:-1]
        if not part.startswith("--")
    }
    assert from_context == {
        "mesh_agent",
        "agent/pyproject.toml",
        "agent/setup.py",
        "agent/native_backend.py",
        "docker/mesh-agent",
    }
    for item in from_context:
        assert (ROOT / item).exists(), item
    # The image itself gets the wheel only: the compiler and mypy stay in the build stage.
    assert [args for args in copies if any(a.startswith("--from=") for a in args)] == [
        ["--from=wheel", "/wheels", "/wheels"]
    ]


def test_the_agent_image_installs_the_compiled_agent_only_wheel() -> None:
    runs = instructions("Dockerfile.agent", "RUN")
    assert any("MESH_AGENT_COMPILE=1 pip wheel --no-deps" in r and "./agent" in r for r in runs)
    assert any(r.startswith("pip install /wheels/*.whl") for r in runs)
    # setup.py reads the list of compiled modules from mesh_agent/native.py's source.
    setup = (ROOT / "agent/setup.py").read_text()
    assert "NATIVE_MODULES: tuple[str, ...] = (" in setup
    assert "NATIVE_MODULES: tuple[str, ...] = (" in (ROOT / "mesh_agent/native.py").read_text()


def test_the_agent_image_installs_what_mesh_agent_imports() -> None:
    # The image installs the agent-only distribution, so its dependencies are what it gets.
    agent_project = tomllib.loads((ROOT / "agent/pyproject.toml").read_text())
    installed = {
        re.split(r"[<>=!~\[]", spec)[0].lower(): spec
        for spec in agent_project["project"]["dependencies"]
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    for spec in installed.values():
        assert f'"{spec}"' in pyproject.replace("PyYAML", "pyyaml"), f"{spec} not as pyproject"
    assert not installed.keys() & CONTROL_PLANE_ONLY

    imported: set[str] = set()
    for path in (ROOT / "mesh_agent").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
    third_party = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "mesh_agent"
    }

    def distribution(module: str) -> str:
        prefixes = [p for p in AGENT_IMPORTS if module == p or module.startswith(p + ".")]
        assert prefixes, f"mesh_agent imports {module}: add it to AGENT_IMPORTS and the image"
        return AGENT_IMPORTS[max(prefixes, key=len)]

    assert {distribution(m) for m in third_party} == set(installed)


@pytest.mark.e2e
def test_mesh_agent_imports_none_of_the_control_planes_modules() -> None:
    code = (
        "import sys, pkgutil, importlib, mesh_agent\n"
        "for m in pkgutil.iter_modules(mesh_agent.__path__):\n"
        "    importlib.import_module('mesh_agent.' + m.name)\n"
        "from mesh_agent.telemetry import Telemetry\n"
        "Telemetry(service='s', version='v1', namespace='n', sampling_ratio=1.0,"
        " otlp_endpoint='http://127.0.0.1:9').shutdown()\n"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(done.stdout.split())
    forbidden = {d.replace("-", "_") for d in CONTROL_PLANE_ONLY} | {"multipart", "app"}
    assert loaded & forbidden == set()
    # PyYAML is imported on the first YAML config only (mesh_agent.config), so not here.
    assert {"opentelemetry", "pydantic"} <= loaded


def test_the_agent_entrypoint_reads_the_token_file(tmp_path: Path) -> None:
    """docker/mesh-agent with a stand-in python that shows what it was given."""
    (tmp_path / "python").write_text('#!/bin/sh\necho "$MESH_AGENT_TOKEN|$*"\n')
    (tmp_path / "python").chmod(0o755)
    (tmp_path / "token").write_text("s3cret\n")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MESH_AGENT_TOKEN_FILE": str(tmp_path / "token")}
    script = str(ROOT / "docker/mesh-agent")
    done = subprocess.run(
        ["sh", script, "--service", "x"], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout == "s3cret|-m mesh_agent --service x\n"
    given = subprocess.run(
        ["sh", script], env={**env, "MESH_AGENT_TOKEN": "given"}, capture_output=True, text=True
    )
    assert given.stdout == "given|-m mesh_agent\n"
    missing = subprocess.run(
        ["sh", script], env={**env, "MESH_AGENT_TOKEN_FILE": str(tmp_path / "none")}, text=True,
        capture_output=True,
    )  # fmt: skip
    assert missing.returncode != 0 and missing.stdout == ""


def test_the_seed_file_is_the_demo_catalog(
    client: TestClient, database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """examples/shop.yaml (the compose seed) is what `meshctl demo` seeds: applying it to the
    seeded catalog changes nothing, and exporting the seeded catalog gives the same document."""
    with database.session(write=True) as session:
        seed_demo_catalog(session)
        session.commit()
    monkeypatch.setattr(operator_client, "make_client", lambda base_url: client)
    monkeypatch.setenv("MESH_SERVER", "http://testserver")  # the name the test app answers to
    runner = CliRunner()
    exported = tmp_path / "shop.yaml"
    assert runner.invoke(cli, ["export", "-n", "shop", "-o", str(exported)]).exit_code == 0
    shipped = ROOT / "examples/shop.yaml"
    assert yaml.safe_load(shipped.read_text()) == yaml.safe_load(exported.read_text())
    applied = runner.invoke(cli, ["apply", "-f", str(shipped)])
    assert applied.output.strip() == "nothing to change"
