"""``meshctl apply -f FILE``: check the whole file against the server, then send the writes,
each with the revision it read (all or nothing as far as a client can make it)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml

from app.cli import ServerOption, _fail
from app.operator.client import ApiError, Client
from app.operator.document import (
    FileError,
    LoadedFile,
    MeshDefaultsResource,
    Problem,
    ServiceResource,
    TrafficPolicyResource,
    _catalog_fields,
    _create_body,
    _defaults,
    _parse_dotted,
    _policy,
    load_file,
)
from app.operator.tables import _cut
from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec


@dataclass
class Step:
    """One write, in the order apply sends them."""

    item: int
    summary: str
    method: str
    path: str
    params: dict[str, str]
    body: dict[str, Any]
    details: list[str] = field(default_factory=list)


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _server_service(client: Client, ns: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = client.get(f"/api/v1/services/{name}", namespace=ns)
    except ApiError as exc:
        if exc.status == 404:
            return None
        _fail(f"cannot read service {ns}/{name}: {exc}")
    return found


def _short(value: Any) -> str:
    return _cut(json.dumps(value, ensure_ascii=False), 70)


def _yaml_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    old = yaml.safe_dump(before, sort_keys=False).splitlines()
    new = yaml.safe_dump(after, sort_keys=False).splitlines()
    return [
        line
        for line in difflib.unified_diff(old, new, "server", "file", n=1, lineterm="")
        if not line.startswith(("---", "+++"))
    ]


def make_plan(client: Client, loaded: LoadedFile) -> Plan:
    """Read what the server holds, check the file against it and list the writes needed."""
    from app.agents.snapshot import ServiceState, normalise_dependencies, policy_issues

    plan = Plan()
    services = {
        (r.metadata.namespace, r.metadata.name): (i, r)
        for i, r in loaded.resources
        if isinstance(r, ServiceResource)
    }
    server: dict[tuple[str, str], dict[str, Any] | None] = {}

    def on_server(key: tuple[str, str]) -> dict[str, Any] | None:
        if key not in server:
            server[key] = _server_service(client, *key)
        return server[key]

    current_defaults = client.fetch("/api/v1/mesh/defaults")
    defaults = MeshDefaultsSpec.model_validate(current_defaults["spec"])
    for i, resource in loaded.resources:
        if not isinstance(resource, MeshDefaultsResource):
            continue
        wanted, held = _defaults(resource.spec), _defaults(current_defaults["spec"])
        defaults = resource.spec
        if wanted != held:
            plan.steps.append(
                Step(
                    i,
                    f"update mesh defaults (revision {current_defaults['revision']})",
                    "PUT",
                    "/api/v1/mesh/defaults",
                    {},
                    {"revision": current_defaults["revision"], "spec": wanted},
                    _yaml_diff(held, wanted),
                )
            )

    for (ns, name), (i, resource) in services.items():
        held_service = on_server((ns, name))
        params = {"namespace": ns}
        wanted_fields = _catalog_fields(resource.spec)
        if held_service is None:
            plan.steps.append(
                Step(
                    i,
                    f"create service {ns}/{name} (team {resource.spec.owner_team})",
                    "POST",
                    "/api/v1/services",
                    {},
                    _create_body(resource),
                )
            )
            held_versions: dict[str, dict[str, str]] = {}
        else:
            held_fields = _catalog_fields(held_service)
            changed = {k: v for k, v in wanted_fields.items() if held_fields[k] != v}
            if changed:
                plan.steps.append(
                    Step(
                        i,
                        f"update service {ns}/{name} (revision {held_service['revision']}): "
                        + ", ".join(changed),
                        "PATCH",
                        f"/api/v1/services/{name}",
                        params,
                        {"revision": held_service["revision"], **changed},
                        [
                            f"{k}: {_short(held_fields[k])} -> {_short(v)}"
                            for k, v in changed.items()
                        ],
                    )
                )
            held_versions = {v["name"]: v["labels"] for v in held_service["versions"]}
        for k, version in enumerate(resource.spec.versions):
            if version.name not in held_versions:
                plan.steps.append(
                    Step(
                        i,
                        f"create version {ns}/{name} {version.name}",
                        "POST",
                        f"/api/v1/services/{name}/versions",
                        params,
                        version.model_dump(mode="json"),
                    )
                )
            elif held_versions[version.name] != version.labels:
                plan.problems.append(
                    Problem(
                        ("items", i, "spec", "versions", k, "labels"),
                        f"version {version.name} exists with labels "
                        f"{_short(held_versions[version.name])}; a version's labels cannot be "
                        "changed (the API has no update for versions)",
                    )
                )

    for i, resource in loaded.resources:
        if not isinstance(resource, TrafficPolicyResource):
            continue
        ns, name = resource.metadata.namespace, resource.metadata.name
        if (ns, name) in loaded.broken_services:
            continue  # its service's problems are reported; checking against it would mislead
        in_file = services.get((ns, name))
        held_service = on_server((ns, name))
        if in_file is None and held_service is None:
            plan.problems.append(
                Problem(
                    ("items", i, "metadata", "name"),
                    f"no service {ns}/{name} on the server or in this file",
                )
            )
            continue
        versions = {v["name"] for v in (held_service or {}).get("versions", [])}
        if in_file is not None:
            versions |= {v.name for v in in_file[1].spec.versions}
            dependencies = in_file[1].spec.dependencies
        else:
            assert held_service is not None
            dependencies = held_service["dependencies"]
        state = ServiceState(
            namespace=ns,
            name=name,
            versions=tuple(sorted(versions)),
            endpoints={},
            dependencies=normalise_dependencies(ns, dependencies),
            spec=resource.spec,
        )
        for field_path, message in policy_issues(state, defaults, prefix="spec"):
            plan.problems.append(Problem(("items", i, *_parse_dotted(field_path)), message))
        if held_service is None:
            held = {"revision": 0, "spec": _policy(TrafficPolicySpec())}
        else:
            held = client.fetch(f"/api/v1/services/{name}/traffic", namespace=ns)
        wanted, before = _policy(resource.spec), _policy(held["spec"])
        if wanted != before:
            plan.steps.append(
                Step(
                    i,
                    f"update traffic policy {ns}/{name} (revision {held['revision']})",
                    "PUT",
                    f"/api/v1/services/{name}/traffic",
                    {"namespace": ns},
                    {"revision": held["revision"], "spec": wanted},
                    _yaml_diff(before, wanted),
                )
            )
    return plan


def _show_plan(plan: Plan) -> Iterator[str]:
    for step in plan.steps:
        mark = "+" if step.method == "POST" else "~"
        yield f"{mark} {step.summary}"
        yield from (f"    {line}" for line in step.details)


def apply(
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            "-f",
            help="YAML file as written by 'meshctl export'.",
            metavar="FILE",
            dir_okay=False,
            show_default=False,
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
    ] = False,
    reason: Annotated[
        str | None,
        typer.Option(
            help="Why; stored in the audit log of every change. [default: meshctl apply -f FILE]",
            show_default=False,
        ),
    ] = None,
    server: ServerOption = None,
) -> None:
    """Make the server match a YAML file (as written by 'export'); --dry-run shows the diff.

    Creates missing services and versions; updates changed service fields, traffic policies
    and mesh defaults, each with the revision it read. Never deletes. The whole file is checked
    first; any problem is named by file, line and field, and then nothing is changed."""
    try:
        loaded = load_file(file)
    except FileError as exc:
        _refuse(exc.lines)
    if loaded.problems and not loaded.resources:
        _refuse(loaded.report())  # nothing to check against the server
    client = Client(server, reason=reason or f"meshctl apply -f {file.name}")
    plan = make_plan(client, loaded)
    if loaded.problems or plan.problems:
        _refuse(loaded.report(plan.problems))
    if not plan.steps:
        typer.echo("nothing to change")
        return
    if dry_run:
        for line in _show_plan(plan):
            typer.echo(line)
        typer.echo(f"\n{len(plan.steps)} change(s) (dry run: nothing was changed)")
        return
    done: list[Step] = []
    for step in plan.steps:
        try:
            client.call(step.method, step.path, params=step.params, json=step.body)
        except ApiError as exc:
            _stopped(loaded, plan, done, step, exc)
        typer.echo(f"{'+' if step.method == 'POST' else '~'} {step.summary}")
        done.append(step)
    typer.echo(f"\n{len(done)} change(s) applied")


def _refuse(lines: list[str]) -> NoReturn:
    for line in lines:
        typer.echo(line, err=True)
    typer.echo("meshctl: error: nothing was changed", err=True)
    raise typer.Exit(1)


def _stopped(
    loaded: LoadedFile, plan: Plan, done: list[Step], step: Step, exc: ApiError
) -> NoReturn:
    typer.echo(
        loaded.where(Problem(("items", step.item), f"the server refused to {step.summary}: {exc}")),
        err=True,
    )
    for error in exc.errors:
        typer.echo(f"    {error.get('field')}: {error.get('message')}", err=True)
    left = len(plan.steps) - len(done)
    if done:
        typer.echo(f"already applied ({len(done)}):", err=True)
        for applied in done:
            typer.echo(f"    {applied.summary}", err=True)
    typer.echo(
        f"meshctl: error: stopped; {left} change(s) not applied. Run apply again to retry "
        "(what was applied is now 'nothing to change').",
        err=True,
    )
    raise typer.Exit(1)
