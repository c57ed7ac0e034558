"""Config validation with precise error paths, content-hash versions, persistence."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mesh_agent import protocol
from mesh_agent.config import (
    STATE_FILE,
    ConfigError,
    load_file,
    load_last_good,
    parse_config,
    save_last_good,
    validate_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent-config.yaml"


def _base(**service: Any) -> dict[str, Any]:
    svc = {
        "name": "reviews",
        "versions": {
            "v1": {"endpoints": ["10.0.0.1:9080"]},
            "v2": {"endpoints": ["10.0.0.2:9080"]},
        },
        **service,
    }
    return {"services": [svc]}


def _errors(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return [str(i) for i in info.value.issues]


def test_example_file_is_valid_and_complete() -> None:
    loaded = load_file(EXAMPLE)
    assert loaded.config.services, "the example should show services"
    svc = loaded.config.services[0]
    assert svc.routes and any(r.mirror for r in svc.routes) and any(r.fault for r in svc.routes)
    assert loaded.config.inbound.rate_limit is not None


def test_route_to_version_without_endpoints_names_the_path() -> None:
    data = _base(routes=[{"name": "r", "backends": [{"version": "v1"}, {"version": "v3"}]}])
    assert _errors(data) == [
        "services[0].routes[0].backends[1].version: service 'reviews' has no version 'v3' "
        "(versions with endpoints: v1, v2)"
    ]
    data = _base(routes=[{"name": "r", "backends": [{"version": "v2"}]}])
    data["services"][0]["versions"]["v2"]["endpoints"] = []
    assert _errors(data) == [
        "services[0].routes[0].backends[0].version: version 'v2' of service 'reviews' has no "
        "endpoints (versions with endpoints: v1)"
    ]


def test_mirror_version_is_checked() -> None:
    data = _base(
        routes=[
            {
                "name": "r",
                "backends": [{"version": "v1"}],
                "mirror": {"version": "v9", "percent": 5},
            }
        ]
    )
    assert _errors(data)[0].startswith(
        "services[0].routes[0].mirror.version: service 'reviews' has no version 'v9'"
    )


def test_field_errors_have_paths() -> None:
    data = _base(
        routes=[
            {
                "name": "r",
                "match": {"path": {"regex": "(unclosed"}},
                "backends": [{"version": "v1"}],
            },
            {
                "name": "s",
                "match": {"path": {"prefix": "/a", "exact": "/b"}},
                "backends": [{"version": "v1"}],
            },
        ],
        timeout_ms=-5,
    )
    data["services"][0]["versions"]["v1"]["endpoints"] = ["nohostport"]
    errors = _errors(data)
    assert any(
        e.startswith("services[0].versions.v1.endpoints: 'nohostport' is not host:port")
        for e in errors
    ), errors
    assert any(
        e.startswith("services[0].timeout_ms: Input should be greater than or equal to 0")
        for e in errors
    ), errors
    assert any(
        e.startswith("services[0].routes[0].match.path.regex: invalid regular expression")
        for e in errors
    ), errors
    assert any(
        e.startswith(
            "services[0].routes[1].match.path: "
            "a path match needs exactly one of exact, prefix, regex"
        )
        for e in errors
    ), errors


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"/(a)/\1", "invalid regular expression (RE2 syntax): invalid escape sequence: \\1"),
        ("/(?=admin).*", "invalid regular expression (RE2 syntax): invalid perl operator: (?="),
        ("/(?<!x)y", "invalid regular expression (RE2 syntax): invalid perl operator: (?<"),
        ("/" + "a" * 2000, "regular expression longer than 1024 characters"),
        ("/(a{50}){50}", "invalid regular expression (RE2 syntax): invalid repetition size"),
        ("/[a-z]{300}", "regular expression too complex: program size"),
    ],
)
def test_regexes_are_re2_with_a_size_limit_and_errors_name_the_field(
    pattern: str, message: str
) -> None:
    """Backtracking-only syntax (backreferences, lookaround) and oversized patterns are refused
    for path and header regexes alike, each error naming its field."""
    data = _base(
        routes=[
            {
                "name": "r",
                "match": {
                    "path": {"regex": pattern},
                    "headers": [{"name": "x-user", "regex": pattern}],
                },
                "backends": [{"version": "v1"}],
            }
        ]
    )
    errors = _errors(data)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"services[0].routes[0].match.path.regex: {message}"), errors
    assert errors[1].startswith(f"services[0].routes[0].match.headers[0].regex: {message}"), errors


def test_a_catastrophic_backtracking_pattern_matches_in_linear_time() -> None:
    compiled = protocol.compile_regex("/slow/(a+)+b")
    # Python's re takes longer than the age of the universe on this input; RE2 is linear.
    assert compiled.fullmatch(b"/slow/" + b"a" * 10_000) is None
    assert compiled.fullmatch(b"/slow/aaab") is not None


def test_unknown_fields_are_rejected() -> None:
    data = _base(retries={"attempts": 2, "retry_onn": ["5xx"]})
    assert _errors(data) == ["services[0].retries.retry_onn: Extra inputs are not permitted"]


def test_duplicates_are_rejected() -> None:
    data = _base()
    data["services"].append(dict(data["services"][0]))
    assert _errors(data) == [
        "services[1].name: duplicate service 'reviews' in namespace 'default' "
        "(first defined at services[0])"
    ]
    data = _base(routes=[{"name": "a", "backends": [{"version": "v1"}]}] * 2)
    assert _errors(data) == [
        "services[0].routes[1].name: duplicate route name 'a' in service 'reviews' "
        "(first at services[0].routes[0])"
    ]


def test_weights_must_not_all_be_zero() -> None:
    data = _base(routes=[{"name": "a", "backends": [{"version": "v1", "weight": 0}]}])
    assert _errors(data) == ["services[0].routes[0].backends: weights sum to 0"]


def test_bad_names_and_syntax() -> None:
    assert _errors(
        {"services": [{"name": "Reviews_1", "versions": {"v1": {"endpoints": ["a:1"]}}}]}
    )[0].startswith("services[0].name: 'Reviews_1' is not a DNS label")
    assert _errors([1, 2]) == ["top level must be a mapping, got list"]
    with pytest.raises(ConfigError) as info:
        parse_config("services: [\n  - name: x\n  bad", source="file:x.yaml")
    assert "line" in str(info.value) and "file:x.yaml" in str(info.value)


def test_version_is_a_content_hash() -> None:
    a = parse_config(json.dumps(_base()))
    # Same content in YAML, different key order and explicit defaults: same version.
    b = parse_config(
        "services:\n"
        "- versions: {v2: {endpoints: ['10.0.0.2:9080']}, v1: {endpoints: ['10.0.0.1:9080']}}\n"
        "  name: reviews\n  namespace: default\n  timeout_ms: 15000\n"
    )
    assert a.version == b.version
    c = validate_config(_base(timeout_ms=1000))
    assert c.version != a.version
    # The control plane computes it from its pydantic models: the same value.
    control_plane = protocol.MeshConfig.model_validate(_base(timeout_ms=1000))
    assert protocol.config_version(control_plane) == c.version


def test_empty_config_is_valid() -> None:
    loaded = parse_config("")
    assert loaded.config.services == ()


def test_last_good_roundtrip_and_atomic_replace(tmp_path: Path) -> None:
    assert load_last_good(tmp_path) is None
    first = validate_config(_base(), "file:a")
    save_last_good(tmp_path, first)
    second = validate_config(_base(timeout_ms=2000), "file:b")
    save_last_good(tmp_path, second)
    loaded = load_last_good(tmp_path)
    assert loaded is not None and loaded.version == second.version
    assert loaded.source.startswith("state:")
    # nothing but the state file is left behind (the temp file was renamed over it)
    assert os.listdir(tmp_path) == [STATE_FILE]


def test_corrupt_state_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt state file"):
        load_last_good(tmp_path)


def test_config_models_are_frozen() -> None:
    loaded = validate_config(_base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.config.services[0].name = "other"  # type: ignore[misc]
