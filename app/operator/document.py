"""The YAML document ``export`` writes and ``apply`` reads (format: ``app/operator/__init__.py``):
its models, loading with every problem located by file line and field, and the normalised
fields both commands compare."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

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
from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec

API_VERSION = "mesh/v1"


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
