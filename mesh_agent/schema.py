"""The config the agent runs on, as plain slotted dataclasses checked by hand (no pydantic).

:mod:`mesh_agent.protocol` defines the same config with pydantic models: they are the control
plane's source of truth (its API schemas, the snapshot compiler, OpenAPI). The agent validates
with this module instead because pydantic and the schemas it builds cost ~13 MB of RSS in every
sidecar (measured), more than the rest of the agent's own code. The two must agree: the same
fields and defaults, the same accept/reject, the same field path and message for each problem,
the same content hash. The checks that can be shared are defined here once and called by the
pydantic validators too; tests/agent/test_schema.py holds the two side by side (fixtures, a
corpus of invalid configs and a property test over mutated configs).

Coercions follow pydantic's lax mode for what YAML and JSON decode to (``"5"`` and ``5.0`` are
an int 5, ``"yes"`` is true, an int is a float), and the messages are pydantic's.

Imports only the standard library; RE2 is imported on the first route regex, so an agent whose
config has none does not load it (~2.7 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

__all__ = [
    "DNS_LABEL",
    "MAX_REGEX_LENGTH",
    "MAX_REGEX_PROGRAM_SIZE",
    "VERSION_NAME",
    "AbortFault",
    "Backend",
    "ConfigIssue",
    "ConnectionLimits",
    "DelayFault",
    "FaultPolicy",
    "HeaderMatch",
    "HealthCheck",
    "InboundPolicy",
    "InvalidConfig",
    "MeshConfig",
    "MirrorPolicy",
    "OutlierDetection",
    "PathMatch",
    "PathNormalization",
    "RateLimit",
    "Registration",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "RouteMatch",
    "ServiceConfig",
    "VersionConfig",
    "check_endpoints",
    "check_header_name",
    "check_health_path",
    "check_methods",
    "check_one_of",
    "check_path_start",
    "check_regex",
    "check_version_names",
    "compile_regex",
    "config_version",
    "consistency_errors",
    "content_hash",
    "dns_label",
    "issue_path",
    "mesh_config",
    "parse_address",
    "registration",
    "to_json",
    "validate",
]

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
VERSION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_METHOD = re.compile(r"^[A-Z]{1,20}\Z")
_ADDRESS = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})\Z"
)
AGENT_ID_PATTERN = r"^[A-Za-z0-9._-]+$"


def parse_address(address: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts, or raise ValueError.

    Port 0 only makes sense for a listener (the kernel picks a free port), never for an
    endpoint to connect to, hence the flag.
    """
    m = _ADDRESS.match(address)
    if m is None:
        raise ValueError(f"{address!r} is not host:port")
    port = int(m.group("port"))
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port < 65536:
        raise ValueError(f"port {port} out of range {lowest}-65535")
    return (m.group("v6") or m.group("host")), port


# Route regexes run on every request, on input an attacker chooses: RE2 matches in time linear
# in the input (no backtracking, so no `(a+)+b` that freezes the agent), and the size of the
# compiled program is capped as Envoy caps it (its re2.max_program_size default).
MAX_REGEX_LENGTH = 1024
MAX_REGEX_PROGRAM_SIZE = 100
_re2_options: Any = None


def compile_regex(pattern: str) -> Any:
    """Compile ``pattern`` with RE2 for matching bytes, or raise ValueError saying why not
    (syntax RE2 does not support, such as backreferences or lookaround, or a pattern too big)."""
    global _re2_options
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regular expression longer than {MAX_REGEX_LENGTH} characters")
    import re2

    if _re2_options is None:
        _re2_options = re2.Options()
        _re2_options.log_errors = False  # errors become config issues, not lines on stderr
    try:
        compiled = re2.compile(pattern.encode(), _re2_options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise ValueError(f"invalid regular expression (RE2 syntax): {detail}") from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise ValueError(
            f"regular expression too complex: program size {compiled.programsize} "
            f"> {MAX_REGEX_PROGRAM_SIZE}"
        )
    return compiled


# ---------------------------------------------------------------------------------------------
# Field and model checks, shared with protocol.py's pydantic validators (same words both sides)


def check_regex(pattern: str | None) -> str | None:
    if pattern is not None:
        compile_regex(pattern)
    return pattern


def check_path_start(v: str | None) -> str | None:
    if v is not None and not v.startswith("/"):
        raise ValueError("must start with '/'")
    return v


def check_header_name(v: str) -> str:
    if not _HEADER_NAME.match(v):
        raise ValueError(f"{v!r} is not a valid header name")
    return v.lower()


def check_methods(v: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if v is not None:
        if not v:
            raise ValueError("must not be empty (leave it out to match any method)")
        for m in v:
            if not _METHOD.match(m):
                raise ValueError(f"{m!r} is not an upper-case HTTP method")
    return v


def check_one_of(model: object, names: tuple[str, ...], what: str) -> None:
    given = [f for f in names if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(names)} (got {len(given)})")


class _Backoff(Protocol):
    @property
    def backoff_base_ms(self) -> int: ...
    @property
    def backoff_max_ms(self) -> int: ...


def check_backoff(policy: _Backoff) -> None:
    if policy.backoff_max_ms < policy.backoff_base_ms:
        raise ValueError("backoff_max_ms must be >= backoff_base_ms")


def check_health_path(v: str) -> str:
    if not v.startswith("/") or any(c.isspace() or ord(c) < 0x21 for c in v):
        raise ValueError("must start with '/' and contain no spaces or control characters")
    return v


def check_endpoints(v: tuple[str, ...]) -> tuple[str, ...]:
    for address in v:
        parse_address(address)
    if len(set(v)) != len(v):
        raise ValueError("duplicate endpoint address")
    return v


def dns_label(v: str) -> str:
    if not DNS_LABEL.match(v):
        raise ValueError(f"{v!r} is not a DNS label (lower-case letters, digits, '-')")
    return v


def check_version_names(v: Mapping[str, object]) -> Mapping[str, object]:
    for name in v:
        if not VERSION_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid version name")
    return v


# ---------------------------------------------------------------------------------------------
# The config types: field names, types and defaults exactly as in protocol.py.


@dataclass(frozen=True, slots=True, kw_only=True)
class PathMatch:
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    path: PathMatch | None = None
    methods: tuple[str, ...] | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    version: str
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    percent: float = 20.0
    min_retries_per_second: float = 10.0
    window_s: float = 10.0


RetryOn = Literal["5xx", "gateway-error", "connect-failure", "reset"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int = 2
    per_try_timeout_ms: int | None = None
    retry_on: tuple[RetryOn, ...] = ("5xx", "connect-failure", "reset")
    retry_non_idempotent: bool = False
    backoff_base_ms: int = 25
    backoff_max_ms: int = 250


@dataclass(frozen=True, slots=True, kw_only=True)
class DelayFault:
    percent: float
    duration_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortFault:
    percent: float
    status: int = 503


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPolicy:
    delay: DelayFault | None = None
    abort: AbortFault | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorPolicy:
    version: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    name: str
    match: RouteMatch = RouteMatch()
    backends: tuple[Backend, ...]
    timeout_ms: int | None = None
    retries: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    enabled: bool = True
    consecutive_5xx: int = 5
    base_ejection_ms: int = 30_000
    max_ejection_ms: int = 300_000


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    connect_timeout_ms: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    path: str = "/healthz"
    interval_ms: int = 10_000
    timeout_ms: int = 1_000
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter_percent: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionConfig:
    endpoints: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    name: str
    namespace: str = "default"
    versions: dict[str, VersionConfig]
    routes: tuple[Route, ...] = ()
    load_balancer: Literal["round_robin", "least_request"] = "least_request"
    timeout_ms: int = 15_000
    retries: RetryPolicy = RetryPolicy()
    retry_budget: RetryBudget = RetryBudget()
    outlier_detection: OutlierDetection = OutlierDetection()
    connection_limits: ConnectionLimits = ConnectionLimits()
    rate_limit: RateLimit | None = None
    health_check: HealthCheck | None = None
    panic_threshold_percent: float = 50.0


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundPolicy:
    timeout_ms: int = 60_000
    rate_limit: RateLimit | None = None
    connection_limits: ConnectionLimits = ConnectionLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class PathNormalization:
    escaped_slashes: Literal["reject", "keep", "unescape"] = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    services: tuple[ServiceConfig, ...] = ()
    inbound: InboundPolicy = InboundPolicy()
    path_normalization: PathNormalization = PathNormalization()


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What the agent tells the control plane about itself (protocol.AgentRegistration)."""

    agent_id: str
    service: str
    namespace: str = "default"
    version: str
    address: str | None = None
    agent_version: str = ""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One validation problem: ``path`` like ``services[0].routes[1].backends[0].version``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidConfig(ValueError):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


# ---------------------------------------------------------------------------------------------
# The validator: pydantic's lax mode, for what YAML and JSON decode to

Loc = tuple[int | str, ...]
Errors = list[tuple[Loc, str]]
Parser = Callable[[Any, Loc, Errors], Any]
_BAD: Any = object()  # a value that failed; its error is already recorded
_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*", re.ASCII)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_I64 = 2**63


def _text(v: Any) -> str | None:
    """The text of a str, or of bytes (YAML's !!binary) as pydantic reads them for a number or
    a boolean."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return None


def _string(
    min_length: int | None = None, max_length: int | None = None, pattern: str | None = None
) -> Parser:
    compiled = re.compile(pattern) if pattern is not None else None

    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        if isinstance(v, str):
            s = v
        elif isinstance(v, bytes | bytearray):
            try:
                s = bytes(v).decode()
            except UnicodeDecodeError:
                message = "Input should be a valid string, unable to parse raw data as a unicode"
                errors.append((loc, message + " string"))
                return _BAD
        else:
            errors.append((loc, "Input should be a valid string"))
            return _BAD
        if min_length is not None and len(s) < min_length:
            unit = "character" if min_length == 1 else "characters"
            errors.append((loc, f"String should have at least {min_length} {unit}"))
            return _BAD
        if max_length is not None and len(s) > max_length:
            unit = "character" if max_length == 1 else "characters"
            errors.append((loc, f"String should have at most {max_length} {unit}"))
            return _BAD
        if compiled is not None and not compiled.search(s):
            errors.append((loc, f"String should match pattern '{pattern}'"))
            return _BAD
        return s

    return parse


_str = _string()


def _bounds(
    value: float, le: float | None, ge: float | None, gt: float | None
) -> str | None:  # pydantic checks le before ge and gt
    if le is not None and not value <= le:
        return f"Input should be less than or equal to {le}"
    if ge is not None and not value >= ge:
        return f"Input should be greater than or equal to {ge}"
    if gt is not None and not value > gt:
        return f"Input should be greater than {gt}"
    return None


def _int(*, ge: int | None = None, gt: int | None = None, le: int | None = None) -> Parser:
    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        out: int | None = None
        problem = "Input should be a valid integer"
        if isinstance(v, int):  # bool too: True is 1
            out = int(v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                problem = "Input should be a finite number"
            elif not v.is_integer():
                problem += ", got a number with a fractional part"
            elif abs(v) >= _I64:
                problem = "Unable to parse input string as an integer, exceeded maximum size"
            else:
                out = int(v)
        elif (s := _text(v)) is not None:
            s = s.strip()
            head, dot, tail = s.partition(".")
            if dot and tail and not tail.strip("0"):
                s = head
            if len(s) > 4300:
                problem = "Unable to parse input string as an integer, exceeded maximum size"
            elif _INT_TEXT.fullmatch(s):
                out = int(s)
            else:
                problem += ", unable to parse string as an integer"
        if out is None:
            errors.append((loc, problem))
            return _BAD
        if (bad := _bounds(out, le, ge, gt)) is not None:
            errors.append((loc, bad))
            return _BAD
        return out

    return parse


def _float(*, ge: int | None = None, gt: int | None = None, le: int | None = None) -> Parser:
    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        out: float | None = None
        problem = "Input should be a valid number"
        if isinstance(v, float):
            out = v
        elif isinstance(v, int):
            with contextlib.suppress(OverflowError):
                out = float(v)
        elif (s := _text(v)) is not None:
            s = s.strip()
            try:
                out = float(s) if s.isascii() else None
            except ValueError:
                out = None
            if out is None:
                problem += ", unable to parse string as a number"
        if out is None:
            errors.append((loc, problem))
            return _BAD
        if (bad := _bounds(out, le, ge, gt)) is not None:
            errors.append((loc, bad))
            return _BAD
        return out

    return parse


def _bool(v: Any, loc: Loc, errors: Errors) -> Any:
    if isinstance(v, bool):
        return v
    number: int | None = None
    if isinstance(v, int):
        number = v
    elif isinstance(v, float) and v.is_integer():
        number = int(v)
    elif (s := _text(v)) is not None:
        word = s.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        errors.append((loc, "Input should be a valid boolean, unable to interpret input"))
        return _BAD
    if number is not None and -_I64 <= number < _I64:
        if number in (0, 1):
            return bool(number)
        errors.append((loc, "Input should be a valid boolean, unable to interpret input"))
        return _BAD
    errors.append((loc, "Input should be a valid boolean"))
    return _BAD


def _literal(*options: str) -> Parser:
    quoted = [f"'{o}'" for o in options]
    expected = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    message = f"Input should be {expected}"

    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        if isinstance(v, str) and v in options:
            return str(v)
        errors.append((loc, message))
        return _BAD

    return parse


def _optional(inner: Parser) -> Parser:
    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        return None if v is None else inner(v, loc, errors)

    return parse


def _tuple(item: Parser, min_length: int = 0) -> Parser:
    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        if not isinstance(v, list | tuple | set | frozenset):
            errors.append((loc, "Input should be a valid tuple"))
            return _BAD
        before = len(errors)
        out = tuple(item(x, (*loc, i), errors) for i, x in enumerate(v))
        valid = sum(1 for x in out if x is not _BAD)
        if valid < min_length:  # pydantic counts the items that passed
            unit = "item" if min_length == 1 else "items"
            message = (
                f"Tuple should have at least {min_length} {unit} after validation, not {valid}"
            )
            errors.append((loc, message))
        if len(errors) > before:
            return _BAD
        return out

    return parse


def _dict(value: Parser) -> Parser:
    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        if not isinstance(v, dict):
            errors.append((loc, "Input should be a valid dictionary"))
            return _BAD
        before = len(errors)
        out = {}
        for k, x in v.items():
            key = _str(k, (*loc, k, "[key]"), errors)
            out[key] = value(x, (*loc, k), errors)
        return _BAD if len(errors) > before else out

    return parse


_PARSERS: dict[type, Parser] = {}


class _Field(NamedTuple):
    name: str
    parse: Parser
    check: Callable[[Any], Any] | None = None  # pydantic's field_validator(mode="after")


T = TypeVar("T")


def _model(
    cls: type[T], *spec: _Field, after: Callable[[T], None] | None = None
) -> Callable[[Any, Loc, Errors], Any]:
    names = {f.name for f in spec}
    declared = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    assert names == declared, f"{cls.__name__}: {names ^ declared}"
    required = {f.name for f in fields(cls) if _no_default(f)}  # type: ignore[arg-type]
    message = f"Input should be a valid dictionary or instance of {cls.__name__}"

    def parse(v: Any, loc: Loc, errors: Errors) -> Any:
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            errors.append((loc, message))
            return _BAD
        before = len(errors)
        values: dict[str, Any] = {}
        for f in spec:
            if f.name in v:
                where = (*loc, f.name)
                value = f.parse(v[f.name], where, errors)
                if value is not _BAD and f.check is not None:
                    try:
                        value = f.check(value)
                    except ValueError as exc:
                        errors.append((where, str(exc)))
                        value = _BAD
                values[f.name] = value
            elif f.name in required:
                errors.append(((*loc, f.name), "Field required"))
        for key in v:
            if key not in names:
                unknown = "Extra inputs are not permitted" if isinstance(key, str) else None
                errors.append(((*loc, key), unknown or "Keys should be strings"))
        if len(errors) > before:
            return _BAD
        obj = cls(**values)
        if after is not None:
            try:
                after(obj)
            except ValueError as exc:
                errors.append((loc, str(exc)))
                return _BAD
        return obj

    _PARSERS[cls] = parse
    return parse


def _no_default(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _one_of(names: tuple[str, ...], what: str) -> Callable[[Any], None]:
    return lambda model: check_one_of(model, names, what)


_percent = _float(ge=0, le=100)
_str_or_none = _optional(_str)
_rate_limit = _model(
    RateLimit, _Field("requests_per_second", _float(gt=0)), _Field("burst", _int(ge=1))
)
_connection_limits = _model(
    ConnectionLimits,
    _Field("max_connections", _int(ge=1)),
    _Field("max_pending_requests", _int(ge=0)),
    _Field("connect_timeout_ms", _int(gt=0)),
)
_retries = _model(
    RetryPolicy,
    _Field("attempts", _int(ge=0, le=10)),
    _Field("per_try_timeout_ms", _optional(_int(gt=0))),
    _Field("retry_on", _tuple(_literal("5xx", "gateway-error", "connect-failure", "reset"))),
    _Field("retry_non_idempotent", _bool),
    _Field("backoff_base_ms", _int(gt=0)),
    _Field("backoff_max_ms", _int(gt=0)),
    after=check_backoff,
)
_route = _model(
    Route,
    _Field("name", _str),
    _Field(
        "match",
        _model(
            RouteMatch,
            _Field(
                "path",
                _optional(
                    _model(
                        PathMatch,
                        _Field("exact", _str_or_none, check_path_start),
                        _Field("prefix", _str_or_none, check_path_start),
                        _Field("regex", _str_or_none, check_regex),
                        after=_one_of(("exact", "prefix", "regex"), "a path match"),
                    )
                ),
            ),
            _Field("methods", _optional(_tuple(_str)), check_methods),
            _Field(
                "headers",
                _tuple(
                    _model(
                        HeaderMatch,
                        _Field("name", _str, check_header_name),
                        _Field("exact", _str_or_none),
                        _Field("prefix", _str_or_none),
                        _Field("regex", _str_or_none, check_regex),
                        _Field("present", _optional(_bool)),
                        _Field("invert", _bool),
                        after=_one_of(("exact", "prefix", "regex", "present"), "a header match"),
                    )
                ),
            ),
        ),
    ),
    _Field(
        "backends",
        _tuple(
            _model(Backend, _Field("version", _str), _Field("weight", _int(ge=0, le=1_000_000))),
            min_length=1,
        ),
    ),
    _Field("timeout_ms", _optional(_int(ge=0))),
    _Field("retries", _optional(_retries)),
    _Field(
        "fault",
        _optional(
            _model(
                FaultPolicy,
                _Field(
                    "delay",
                    _optional(
                        _model(
                            DelayFault,
                            _Field("percent", _percent),
                            _Field("duration_ms", _int(ge=0, le=3_600_000)),
                        )
                    ),
                ),
                _Field(
                    "abort",
                    _optional(
                        _model(
                            AbortFault,
                            _Field("percent", _percent),
                            _Field("status", _int(ge=200, le=599)),
                        )
                    ),
                ),
            )
        ),
    ),
    _Field(
        "mirror",
        _optional(_model(MirrorPolicy, _Field("version", _str), _Field("percent", _percent))),
    ),
)
_service = _model(
    ServiceConfig,
    _Field("name", _str, dns_label),
    _Field("namespace", _str, dns_label),
    _Field(
        "versions",
        _dict(
            _model(
                VersionConfig,
                _Field("endpoints", _tuple(_str), check_endpoints),
                _Field("labels", _dict(_str)),
            )
        ),
        check_version_names,
    ),
    _Field("routes", _tuple(_route)),
    _Field("load_balancer", _literal("round_robin", "least_request")),
    _Field("timeout_ms", _int(ge=0)),
    _Field("retries", _retries),
    _Field(
        "retry_budget",
        _model(
            RetryBudget,
            _Field("percent", _percent),
            _Field("min_retries_per_second", _float(ge=0)),
            _Field("window_s", _float(gt=0, le=600)),
        ),
    ),
    _Field(
        "outlier_detection",
        _model(
            OutlierDetection,
            _Field("enabled", _bool),
            _Field("consecutive_5xx", _int(ge=1)),
            _Field("base_ejection_ms", _int(ge=0)),
            _Field("max_ejection_ms", _int(ge=0)),
        ),
    ),
    _Field("connection_limits", _connection_limits),
    _Field("rate_limit", _optional(_rate_limit)),
    _Field(
        "health_check",
        _optional(
            _model(
                HealthCheck,
                _Field("path", _str, check_health_path),
                _Field("interval_ms", _int(ge=10, le=3_600_000)),
                _Field("timeout_ms", _int(gt=0, le=60_000)),
                _Field("healthy_threshold", _int(ge=1, le=100)),
                _Field("unhealthy_threshold", _int(ge=1, le=100)),
                _Field("jitter_percent", _percent),
            )
        ),
    ),
    _Field("panic_threshold_percent", _percent),
)
_mesh = _model(
    MeshConfig,
    _Field("services", _tuple(_service)),
    _Field(
        "inbound",
        _model(
            InboundPolicy,
            _Field("timeout_ms", _int(ge=0)),
            _Field("rate_limit", _optional(_rate_limit)),
            _Field("connection_limits", _connection_limits),
        ),
    ),
    _Field(
        "path_normalization",
        _model(
            PathNormalization, _Field("escaped_slashes", _literal("reject", "keep", "unescape"))
        ),
    ),
)


def _no_newline(check: Callable[[str], object], what: str) -> Callable[[str], str]:
    def checked(v: str) -> str:
        check(v)
        if v.endswith("\n"):
            raise ValueError(f"{v!r} is not {what}")
        return v

    return checked


def _version_name(v: str) -> str:
    if not VERSION_NAME.match(v) or v.endswith("\n"):
        raise ValueError(f"{v!r} is not a valid version name")
    return v


def check_reachable_address(v: str | None) -> str | None:
    """An agent's advertised address: host:port that callers can reach (not a wildcard)."""
    if v is None:
        return v
    host, _ = parse_address(v)
    if v.endswith("\n"):
        raise ValueError(f"{v!r} is not host:port")
    if host in ("0.0.0.0", "::"):
        raise ValueError(f"{v!r} is not an address callers can reach (advertise a real one)")
    return v


_dns_label_no_newline = _no_newline(dns_label, "a DNS label (lower-case letters, digits, '-')")
_registration = _model(
    Registration,
    _Field("agent_id", _string(min_length=1, max_length=64, pattern=AGENT_ID_PATTERN)),
    _Field("service", _str, _dns_label_no_newline),
    _Field("namespace", _str, _dns_label_no_newline),
    _Field("version", _str, _version_name),
    _Field("address", _str_or_none, check_reachable_address),
    _Field("agent_version", _string(max_length=63)),
)


def issue_path(loc: Loc) -> str:
    """``services[0].routes[1].name`` from a location; parts such as ``[key]`` (where in a
    mapping a bad key is) are left out, as the agent has always reported pydantic's."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and "[" in part:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _run(parser: Parser, data: Any) -> Any:
    errors: Errors = []
    value = parser(data, (), errors)
    if errors:
        raise InvalidConfig([ConfigIssue(issue_path(loc), message) for loc, message in errors])
    return value


def validate(cls: type[T], data: Any) -> T:
    """``data`` checked as a ``cls`` (any config type here); raise InvalidConfig."""
    value: T = _run(_PARSERS[cls], data)
    return value


def mesh_config(data: Any) -> MeshConfig:
    """Field-level validation of decoded data (a mapping); raise InvalidConfig listing every
    problem. Cross-field checks are :func:`consistency_errors`."""
    config: MeshConfig = _run(_mesh, data)
    return config


def registration(**values: Any) -> Registration:
    """A checked :class:`Registration`; raise InvalidConfig when a value is not acceptable."""
    reg: Registration = _run(_registration, values)
    return reg


# ---------------------------------------------------------------------------------------------
# Cross-field checks and the content hash, for these types and protocol.py's alike


class _BackendLike(Protocol):
    @property
    def version(self) -> str: ...
    @property
    def weight(self) -> int: ...


class _MirrorLike(Protocol):
    @property
    def version(self) -> str: ...


class _RouteLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def backends(self) -> Sequence[_BackendLike]: ...
    @property
    def mirror(self) -> _MirrorLike | None: ...


class _VersionLike(Protocol):
    @property
    def endpoints(self) -> Sequence[str]: ...


class _ServiceLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def versions(self) -> Mapping[str, _VersionLike]: ...
    @property
    def routes(self) -> Sequence[_RouteLike]: ...


class _ConfigLike(Protocol):
    @property
    def services(self) -> Sequence[_ServiceLike]: ...


def consistency_errors(config: _ConfigLike) -> list[ConfigIssue]:
    """Cross-field checks that a per-field validator cannot make."""
    issues: list[ConfigIssue] = []
    seen: dict[tuple[str, str], int] = {}
    for i, svc in enumerate(config.services):
        where = f"services[{i}]"
        first = seen.setdefault((svc.namespace, svc.name), i)
        if first != i:
            issues.append(
                ConfigIssue(
                    path=f"{where}.name",
                    message=f"duplicate service {svc.name!r} in namespace {svc.namespace!r} "
                    f"(first defined at services[{first}])",
                )
            )
        with_endpoints = sorted(v for v, vc in svc.versions.items() if vc.endpoints)
        known = ", ".join(with_endpoints) or "none"

        def check_version(
            path: str, version: str, svc: _ServiceLike = svc, known: str = known
        ) -> None:
            if version not in svc.versions:
                issues.append(
                    ConfigIssue(
                        path=path,
                        message=f"service {svc.name!r} has no version {version!r} "
                        f"(versions with endpoints: {known})",
                    )
                )
            elif not svc.versions[version].endpoints:
                issues.append(
                    ConfigIssue(
                        path=path,
                        message=f"version {version!r} of service {svc.name!r} has no endpoints "
                        f"(versions with endpoints: {known})",
                    )
                )

        route_names: dict[str, int] = {}
        for j, route in enumerate(svc.routes):
            rwhere = f"{where}.routes[{j}]"
            prev = route_names.setdefault(route.name, j)
            if prev != j:
                issues.append(
                    ConfigIssue(
                        path=f"{rwhere}.name",
                        message=f"duplicate route name {route.name!r} in service {svc.name!r} "
                        f"(first at {where}.routes[{prev}])",
                    )
                )
            for k, backend in enumerate(route.backends):
                check_version(f"{rwhere}.backends[{k}].version", backend.version)
            if sum(b.weight for b in route.backends) == 0:
                issues.append(ConfigIssue(path=f"{rwhere}.backends", message="weights sum to 0"))
            if route.mirror is not None:
                check_version(f"{rwhere}.mirror.version", route.mirror.version)
        if not svc.routes and not with_endpoints:
            issues.append(ConfigIssue(path=f"{where}.versions", message="no version has endpoints"))
    return issues


def to_json(value: Any) -> Any:
    """JSON-ready data, as pydantic's ``model_dump(mode="json")`` gives it for protocol.py's
    models: every field (defaults too), tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def content_hash(data: Any) -> str:
    """The config version: equal content gives an equal version on both sides, whatever the
    formatting or key order of the source."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_version(config: MeshConfig) -> str:
    return content_hash(to_json(config))
