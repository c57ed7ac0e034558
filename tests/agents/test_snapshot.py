"""The compiler: make before break, what each group sees, versions the agent agrees with."""

from __future__ import annotations

from app.agents.snapshot import (
    ServiceState,
    build_group_config,
    compile_part,
    compose_service_config,
    policy_issues,
)
from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec
from mesh_agent.config import validate_config
from mesh_agent.protocol import Backend, MirrorPolicy, RetryPolicy, Route

DEFAULTS = MeshDefaultsSpec()


def state(
    name: str = "reviews",
    *,
    namespace: str = "default",
    endpoints: dict[str, tuple[str, ...]] | None = None,
    routes: list[Route] | None = None,
    dependencies: tuple[tuple[str, str], ...] = (),
    **spec: object,
) -> ServiceState:
    eps = {"v1": ("127.0.0.1:9001",), "v2": ("127.0.0.1:9002",)} if endpoints is None else endpoints
    return ServiceState(
        namespace=namespace,
        name=name,
        versions=tuple(sorted({"v1", "v2", *eps})),
        endpoints=eps,
        dependencies=dependencies,
        spec=TrafficPolicySpec.model_validate({"routes": routes or [], **spec}),
    )


def split(v1: int, v2: int, name: str = "default") -> Route:
    return Route(
        name=name, backends=(Backend(version="v1", weight=v1), Backend(version="v2", weight=v2))
    )


def test_weights_reach_the_config_unchanged_when_every_version_has_endpoints() -> None:
    config, warnings = compose_service_config(state(routes=[split(75, 25)]), DEFAULTS)
    assert config is not None
    assert [(b.version, b.weight) for b in config.routes[0].backends] == [("v1", 75), ("v2", 25)]
    assert warnings == []


def test_a_version_without_endpoints_is_never_routed_to() -> None:
    only_v1 = {"v1": ("127.0.0.1:9001",), "v2": ()}
    config, warnings = compose_service_config(
        state(endpoints=only_v1, routes=[split(50, 50)]), DEFAULTS
    )
    assert config is not None
    assert [b.version for b in config.routes[0].backends] == ["v1"]
    assert "v2" not in config.versions
    assert any("no endpoints for v2" in w for w in warnings)


def test_a_route_left_without_weight_is_dropped_and_traffic_falls_through() -> None:
    only_v1 = {"v1": ("127.0.0.1:9001",), "v2": ()}
    config, warnings = compose_service_config(
        state(endpoints=only_v1, routes=[split(0, 100)]), DEFAULTS
    )
    assert config is not None
    assert config.routes == ()
    assert any("skipped" in w for w in warnings)


def test_mirroring_to_a_version_without_endpoints_is_paused() -> None:
    only_v1 = {"v1": ("127.0.0.1:9001",), "v2": ()}
    route = Route(
        name="m", backends=(Backend(version="v1", weight=100),), mirror=MirrorPolicy(version="v2")
    )
    config, _ = compose_service_config(state(endpoints=only_v1, routes=[route]), DEFAULTS)
    assert config is not None
    assert config.routes[0].mirror is None


def test_a_service_without_any_endpoint_is_left_out() -> None:
    config, warnings = compose_service_config(state(endpoints={"v1": ()}), DEFAULTS)
    assert config is None
    assert warnings


def test_defaults_fill_what_the_policy_leaves_out_and_the_policy_wins() -> None:
    defaults = MeshDefaultsSpec(timeout_ms=2_000, retries=RetryPolicy(attempts=4))
    inherited, _ = compose_service_config(state(), defaults)
    assert inherited is not None
    assert (inherited.timeout_ms, inherited.retries.attempts) == (2_000, 4)
    overridden, _ = compose_service_config(state(timeout_ms=500), defaults)
    assert overridden is not None
    assert (overridden.timeout_ms, overridden.retries.attempts) == (500, 4)


def test_a_group_sees_its_namespace_and_its_declared_dependencies_only() -> None:
    parts = {
        p.key: p
        for p in (
            compile_part(state("web", dependencies=(("payments", "billing"),)), DEFAULTS),
            compile_part(state("reviews"), DEFAULTS),
            compile_part(state("billing", namespace="payments"), DEFAULTS),
            compile_part(state("ledger", namespace="payments"), DEFAULTS),
        )
    }
    config, _, visible = build_group_config(("default", "web"), parts)
    assert visible == [("default", "reviews"), ("default", "web"), ("payments", "billing")]
    assert {(s.namespace, s.name) for s in config.services} == set(visible)
    _, _, reviews_sees = build_group_config(("default", "reviews"), parts)
    assert ("payments", "billing") not in reviews_sees


def test_the_version_is_the_one_the_agent_computes_from_the_pushed_json() -> None:
    parts = {
        p.key: p
        for p in (
            compile_part(state("web"), DEFAULTS),
            compile_part(state(routes=[split(90, 10)]), DEFAULTS),
        )
    }
    config, version, _ = build_group_config(("default", "web"), parts)
    loaded = validate_config(config.model_dump(mode="json"))
    assert loaded.version == version


def test_unchanged_content_keeps_its_digest_and_a_weight_change_does_not() -> None:
    a = compile_part(state(routes=[split(90, 10)]), DEFAULTS)
    assert compile_part(state(routes=[split(90, 10)]), DEFAULTS).digest == a.digest
    assert compile_part(state(routes=[split(75, 25)]), DEFAULTS).digest != a.digest


def test_policy_issues_name_the_field_for_each_problem() -> None:
    bad = state(
        routes=[
            split(60, 30),
            Route(name="x", backends=(Backend(version="v9", weight=100),)),
        ]
    )
    issues = dict(policy_issues(bad, DEFAULTS))
    assert "sum to 90" in issues["spec.routes[0].backends"]
    assert "no version 'v9'" in issues["spec.routes[1].backends[0].version"]


def test_policy_issues_run_the_agents_own_consistency_checks() -> None:
    duplicate = state(routes=[split(50, 50, "a"), split(50, 50, "a")])
    issues = dict(policy_issues(duplicate, DEFAULTS))
    assert "duplicate route name" in issues["spec.routes[1].name"]
    assert policy_issues(state(routes=[split(50, 50)]), DEFAULTS) == []


def test_an_address_the_agent_would_refuse_is_left_out_not_fatal() -> None:
    bad = state(endpoints={"v1": ("0:0", "127.0.0.1:9001"), "v2": ("host:0",)})
    part = compile_part(bad, DEFAULTS)
    assert part.config is not None
    assert part.config.versions["v1"].endpoints == ("127.0.0.1:9001",)
    assert "v2" not in part.config.versions
    assert any("0:0" in w for w in part.warnings)
