"""``meshctl export``: the catalog, traffic policies and mesh defaults as one YAML document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from app.cli import ServerOption, _fail
from app.operator.client import Client, NamespaceOption
from app.operator.document import API_VERSION, _catalog_fields, _defaults, _policy


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
