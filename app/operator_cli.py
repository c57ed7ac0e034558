"""The operator's side of ``meshctl``: ``get``, ``export`` and ``apply``, all over the JSON API.

``export`` writes the catalog (services, versions: not instances, which agents register), every
service's traffic policy and the mesh-wide defaults as one YAML document::

    apiVersion: mesh/v1
    kind: List
    items:
    - kind: MeshDefaults          # only in a full export (no -n)
      spec: {...}                 # app.policies.schemas.MeshDefaultsSpec
    - kind: Service
      metadata: {namespace: shop, name: catalog}
      spec: {owner_team, description, links, labels, dependencies, versions: [{name, labels}]}
    - kind: TrafficPolicy         # only for services that have one
      metadata: {namespace: shop, name: catalog}
      spec: {...}                 # app.policies.schemas.TrafficPolicySpec

``apply`` is all or nothing as far as a client can make it: the whole file is validated locally
first, with the API's own schemas and the same policy checks the server runs
(``policy_issues``), against what the server holds; every problem is reported as
``FILE:LINE: KIND NAME: FIELD: message`` and nothing is written. Only then are the changes sent,
each with the revision that was read. If the server still refuses one (someone changed it in
the meantime: 409), apply stops there and says what was already applied. Apply creates and
updates, it never deletes.

Registered on ``app.cli.cli`` by importing this module (one line at the end of ``app/cli.py``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import httpx
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.catalog.schemas import (
    MAX_LINKS,
    Dependencies,
    Description,
    DnsLabel,
    Labels,
    Link,
    ServiceCreate,
    TeamName,
    VersionCreate,
)
from app.cli import ServerOption, _fail, _server_url, _table, cli
from app.identity.cli_token import TokenFileError, auth_headers
from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec

__all__ = ["API_VERSION", "ApiError", "Client", "make_client"]

API_VERSION = "mesh/v1"
PAGE_SIZE = 200

get_cli = typer.Typer(
    help="Show services, agents, audit events or traffic policies. Aligned tables for people, "
    "-o json|yaml for scripts.",
    no_args_is_help=True,
)
cli.add_typer(get_cli, name="get")


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="table (for people), json or yaml (for scripts).")
]
NamespaceOption = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Only this namespace.", show_default=False)
]


# ---------------------------------------------------------------------------------------------
# API client


class ApiError(Exception):
    """The control plane answered with an error status."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors


def make_client(base_url: str) -> httpx.Client:
    """The HTTP client of every operator command (tests swap it for one bound to the app)."""
    return httpx.Client(base_url=base_url, timeout=30.0)


class Client:
    def __init__(self, server: str | None, reason: str | None = None) -> None:
        self.url = _server_url(server)
        self.http = make_client(self.url)
        try:
            self.headers = auth_headers()
        except TokenFileError as exc:
            _fail(str(exc))
        if reason:
            self.headers["X-Mesh-Reason"] = reason

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, self.url + path, headers=self.headers, **kwargs)
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or exc.__class__.__name__
            _fail(f"cannot reach the control plane at {self.url}: {reason}")
        if response.status_code >= 400:
            raise _api_error(response)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def fetch(self, path: str, **params: Any) -> Any:
        """GET, and any error status is one line and exit 2."""
        try:
            return self.get(path, **params)
        except ApiError as exc:
            _fail(str(exc))

    def services(self, namespace: str | None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.get("/api/v1/services", namespace=namespace, page=page, page_size=PAGE_SIZE)
            items.extend(data["items"])
            if page >= data["pages"]:
                return items
            page += 1


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:300] or response.reason_phrase, [])
    detail = body.get("detail", body) if isinstance(body, dict) else body
    errors: list[dict[str, Any]] = list(body.get("errors", [])) if isinstance(body, dict) else []
    if isinstance(detail, list):  # FastAPI's own 422 shape
        errors = [
            {"field": ".".join(str(p) for p in item.get("loc", [])), "message": item.get("msg")}
            for item in detail
            if isinstance(item, dict)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ApiError(response.status_code, str(detail), errors)


def _emit(data: Any, output: Output, table: Callable[[], str]) -> None:
    if output is Output.json:
        typer.echo(json.dumps(data, indent=2))
    elif output is Output.yaml:
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())
    else:
        typer.echo(table())


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else "-"


def _weights(spec: dict[str, Any]) -> str:
    """The split of each route, e.g. ``default: v1=90 v2=10``."""
    routes = spec.get("routes") or []
    return "; ".join(
        f"{r['name']}: " + " ".join(f"{b['version']}={b['weight']}" for b in r["backends"])
        for r in routes
    )


# ---------------------------------------------------------------------------------------------
# get


@get_cli.command("services")
def get_services(
    name: Annotated[
        str | None, typer.Argument(help="One service, with its versions and instances.")
    ] = None,
    namespace: NamespaceOption = None,
    output: OutputOption = Output.table,
    server: ServerOption = None,
) -> None:
    """List services (or show one: its links, versions and instances)."""
    client = Client(server)
    if name is None:
        items = client.services(namespace)
        _emit(
            items,
            output,
            lambda: (
                _table(
                    ["NAMESPACE", "NAME", "TEAM", "DEPENDENCIES", "REV", "DESCRIPTION"],
                    [
                        [
                            s["namespace"],
                            s["name"],
                            s["owner_team"],
                            ",".join(s["dependencies"]) or "-",
                            str(s["revision"]),
                            _cut(s["description"], 50),
                        ]
                        for s in items
                    ],
                )
                + f"\n\n{len(items)} service(s)"
            ),
        )
        return
    ns = namespace or "default"
    one = client.fetch(f"/api/v1/services/{name}", namespace=ns)
    _emit(one, output, lambda: _service_detail(one))


def _service_detail(s: dict[str, Any]) -> str:
    lines = [
        f"Service:      {s['namespace']}/{s['name']}",
        f"Owner team:   {s['owner_team']}",
        f"Description:  {s['description'] or '-'}",
        f"Labels:       {', '.join(f'{k}={v}' for k, v in s['labels'].items()) or '-'}",
        f"Dependencies: {', '.join(s['dependencies']) or '-'}",
        f"Revision:     {s['revision']} (updated {_when(s['updated_at'])} UTC)",
    ]
    lines += [f"Link:         {link['title']}: {link['url']}" for link in s["links"]]
    versions = [
        [v["name"], ", ".join(f"{k}={x}" for k, x in v["labels"].items()) or "-"]
        for v in s["versions"]
    ]
    instances = [
        [i["address"], i["version"], i["health"], _when(i["last_seen_at"])] for i in s["instances"]
    ]
    lines += ["", _table(["VERSION", "LABELS"], versions), ""]
    lines.append(_table(["INSTANCE", "VERSION", "HEALTH", "LAST SEEN (UTC)"], instances))
    return "\n".join(lines)


@get_cli.command("agents")
def get_agents(
    name: Annotated[str | None, typer.Argument(help="Only the agents of this service.")] = None,
    namespace: NamespaceOption = None,
    state: Annotated[
        str | None,
        typer.Option(help="Only agents in this sync state, e.g. NACKED.", show_default=False),
    ] = None,
    output: OutputOption = Output.table,
    server: ServerOption = None,
) -> None:
    """Every agent with its sync state (SYNCED, STALE, NACKED, NOT_SENT, DISCONNECTED)."""
    client = Client(server)
    data = client.fetch("/api/v1/agents", namespace=namespace, service=name, state=state)

    def table() -> str:
        rows = [
            [
                f"{a['namespace']}/{a['service']}",
                a["version"],
                a["address"] or "-",
                a["sync_state"],
                a["config_version"] or "-",
                _when(a["last_seen_at"]),
                _cut(a["last_error"] or "", 60),
            ]
            for a in data["items"]
        ]
        headers = ["SERVICE", "VERSION", "ADDRESS", "SYNC", "CONFIG", "LAST SEEN (UTC)", "ERROR"]
        summary = ", ".join(f"{n} {s}" for s, n in data["counts"].items() if n)
        return (
            _table(headers, rows)
            + f"\n\n{data['total']} agent(s)"
            + (f": {summary}" if summary else "")
        )

    _emit(data, output, table)


@get_cli.command("audit")
def get_audit(
    name: Annotated[
        str | None,
        typer.Argument(help="Only events about this resource (and what it contains)."),
    ] = None,
    namespace: NamespaceOption = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action, e.g. traffic.update.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many events, newest first.")] = 20,
    output: OutputOption = Output.table,
    server: ServerOption = None,
) -> None:
    """The audit log, newest first: who changed what, when and why."""
    client = Client(server)
    resource = f"{namespace}/{name}" if namespace and name else (name or namespace)
    data = client.fetch(
        "/api/v1/audit",
        resource_name=resource,
        include_children="true" if resource else None,
        action=action,
        page_size=limit,
    )

    def table() -> str:
        rows = [
            [
                str(e["seq"]),
                _when(e["occurred_at"]),
                _cut(e["actor"], 30),
                e["action"],
                e["resource_name"],
                _cut(e["reason"], 50),
            ]
            for e in data["items"]
        ]
        shown = f"{len(rows)} of {data['total']} event(s)"
        headers = ["SEQ", "TIME (UTC)", "ACTOR", "ACTION", "RESOURCE", "REASON"]
        return _table(headers, rows) + f"\n\n{shown}"

    _emit(data, output, table)


@get_cli.command("traffic")
def get_traffic(
    name: Annotated[
        str | None, typer.Argument(help="One service's policy, in full.", show_default=False)
    ] = None,
    namespace: NamespaceOption = None,
    output: OutputOption = Output.table,
    server: ServerOption = None,
) -> None:
    """Traffic policies: each service's routes and weights (or one policy in full)."""
    client = Client(server)
    if name is not None:
        ns = namespace or "default"
        one = client.fetch(f"/api/v1/services/{name}/traffic", namespace=ns)

        def detail() -> str:
            head = (
                f"Traffic policy of {one['namespace']}/{one['service']}, revision "
                f"{one['revision']}"
                + (f" by {one['actor']} at {_when(one['created_at'])} UTC" if one["actor"] else "")
            )
            spec = TrafficPolicySpec.model_validate(one["spec"]).model_dump(
                mode="json", exclude_none=True
            )
            return head + "\n\n" + yaml.safe_dump(spec, sort_keys=False).rstrip()

        _emit(one, output, detail)
        return
    policies = [
        client.fetch(f"/api/v1/services/{s['name']}/traffic", namespace=s["namespace"])
        for s in client.services(namespace)
    ]
    _emit(
        policies,
        output,
        lambda: _table(
            ["SERVICE", "REV", "ROUTES", "WEIGHTS", "UPDATED (UTC)"],
            [
                [
                    f"{p['namespace']}/{p['service']}",
                    str(p["revision"]),
                    str(len(p["spec"]["routes"])),
                    _weights(p["spec"]) or "-",
                    _when(p["created_at"]),
                ]
                for p in policies
            ],
        ),
    )


# ---------------------------------------------------------------------------------------------
# The file format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Strict):
    namespace: DnsLabel = "default"
    name: DnsLabel


class ServiceSpec(_Strict):
    """``ServiceCreate`` without the name (in ``metadata``), plus the service's versions."""

    owner_team: TeamName
    description: Description = ""
    links: Annotated[list[Link], Field(max_length=MAX_LINKS)] = []
    labels: Labels = {}
    dependencies: Dependencies = []
    versions: list[VersionCreate] = []


class ServiceResource(_Strict):
    kind: Literal["Service"]
    metadata: Metadata
    spec: ServiceSpec


class TrafficPolicyResource(_Strict):
    kind: Literal["TrafficPolicy"]
    metadata: Metadata
    spec: TrafficPolicySpec = TrafficPolicySpec()


class MeshDefaultsResource(_Strict):
    kind: Literal["MeshDefaults"]
    spec: MeshDefaultsSpec = MeshDefaultsSpec()


class Document(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["mesh/v1"] = Field(alias="apiVersion")
    kind: Literal["List"]
    items: list[Any]


Resource = ServiceResource | TrafficPolicyResource | MeshDefaultsResource
KINDS: dict[str, type[Resource]] = {
    "Service": ServiceResource,
    "TrafficPolicy": TrafficPolicyResource,
    "MeshDefaults": MeshDefaultsResource,
}

Path_ = tuple[str | int, ...]


@dataclass
class Problem:
    path: Path_
    message: str
    at_line: int | None = None  # when the path alone cannot tell (a key given twice)


@dataclass
class LoadedFile:
    name: str
    root: yaml.Node
    data: Any
    resources: list[tuple[int, Resource]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    broken_services: set[tuple[str, str]] = field(default_factory=set)
    """Services whose item has problems: their policies are not checked against them."""

    def report(self, more: Sequence[Problem] = ()) -> list[str]:
        """Every problem, in the order of the file."""
        found = sorted([*self.problems, *more], key=self.line_of)
        return [self.where(p) for p in found]

    def line(self, path: Path_) -> int:
        """Line of the deepest part of ``path`` the file has (a missing field: its parent)."""
        node = self.root
        line = node.start_mark.line + 1
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        line, node = key.start_mark.line + 1, value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def where(self, problem: Problem) -> str:
        item = problem.path[1] if problem.path[:1] == ("items",) and len(problem.path) > 1 else None
        label = ""
        if isinstance(item, int) and isinstance(self.data, dict):
            raw = (self.data.get("items") or [None] * (item + 1))[item]
            label = _label(raw) + ": " if isinstance(raw, dict) else ""
        rest = problem.path[2:] if item is not None else problem.path
        field_name = f"{_dotted(rest)}: " if rest else ""
        return f"{self.name}:{self.line_of(problem)}: {label}{field_name}{problem.message}"

    def line_of(self, problem: Problem) -> int:
        return problem.at_line or self.line(problem.path)


def _label(raw: dict[str, Any]) -> str:
    kind = raw.get("kind", "item")
    meta = raw.get("metadata")
    if isinstance(meta, dict) and meta.get("name"):
        return f"{kind} {meta.get('namespace', 'default')}/{meta['name']}"
    return str(kind)


def _dotted(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_dotted(text: str) -> Path_:
    return tuple(
        int(index) if index else name for name, index in _PART.findall(text) if name or index
    )


class FileError(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def load_file(path: Path) -> LoadedFile:
    """Parse the file and validate each item's shape. Unreadable or unparseable files raise
    FileError; items with problems are left out of ``resources`` and named in ``problems``."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError([f"{name}: cannot read: {exc}"]) from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileError([f"{where}: invalid YAML: {problem}"]) from None
    if root is None:
        raise FileError([f"{name}: the file is empty (expected apiVersion: {API_VERSION})"])
    loaded = LoadedFile(name, root, data)
    loaded.problems = _duplicate_keys(root) + _validate_shape(loaded)
    return loaded


def _duplicate_keys(root: yaml.Node) -> list[Problem]:
    """YAML lets a later key silently win; in a config file that hides a mistake."""
    problems: list[Problem] = []

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        problems.append(
                            Problem((*path, key.value), "key given twice", key.start_mark.line + 1)
                        )
                    seen.add(key.value)
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, (*path, i))

    walk(root, ())
    return problems


def _pydantic_problems(exc: ValidationError, prefix: Path_) -> list[Problem]:
    return [
        Problem((*prefix, *error["loc"]), error["msg"]) for error in exc.errors(include_url=False)
    ]


def _validate_shape(loaded: LoadedFile) -> list[Problem]:
    if not isinstance(loaded.data, dict):
        return [Problem((), f"expected a mapping with apiVersion: {API_VERSION}, kind, items")]
    try:
        document = Document.model_validate(loaded.data)
    except ValidationError as exc:
        return _pydantic_problems(exc, ())
    problems: list[Problem] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, raw in enumerate(document.items):
        where: Path_ = ("items", i)
        if not isinstance(raw, dict):
            problems.append(Problem(where, "expected a mapping with kind, metadata and spec"))
            continue
        model = KINDS.get(str(raw.get("kind")))
        if model is None:
            problems.append(Problem((*where, "kind"), f"must be one of {', '.join(KINDS)}"))
            continue
        try:
            resource = model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, where))
            meta = raw.get("metadata")
            if model is ServiceResource and isinstance(meta, dict):
                loaded.broken_services.add(
                    (str(meta.get("namespace", "default")), str(meta.get("name")))
                )
            continue
        key = _key(resource)
        if key in seen:
            problems.append(
                Problem(where, f"given twice (first at line {loaded.line(('items', seen[key]))})")
            )
            continue
        seen[key] = i
        if isinstance(resource, ServiceResource):
            found = _service_problems(resource, where)
            if found:
                problems.extend(found)
                loaded.broken_services.add(key[1:])
                continue
        loaded.resources.append((i, resource))
    return problems


def _service_problems(resource: ServiceResource, where: Path_) -> list[Problem]:
    problems: list[Problem] = []
    try:  # the exact schema POST /api/v1/services validates with
        ServiceCreate.model_validate(_create_body(resource))
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, (*where, "spec")))
    names = [v.name for v in resource.spec.versions]
    for k, version in enumerate(names):
        if version in names[:k]:
            problems.append(Problem((*where, "spec", "versions", k, "name"), "listed twice"))
    return problems


def _key(resource: Resource) -> tuple[str, str, str]:
    if isinstance(resource, MeshDefaultsResource):
        return (resource.kind, "", "")
    return (resource.kind, resource.metadata.namespace, resource.metadata.name)


def _create_body(resource: ServiceResource) -> dict[str, Any]:
    body = resource.spec.model_dump(mode="json", exclude={"versions"})
    return {"namespace": resource.metadata.namespace, "name": resource.metadata.name, **body}


def _catalog_fields(spec: ServiceSpec | dict[str, Any]) -> dict[str, Any]:
    """The fields apply compares and PATCHes, normalised as the server stores them."""
    if isinstance(spec, dict):
        wanted = ServiceSpec.model_fields.keys() - {"versions"}
        spec = ServiceSpec.model_validate({k: v for k, v in spec.items() if k in wanted})
    return spec.model_dump(mode="json", exclude={"versions"})


def _policy(spec: TrafficPolicySpec | dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, dict):
        spec = TrafficPolicySpec.model_validate(spec)
    return spec.model_dump(mode="json", exclude_none=True)


def _defaults(spec: MeshDefaultsSpec | dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, dict):
        spec = MeshDefaultsSpec.model_validate(spec)
    return spec.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# export


@cli.command("export")
def export(
    namespace: NamespaceOption = None,
    output_file: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write to FILE instead of standard output.",
            metavar="FILE",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    server: ServerOption = None,
) -> None:
    """Write the catalog, traffic policies and mesh defaults as YAML for 'apply -f'.

    Services with their owner team, description, links, labels, dependencies and versions
    (not instances: agents register those), every traffic policy and the mesh defaults, as one
    document. With -n, one namespace and no mesh defaults."""
    client = Client(server)
    items: list[dict[str, Any]] = []
    if namespace is None:
        defaults = client.fetch("/api/v1/mesh/defaults")
        items.append({"kind": "MeshDefaults", "spec": _defaults(defaults["spec"])})
    for summary in client.services(namespace):
        ns, name = summary["namespace"], summary["name"]
        one = client.fetch(f"/api/v1/services/{name}", namespace=ns)
        metadata = {"namespace": ns, "name": name}
        spec = _catalog_fields(one)
        spec["versions"] = [{"name": v["name"], "labels": v["labels"]} for v in one["versions"]]
        items.append({"kind": "Service", "metadata": metadata, "spec": spec})
        policy = client.fetch(f"/api/v1/services/{name}/traffic", namespace=ns)
        if policy["revision"]:
            items.append(
                {
                    "kind": "TrafficPolicy",
                    "metadata": dict(metadata),
                    "spec": _policy(policy["spec"]),
                }
            )
    text = (
        f"# meshctl export{f' -n {namespace}' if namespace else ''}: "
        "apply with 'meshctl apply -f FILE' (creates and updates, never deletes)\n"
        + yaml.safe_dump(
            {"apiVersion": API_VERSION, "kind": "List", "items": items},
            sort_keys=False,
            allow_unicode=True,
        )
    )
    if output_file is None:
        typer.echo(text, nl=False)
        return
    try:
        output_file.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {output_file}: {exc.strerror}")
    services = sum(1 for item in items if item["kind"] == "Service")
    typer.echo(f"wrote {services} service(s) and their traffic policies to {output_file}", err=True)


# ---------------------------------------------------------------------------------------------
# apply


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


@cli.command("apply")
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
