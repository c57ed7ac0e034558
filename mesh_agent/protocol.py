"""The wire contract between the control plane and the agents.

This module is the single source of truth for the dynamic configuration an agent runs on (the
snapshot the control plane pushes, or the file given with ``mesh-agent --config``) and for the
discovery messages that carry it. The control plane imports this module; it must therefore
depend on nothing but pydantic, :mod:`mesh_agent.schema` (standard library only, RE2 for route
regexes: both sides must accept exactly the same ones) and the standard library, and never on
the rest of ``mesh_agent``.

Every model is frozen and forbids unknown fields: a typo in a pushed config is an error the agent
reports (NACK), not a setting silently ignored.

The agent itself does not import this module: it validates with :mod:`mesh_agent.schema`, the
same config as plain dataclasses checked without pydantic (~13 MB less RSS per sidecar). The
checks both need are defined there once and called by the validators here; the field types,
bounds and defaults are written twice, and tests/agent/test_schema.py holds the two in step.

Field-level validation lives on the models. Validation across fields (a route pointing at a version
without endpoints, duplicate names) lives in :func:`consistency_errors`, so that both sides run the
exact same checks: the control plane before it pushes, the agent before it swaps.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mesh_agent.schema import (
    AGENT_ID_PATTERN,
    DNS_LABEL,
    MAX_REGEX_LENGTH,
    MAX_REGEX_PROGRAM_SIZE,
    VERSION_NAME,
    ConfigIssue,
    check_backoff,
    check_endpoints,
    check_header_name,
    check_health_path,
    check_methods,
    check_one_of,
    check_path_start,
    check_reachable_address,
    check_regex,
    check_version_names,
    compile_regex,
    consistency_errors,
    content_hash,
    dns_label,
    parse_address,
)

__all__ = [
    "MAX_REGEX_LENGTH",
    "MAX_REGEX_PROGRAM_SIZE",
    "AbortFault",
    "AgentRegistration",
    "Backend",
    "ConfigIssue",
    "ConnectionLimits",
    "DelayFault",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "FaultPolicy",
    "HeaderMatch",
    "HealthCheck",
    "InboundPolicy",
    "MeshConfig",
    "MirrorPolicy",
    "OutlierDetection",
    "PathMatch",
    "PathNormalization",
    "RateLimit",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "RouteMatch",
    "ServiceConfig",
    "VersionConfig",
    "compile_regex",
    "config_version",
    "consistency_errors",
    "parse_address",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathMatch(_Model):
    """Match on the request path (the query string is not part of it). Exactly one field is set.

    ``regex`` must match the whole path (RE2 syntax, full match), after normalisation.
    """

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @field_validator("exact", "prefix")
    @classmethod
    def _starts_with_slash(cls, v: str | None) -> str | None:
        return check_path_start(v)

    _regex_ok = field_validator("regex")(check_regex)

    @model_validator(mode="after")
    def _exactly_one(self) -> PathMatch:
        check_one_of(self, ("exact", "prefix", "regex"), "a path match")
        return self


class HeaderMatch(_Model):
    """Match one request header (name compared case-insensitively). Exactly one of ``exact``,
    ``prefix``, ``regex`` (full match) or ``present`` is set; ``invert`` negates the result."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_header_name(v)

    _regex_ok = field_validator("regex")(check_regex)

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderMatch:
        check_one_of(self, ("exact", "prefix", "regex", "present"), "a header match")
        return self


class RouteMatch(_Model):
    """All given conditions must hold. An empty match matches every request."""

    path: PathMatch | None = None
    methods: tuple[str, ...] | None = None
    headers: tuple[HeaderMatch, ...] = ()

    @field_validator("methods")
    @classmethod
    def _valid_methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return check_methods(v)


class Backend(_Model):
    """A share of the route's traffic sent to one version of the destination service."""

    version: str
    weight: Annotated[int, Field(ge=0, le=1_000_000)] = 1


class RetryBudget(_Model):
    """Retries may add at most ``percent`` % of the requests of the last ``window_s`` seconds,
    plus ``min_retries_per_second`` (so low-traffic services can still retry)."""

    percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    min_retries_per_second: Annotated[float, Field(ge=0)] = 10.0
    window_s: Annotated[float, Field(gt=0, le=600)] = 10.0


RetryOn = Literal["5xx", "gateway-error", "connect-failure", "reset"]


class RetryPolicy(_Model):
    """``attempts`` is the number of retries after the first try (0 disables retries)."""

    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    per_try_timeout_ms: Annotated[int, Field(gt=0)] | None = None
    retry_on: tuple[RetryOn, ...] = ("5xx", "connect-failure", "reset")
    retry_non_idempotent: bool = False
    backoff_base_ms: Annotated[int, Field(gt=0)] = 25
    backoff_max_ms: Annotated[int, Field(gt=0)] = 250

    @model_validator(mode="after")
    def _backoff_order(self) -> RetryPolicy:
        check_backoff(self)
        return self


class DelayFault(_Model):
    percent: Annotated[float, Field(ge=0, le=100)]
    duration_ms: Annotated[int, Field(ge=0, le=3_600_000)]


class AbortFault(_Model):
    percent: Annotated[float, Field(ge=0, le=100)]
    status: Annotated[int, Field(ge=200, le=599)] = 503


class FaultPolicy(_Model):
    """Injected by the calling agent, before the request leaves it (delay first, then abort)."""

    delay: DelayFault | None = None
    abort: AbortFault | None = None


class MirrorPolicy(_Model):
    """Copy ``percent`` % of the route's requests to ``version``; the copy's response is
    discarded. Only requests whose body fits the retry buffer are mirrored."""

    version: str
    percent: Annotated[float, Field(ge=0, le=100)] = 100.0


class Route(_Model):
    name: str
    match: RouteMatch = RouteMatch()
    backends: Annotated[tuple[Backend, ...], Field(min_length=1)]
    # None: the service's timeout; 0: no timeout (long downloads, event streams).
    timeout_ms: Annotated[int, Field(ge=0)] | None = None
    retries: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None


class OutlierDetection(_Model):
    """Eject an endpoint after ``consecutive_5xx`` failures in a row (5xx, connect failure,
    reset or timeout) for ``base_ejection_ms`` times the number of times it was ejected, capped
    at ``max_ejection_ms``. The last available endpoint of a version is never ejected."""

    enabled: bool = True
    consecutive_5xx: Annotated[int, Field(ge=1)] = 5
    base_ejection_ms: Annotated[int, Field(ge=0)] = 30_000
    max_ejection_ms: Annotated[int, Field(ge=0)] = 300_000


class ConnectionLimits(_Model):
    """Per endpoint. Requests beyond ``max_connections`` wait for a free connection; beyond
    ``max_pending_requests`` waiting they fail at once with 503 (x-mesh-error: overflow)."""

    max_connections: Annotated[int, Field(ge=1)] = 1024
    max_pending_requests: Annotated[int, Field(ge=0)] = 1024
    connect_timeout_ms: Annotated[int, Field(gt=0)] = 1000


class HealthCheck(_Model):
    """Active HTTP health check of every endpoint of a service, by each calling agent: a
    ``GET path`` every ``interval_ms`` (± ``jitter_percent`` %, so that many agents do not
    probe in step); a 2xx within ``timeout_ms`` passes, anything else fails. An endpoint turns
    unhealthy after ``unhealthy_threshold`` failures in a row and healthy again after
    ``healthy_threshold`` passes; endpoints start healthy. An unhealthy endpoint takes no
    traffic, like one ejected by outlier detection (both count against the panic threshold)."""

    path: str = "/healthz"
    interval_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 10_000
    timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = 1_000
    healthy_threshold: Annotated[int, Field(ge=1, le=100)] = 2
    unhealthy_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    jitter_percent: Annotated[float, Field(ge=0, le=100)] = 10.0

    @field_validator("path")
    @classmethod
    def _origin_form(cls, v: str) -> str:
        return check_health_path(v)


class RateLimit(_Model):
    """Token bucket: ``requests_per_second`` refill, ``burst`` capacity."""

    requests_per_second: Annotated[float, Field(gt=0)]
    burst: Annotated[int, Field(ge=1)]


class VersionConfig(_Model):
    endpoints: tuple[str, ...] = ()
    labels: dict[str, str] = {}

    @field_validator("endpoints")
    @classmethod
    def _valid_endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_endpoints(v)


class ServiceConfig(_Model):
    """A destination service as seen by a calling agent: its endpoints by version and its
    traffic policy. With no routes, traffic is spread over every endpoint of every version."""

    name: str
    namespace: str = "default"
    versions: dict[str, VersionConfig]
    routes: tuple[Route, ...] = ()
    load_balancer: Literal["round_robin", "least_request"] = "least_request"
    timeout_ms: Annotated[int, Field(ge=0)] = 15_000  # 0: no timeout
    retries: RetryPolicy = RetryPolicy()
    retry_budget: RetryBudget = RetryBudget()
    outlier_detection: OutlierDetection = OutlierDetection()
    connection_limits: ConnectionLimits = ConnectionLimits()
    rate_limit: RateLimit | None = None
    health_check: HealthCheck | None = None
    # Below this share of available endpoints in a version, traffic is spread over all of them
    # (Envoy's healthy_panic_threshold); 0 turns panic mode off.
    panic_threshold_percent: Annotated[float, Field(ge=0, le=100)] = 50.0

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        return dns_label(v)

    @field_validator("versions")
    @classmethod
    def _version_names(cls, v: dict[str, VersionConfig]) -> dict[str, VersionConfig]:
        check_version_names(v)
        return v


class InboundPolicy(_Model):
    """Policy of the inbound listener, in front of the local app."""

    timeout_ms: Annotated[int, Field(ge=0)] = 60_000  # 0: no timeout
    rate_limit: RateLimit | None = None
    connection_limits: ConnectionLimits = ConnectionLimits()


class PathNormalization(_Model):
    """How request paths are normalised before route matching and forwarding (as Envoy's
    ``normalize_path``, ``merge_slashes`` and ``path_with_escaped_slashes_action``): dot
    segments removed (RFC 3986), repeated slashes merged, percent-encoded unreserved characters
    decoded. ``escaped_slashes`` says what happens to ``%2F`` and ``%5C`` (an encoded slash or
    backslash), which other hops may decode differently: ``reject`` with 400, ``keep`` them
    encoded, or ``unescape`` them before normalising."""

    escaped_slashes: Literal["reject", "keep", "unescape"] = "reject"


class MeshConfig(_Model):
    """The whole dynamic configuration of one agent (a snapshot)."""

    services: tuple[ServiceConfig, ...] = ()
    inbound: InboundPolicy = InboundPolicy()
    path_normalization: PathNormalization = PathNormalization()


def config_version(config: MeshConfig) -> str:
    """Content hash of a config: equal content gives an equal version on both sides, whatever
    the formatting or key order of the source."""
    return content_hash(config.model_dump(mode="json"))


class DiscoveryResponse(_Model):
    """Control plane → agent: a snapshot, its version and a nonce identifying this push."""

    version: str
    nonce: str
    config: MeshConfig


class DiscoveryRequest(_Model):
    """Agent → control plane: ACK or NACK of the push identified by ``response_nonce``.

    On ACK ``version`` is the version just applied; on NACK it is the version still in force and
    ``error_detail`` says what was wrong with the rejected one (xDS semantics).
    """

    service: str
    service_version: str
    namespace: str = "default"
    agent_id: str
    version: str | None = None
    response_nonce: str | None = None
    error_detail: str | None = None


class AgentRegistration(_Model):
    """Agent → control plane, once per connection: who this agent is and where callers reach
    its inbound listener. ``agent_id`` is stable across restarts of the same instance."""

    agent_id: Annotated[str, Field(min_length=1, max_length=64, pattern=AGENT_ID_PATTERN)]
    service: str
    namespace: str = "default"
    version: str
    # None for an agent without an inbound listener (a caller only): it gets config, no traffic.
    address: str | None = None
    agent_version: Annotated[str, Field(max_length=63)] = ""

    @field_validator("service", "namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not DNS_LABEL.match(v) or v.endswith("\n"):
            raise ValueError(f"{v!r} is not a DNS label (lower-case letters, digits, '-')")
        return v

    @field_validator("version")
    @classmethod
    def _version_name(cls, v: str) -> str:
        if not VERSION_NAME.match(v) or v.endswith("\n"):
            raise ValueError(f"{v!r} is not a valid version name")
        return v

    @field_validator("address")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return check_reachable_address(v)
