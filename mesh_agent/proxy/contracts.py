"""What the proxy needs from the rest of the agent and what it is configured with: the config
holder it reads, the telemetry it reports to, the limits it enforces."""

from __future__ import annotations

from typing import Protocol

from mesh_agent.routing import CompiledConfig

__all__ = ["ConfigHolder", "Limits", "SpanLike", "TelemetryLike"]


class Limits:
    """Slow-client and idle timeouts in seconds and the caps on what a client may make the
    agent hold (bootstrap settings, not pushed config).

    Memory a listener can be made to hold for request heads is bounded by ``max_connections``
    x (``MAX_HEADER_BYTES`` + ``max_headers`` x the cost of one parsed header): with the
    defaults, about 1024 x 100 KiB = 100 MiB per listener, and nothing past the header timeout.
    """

    __slots__ = (
        "body_timeout_s",
        "drain_timeout_s",
        "header_timeout_s",
        "idle_timeout_s",
        "max_connections",
        "max_headers",
        "upstream_idle_s",
    )

    def __init__(
        self,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        upstream_idle_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        max_connections: int = 1024,
        max_headers: int = 100,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.upstream_idle_s = upstream_idle_s
        self.drain_timeout_s = drain_timeout_s
        # Per listener: a connection past it is closed as soon as it is accepted.
        self.max_connections = max_connections
        # Per request head (Envoy's default too): many tiny headers cost far more memory once
        # parsed than their bytes on the wire.
        self.max_headers = max_headers


class SpanLike(Protocol):
    def traceparent(self) -> bytes: ...
    def describe(self, name: str, attributes: dict[str, str]) -> None: ...
    def end(self, status: int | None) -> None: ...


class TelemetryLike(Protocol):
    """What the proxy needs from ``mesh_agent.telemetry.Telemetry``. Called positionally, once
    or twice per request: through a protocol, compiled code makes a generic Python call, and
    keyword arguments are matched by name on every one of them."""

    def record(
        self,
        source: str,
        destination: str,
        destination_version: str,
        status: int | None,
        duration_s: float,
    ) -> None: ...

    def begin(self, kind: str, traceparent: bytes | None) -> tuple[SpanLike | None, bytes | None]:
        """This hop's span, None when the request is not sampled (its name and attributes
        follow with ``describe``, so an unsampled request never builds them), and the
        ``traceparent`` to send upstream."""
        ...


class ConfigHolder:
    """The config in force. Swapping is one attribute assignment, atomic for every reader."""

    __slots__ = ("current",)

    def __init__(self, current: CompiledConfig) -> None:
        self.current = current
