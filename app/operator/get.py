"""``meshctl get services|agents|audit|traffic``: read the API, show a table (or JSON/YAML)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import yaml

from app.cli import ServerOption, _table
from app.operator.client import Client, NamespaceOption
from app.operator.tables import Output, OutputOption, _cut, _emit, _weights, _when
from app.policies.schemas import TrafficPolicySpec

get_cli = typer.Typer(
    help="Show services, agents, audit events or traffic policies. Aligned tables for people, "
    "-o json|yaml for scripts.",
    no_args_is_help=True,
)


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
