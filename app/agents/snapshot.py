"""Compile database state into the config agents run on.

One :class:`~mesh_agent.protocol.ServiceConfig` per catalog service (its *part*), composed from
the catalog (versions, live endpoints), its traffic policy and the mesh-wide defaults; one
:class:`~mesh_agent.protocol.MeshConfig` per group of agents (namespace, service) made of the
parts that group needs: its own namespace plus its declared dependencies. Versions are content
hashes computed exactly as the agent computes them, so an agent's ACK names the same version.

Make before break: a route never names a version without endpoints. Backends whose version has
none are dropped (the rest keep their weights); a route left with no weight is dropped and its
traffic falls through to the next route, or to every endpoint when no route is left. Each such
decision is reported as a warning the console shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec
from mesh_agent.protocol import (
    MeshConfig,
    Route,
    ServiceConfig,
    VersionConfig,
    config_version,
    consistency_errors,
    parse_address,
)

__all__ = [
    "GroupKey",
    "ServicePart",
    "ServiceState",
    "build_group_config",
    "compose_service_config",
    "policy_issues",
    "visible_services",
]

GroupKey = tuple[str, str]  # (namespace, service)


@dataclass(frozen=True)
class ServiceState:
    """What the compiler needs to know about one catalog service."""

    namespace: str
    name: str
    versions: tuple[str, ...]
    endpoints: Mapping[str, tuple[str, ...]]  # version -> live addresses
    dependencies: tuple[GroupKey, ...]
    spec: TrafficPolicySpec

    @property
    def key(self) -> GroupKey:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class ServicePart:
    """A compiled service: its config (None when it has no endpoint at all, so callers cannot
    be routed to it) and a content hash to tell quickly whether it changed."""

    key: GroupKey
    config: ServiceConfig | None
    digest: str
    dependencies: tuple[GroupKey, ...]
    warnings: tuple[str, ...] = field(default=())


def normalise_dependencies(namespace: str, names: Iterable[str]) -> tuple[GroupKey, ...]:
    keys: list[GroupKey] = []
    for item in names:
        ns, _, name = item.rpartition("/")
        keys.append((ns or namespace, name))
    return tuple(keys)


def _base_config(
    state: ServiceState,
    defaults: MeshDefaultsSpec,
    versions: dict[str, VersionConfig],
    routes: tuple[Route, ...],
) -> ServiceConfig:
    spec = state.spec
    return ServiceConfig(
        name=state.name,
        namespace=state.namespace,
        versions=versions,
        routes=routes,
        load_balancer=spec.load_balancer or defaults.load_balancer,
        timeout_ms=spec.timeout_ms if spec.timeout_ms is not None else defaults.timeout_ms,
        retries=spec.retries or defaults.retries,
        retry_budget=spec.retry_budget or defaults.retry_budget,
        outlier_detection=spec.outlier_detection or defaults.outlier_detection,
        connection_limits=spec.connection_limits or defaults.connection_limits,
        rate_limit=spec.rate_limit,
    )


def compose_service_config(
    state: ServiceState, defaults: MeshDefaultsSpec
) -> tuple[ServiceConfig | None, list[str]]:
    """The service as calling agents see it, with make-before-break applied."""
    warnings: list[str] = []
    endpoints: dict[str, tuple[str, ...]] = {}
    for version, addresses in state.endpoints.items():
        usable = []
        for address in addresses:
            try:
                parse_address(address)
            except ValueError as exc:
                # One bad catalog entry must not stop the config of everyone else.
                warnings.append(f"instance {address} of {version} left out: {exc}")
                continue
            usable.append(address)
        endpoints[version] = tuple(sorted(set(usable)))
    live = {v for v, addresses in endpoints.items() if addresses}
    if not live:
        return None, [
            *warnings,
            "no live endpoint: callers get 503 (x-mesh-error: unknown service)",
        ]
    versions = {v: VersionConfig(endpoints=endpoints[v]) for v in state.versions if v in live}
    routes: list[Route] = []
    for route in state.spec.routes:
        backends = tuple(b for b in route.backends if b.version in live)
        dropped = [b.version for b in route.backends if b.version not in live and b.weight]
        if dropped:
            warnings.append(
                f"route {route.name!r}: no endpoints for {', '.join(dropped)}; "
                "their share goes to the other versions"
            )
        if sum(b.weight for b in backends) == 0:
            warnings.append(f"route {route.name!r} skipped: none of its versions has endpoints")
            continue
        mirror = route.mirror
        if mirror is not None and mirror.version not in live:
            warnings.append(
                f"route {route.name!r}: mirror to {mirror.version} paused (no endpoints)"
            )
            mirror = None
        routes.append(route.model_copy(update={"backends": backends, "mirror": mirror}))
    return _base_config(state, defaults, versions, tuple(routes)), warnings


def compile_part(state: ServiceState, defaults: MeshDefaultsSpec) -> ServicePart:
    try:
        config, warnings = compose_service_config(state, defaults)
    except ValueError as exc:  # pydantic's ValidationError included
        # Stored data the agents cannot take (written before a rule existed, or behind the
        # API's back): leave this service out rather than stop every group's push.
        return ServicePart(state.key, None, "invalid", state.dependencies, (f"left out: {exc}",))
    digest = (
        hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16] if config else "none"
    )
    return ServicePart(state.key, config, digest, state.dependencies, tuple(warnings))


def visible_services(group: GroupKey, parts: Mapping[GroupKey, ServicePart]) -> list[GroupKey]:
    """The services a group's agents need: its namespace, plus what its service depends on."""
    namespace = group[0]
    keys = {key for key in parts if key[0] == namespace}
    own = parts.get(group)
    if own is not None:
        keys.update(dep for dep in own.dependencies if dep in parts)
    return sorted(keys)


def build_group_config(
    group: GroupKey, parts: Mapping[GroupKey, ServicePart]
) -> tuple[MeshConfig, str, list[GroupKey]]:
    keys = visible_services(group, parts)
    services = tuple(part for key in keys if (part := parts[key].config) is not None)
    mesh = MeshConfig(services=services)
    return mesh, config_version(mesh), keys


def policy_issues(
    state: ServiceState, defaults: MeshDefaultsSpec, *, prefix: str = "spec"
) -> list[tuple[str, str]]:
    """Every reason the agent would refuse this policy, or the catalog does not allow it, with
    the field each is about. Run before anything is stored: a policy an agent would NACK is
    refused here with 422 instead."""
    issues: list[tuple[str, str]] = []
    known = set(state.versions)
    listed = ", ".join(sorted(known)) or "none"
    for i, route in enumerate(state.spec.routes):
        where = f"{prefix}.routes[{i}]"
        total = sum(b.weight for b in route.backends)
        if total != 100:
            issues.append((f"{where}.backends", f"weights must sum to 100 (they sum to {total})"))
        for k, backend in enumerate(route.backends):
            if backend.version not in known:
                issues.append(
                    (
                        f"{where}.backends[{k}].version",
                        f"{state.name} has no version {backend.version!r} (versions: {listed})",
                    )
                )
        if route.mirror is not None and route.mirror.version not in known:
            issues.append(
                (
                    f"{where}.mirror.version",
                    f"{state.name} has no version {route.mirror.version!r} (versions: {listed})",
                )
            )
    if issues or not known:
        return issues
    # The agent's own checks, on the config as it would receive it with every version served
    # (endpoints come and go; the policy must be valid whichever are up).
    placeholder = {v: VersionConfig(endpoints=(f"127.0.0.1:{n + 1}",)) for n, v in enumerate(known)}
    try:
        config = _base_config(state, defaults, placeholder, tuple(state.spec.routes))
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = ".".join(str(part) for part in error["loc"])
            issues.append((f"{prefix}.{loc}" if loc else prefix, error["msg"]))
        return issues
    for issue in consistency_errors(MeshConfig(services=(config,))):
        issues.append((issue.path.replace("services[0]", prefix, 1), issue.message))
    return issues
