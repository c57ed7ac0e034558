"""How ``meshctl get`` shows what it read: aligned tables for people, JSON or YAML for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer
import yaml


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="table (for people), json or yaml (for scripts).")
]


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
