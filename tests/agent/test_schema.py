"""The agent's pydantic-free validator (mesh_agent.schema) agrees with the control plane's
pydantic models (mesh_agent.protocol): same fields and defaults, same accept/reject, same path
and message for every problem, same content hash."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from mesh_agent import protocol, schema
from mesh_agent.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "agent-config.yaml").read_text())

Outcome = tuple[str, Any]


def control_plane(data: Any) -> Outcome:
    """What the control plane's models say, reported as the agent has always reported pydantic's
    errors: pydantic's internal location parts dropped, 'Value error, ' dropped."""
    try:
        config = protocol.MeshConfig.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            issues.append((schema.issue_path(loc), err["msg"].removeprefix("Value error, ")))
        return "invalid", issues
    if cross := protocol.consistency_errors(config):
        return "invalid", [(i.path, i.message) for i in cross]
    return "ok", (config.model_dump(mode="json"), protocol.config_version(config))


def agent(data: Any) -> Outcome:
    try:
        loaded = validate_config(data)
    except ConfigError as exc:
        return "invalid", [(i.path, i.message) for i in exc.issues]
    return "ok", (schema.to_json(loaded.config), loaded.version)


def assert_agree(data: Any) -> Outcome:
    expected, got = control_plane(data), agent(data)
    assert got == expected, data
    return got


def service(**fields: Any) -> dict[str, Any]:
    return {"name": "reviews", "versions": {"v1": {"endpoints": ["10.0.0.1:80"]}}, **fields}


def route(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "backends": [{"version": "v1"}], **fields}


# ---------------------------------------------------------------------------------------------
# The same types


PAIRS = [
    (getattr(protocol, cls.__name__), cls)
    for cls in vars(schema).values()
    if isinstance(cls, type)
    and dataclasses.is_dataclass(cls)
    and getattr(protocol, cls.__name__, cls) is not cls  # ConfigIssue: one class for both
]
MINIMAL: dict[str, dict[str, Any]] = {
    "HeaderMatch": {"name": "x-a", "present": True},
    "PathMatch": {"prefix": "/"},
    "Backend": {"version": "v1"},
    "DelayFault": {"percent": 1, "duration_ms": 5},
    "AbortFault": {"percent": 1},
    "MirrorPolicy": {"version": "v1"},
    "Route": route(),
    "RateLimit": {"requests_per_second": 1, "burst": 1},
    "ServiceConfig": service(),
}


def test_every_config_model_has_its_twin() -> None:
    names = {pydantic_cls.__name__ for pydantic_cls, _ in PAIRS}
    config_models = {
        name
        for name, value in vars(protocol).items()
        if isinstance(value, type) and issubclass(value, BaseModel) and name in protocol.__all__
    } - {"DiscoveryRequest", "DiscoveryResponse", "AgentRegistration"}
    assert names == config_models


@pytest.mark.parametrize(("pydantic_cls", "cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_fields_in_the_same_order_with_the_same_defaults(
    pydantic_cls: type[BaseModel], cls: type[Any]
) -> None:
    assert [f.name for f in dataclasses.fields(cls)] == list(pydantic_cls.model_fields)
    data = MINIMAL.get(cls.__name__, {})
    expected = pydantic_cls.model_validate(data).model_dump(mode="json")
    assert schema.to_json(schema.validate(cls, data)) == expected


def test_registration_agrees_with_the_control_planes_model() -> None:
    good = {"agent_id": "web-1", "service": "web", "version": "v1", "address": "10.0.0.1:80"}
    assert schema.to_json(schema.registration(**good)) == protocol.AgentRegistration(
        **good
    ).model_dump(mode="json")
    for bad in (
        {"agent_id": ""},
        {"agent_id": "a b"},
        {"agent_id": "a" * 65},
        {"service": "Web"},
        {"service": "web\n"},
        {"version": "v 1"},
        {"address": "0.0.0.0:80"},
        {"address": "nohost"},
        {"agent_version": "x" * 64},
        {"extra": 1},
    ):
        with pytest.raises(ValidationError) as expected:
            protocol.AgentRegistration(**{**good, **bad})
        with pytest.raises(schema.InvalidConfig) as got:
            schema.registration(**{**good, **bad})
        want = [
            (schema.issue_path(e["loc"]), e["msg"].removeprefix("Value error, "))
            for e in expected.value.errors(include_url=False)
        ]
        assert [(i.path, i.message) for i in got.value.issues] == want, bad


# ---------------------------------------------------------------------------------------------
# The same verdicts


VALID = [
    EXAMPLE,
    {},
    {"services": []},
    {"services": [service()]},
    {"services": [service(versions={"v1": {"endpoints": ["[::1]:80"], "labels": {"a": "b"}}})]},
    {"services": [service(routes=[route(match={"headers": [{"name": "X-A", "exact": "1"}]})])]},
    {"services": [service(routes=[route(match={"path": {"regex": "/a/[0-9]+"}})])]},
    {"services": [service(retries={"attempts": "3", "per_try_timeout_ms": 5.0})]},
    {"services": [service(retry_budget={"percent": 5, "min_retries_per_second": "1e3"})]},
    {"services": [service(outlier_detection={"enabled": "no"})]},
    {"services": [service(rate_limit={"requests_per_second": math.inf, "burst": 1})]},
    {"services": [service(timeout_ms=" 1_000 ", panic_threshold_percent=True)]},
    {"services": [service(timeout_ms="12.000")]},
    {"services": [service(health_check={"path": "/h", "jitter_percent": 0})]},
    {"inbound": {"timeout_ms": 0, "rate_limit": {"requests_per_second": 0.5, "burst": 2}}},
    {"path_normalization": {"escaped_slashes": "keep"}},
]

INVALID = [
    {"services": "reviews"},
    {"services": [5]},
    {"services": {"a": 1}},
    {"servics": []},
    {1: 2},
    {"services": 5, 1: 2},
    {"services": [{"name": "a", 1: 2, 2: 3}]},
    {"services": [{"versions": {}}]},
    {"services": [service(name="Reviews", namespace="x_y")]},
    {"services": [service(versions={"v 1": {}, "v2": {"endpoints": 5}})]},
    {"services": [service(versions={"v1": {"endpoints": ["nohost", "a:0", "a:1", "a:1"]}})]},
    {"services": [service(versions={"v1": {"labels": {1: 2, "a": None}}})]},
    {"services": [service(versions={1: {}})]},
    {"services": [service(versions=[])]},
    {"services": [service(versions={"v1": {"endpoints": []}})]},
    {"services": [service(load_balancer="random")]},
    {"services": [service(timeout_ms=-1)]},
    {"services": [service(timeout_ms=1.5)]},
    {"services": [service(timeout_ms="5.")]},
    {"services": [service(timeout_ms="1e3")]},
    {"services": [service(timeout_ms=math.nan)]},
    {"services": [service(timeout_ms=1e19)]},
    {"services": [service(timeout_ms=None)]},
    {"services": [service(timeout_ms=[1])]},
    {"services": [service(panic_threshold_percent=101)]},
    {"services": [service(panic_threshold_percent=math.nan)]},
    {"services": [service(panic_threshold_percent="lots")]},
    {"services": [service(retries={"attempts": 11, "retry_on": ["5xx", "teapot"]})]},
    {"services": [service(retries={"backoff_base_ms": 300})]},
    {"services": [service(retries={"per_try_timeout_ms": 0, "retry_non_idempotent": 2})]},
    {"services": [service(retries={"retry_non_idempotent": "maybe"})]},
    {"services": [service(retries={"retry_non_idempotent": 0.5})]},
    {"services": [service(retries={"retry_on": "5xx"})]},
    {"services": [service(retries=None)]},
    {"services": [service(retry_budget={"window_s": 0, "min_retries_per_second": -1})]},
    {"services": [service(outlier_detection={"consecutive_5xx": 0, "surprise": 1})]},
    {"services": [service(connection_limits={"max_connections": 0, "connect_timeout_ms": 0})]},
    {"services": [service(rate_limit={"requests_per_second": 0})]},
    {"services": [service(health_check={"path": "healthz", "interval_ms": 5, "timeout_ms": 0})]},
    {"services": [service(health_check={"path": "/a b", "healthy_threshold": 101})]},
    {"services": [service(routes=[{"backends": []}])]},
    {"services": [service(routes=[route(backends=[{"version": "v1", "weight": -1}])])]},
    {"services": [service(routes=[route(backends=[{"version": "v1", "weight": 0}])])]},
    {"services": [service(routes=[route(backends=[{"version": "v9"}])])]},
    {"services": [service(routes=[route(), route()])]},
    {"services": [service(), service()]},
    {"services": [service(routes=[route(match={"path": {}})])]},
    {"services": [service(routes=[route(match={"path": {"exact": "a", "prefix": "/"}})])]},
    {"services": [service(routes=[route(match={"path": {"regex": "(a"}})])]},
    {"services": [service(routes=[route(match={"path": {"regex": "(?=a)"}})])]},
    {"services": [service(routes=[route(match={"path": {"regex": "a{1000}"}})])]},
    {"services": [service(routes=[route(match={"path": {"regex": "a" * 1025}})])]},
    {"services": [service(routes=[route(match={"path": "/"})])]},
    {"services": [service(routes=[route(match={"methods": []})])]},
    {"services": [service(routes=[route(match={"methods": ["get", 5]})])]},
    {"services": [service(routes=[route(match={"headers": [{"name": "a b", "exact": "x"}]})])]},
    {"services": [service(routes=[route(match={"headers": [{"name": "a"}]})])]},
    {"services": [service(routes=[route(match={"headers": [{"exact": "a", "present": 1}]})])]},
    {"services": [service(routes=[route(match={"headers": {"name": "a"}})])]},
    {"services": [service(routes=[route(fault={"delay": {"percent": 101}})])]},
    {"services": [service(routes=[route(fault={"abort": {"percent": 5, "status": 600}})])]},
    {"services": [service(routes=[route(mirror={"version": "v9", "percent": -1})])]},
    {"services": [service(routes=[route(mirror={"version": "v9"})])]},
    {"services": [service(routes=[route(timeout_ms=-5, retries={"attempts": -1})])]},
    {"inbound": {"timeout_ms": "soon", "connection_limits": {"max_pending_requests": -1}}},
    {"inbound": []},
    {"path_normalization": {"escaped_slashes": "drop"}},
    {"services": [service(name=b"\xff")]},
]


@pytest.mark.parametrize("data", VALID, ids=[str(i) for i in range(len(VALID))])
def test_valid_configs_are_accepted_alike_with_the_same_content_and_version(data: Any) -> None:
    verdict, _ = assert_agree(data)
    assert verdict == "ok"


@pytest.mark.parametrize("data", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_configs_are_refused_alike_with_the_same_paths_and_messages(data: Any) -> None:
    verdict, issues = assert_agree(data)
    assert verdict == "invalid"
    assert issues


TRICKY = [
    None, True, False, 0, 1, 2, -1, 5.0, 0.5, 1e19, math.inf, math.nan, "", "5", " 5 ", "+5",
    "5.00", "5.", "1_000", "1__0", "1e3", "inf", "nan", " true ", "yes", "off", "x", "/", "v1",
    "10.0.0.1:80", "[::1]:80", b"1", b"\xff", 1.5, 100.5, 10**30, -(2**63), [], ["x"], [1], {},
    {"x": 1}, {"version": "v1"},
]  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)[1:]
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        what = draw(st.sampled_from(["replace", "delete", "extra"]))
        if what == "replace" or not isinstance(parent, dict):
            parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(TRICKY)))
        elif what == "delete":
            del parent[path[-1]]
        else:
            key = draw(st.sampled_from(["unknown", "name", "weight", "v9", 1]))
            parent[key] = copy.deepcopy(draw(st.sampled_from(TRICKY)))
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_configs_get_the_same_verdict_from_both(data: Any) -> None:
    assert_agree(data)


# ---------------------------------------------------------------------------------------------
# What the agent loads


def test_the_agent_loads_neither_pydantic_nor_yaml_nor_re2_for_a_json_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.json"
    config.write_text('{"services": [{"name": "a", "versions": {"v1": {"endpoints": ["h:1"]}}}]}')
    code = (
        "import sys\n"
        "import mesh_agent.__main__, mesh_agent.agent, mesh_agent.control, mesh_agent.discovery\n"
        "from mesh_agent.config import load_file\n"
        f"load_file({str(config)!r})\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(out.stdout.split())
    assert "mesh_agent" in loaded
    assert not loaded & {"pydantic", "pydantic_core", "yaml", "re2", "google", "opentelemetry"}


def test_a_route_regex_still_loads_re2_and_is_checked_by_it() -> None:
    with pytest.raises(ValueError, match="RE2 syntax"):
        schema.compile_regex("(?<=a)b")
    assert schema.compile_regex("/a/[0-9]+").fullmatch(b"/a/12") is not None
