"""One agent's lifecycle: wire the parts together, start the listeners, serve, drain, close.

``mesh-agent`` (``__main__``) and the tests both run an agent through :class:`Agent`, so what
the tests exercise is the production wiring (the config store pruning endpoints on each swap,
the admin listener's metrics, the config source started after the listeners), not a copy of it.

Where configs come from is a parameter: ``source_factory`` builds a
:class:`~mesh_agent.control.ConfigSource` for the agent's store (a file, the control plane), so a
new source plugs in without touching this module. It is called in :meth:`Agent.start`, once the
listeners are bound, with their addresses: a source that registers this instance (the control
plane) can then advertise the inbound port even when it was 0 on the command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mesh_agent.admin import AdminServer
from mesh_agent.balancer import EndpointRegistry
from mesh_agent.control import ConfigSource, ConfigStore
from mesh_agent.health import HealthChecker
from mesh_agent.native import compiled_modules
from mesh_agent.proxy import Limits, Proxy, TelemetryLike
from mesh_agent.routing import CompiledConfig

__all__ = ["Address", "Agent", "AgentTelemetry", "SourceFactory"]

log = logging.getLogger("mesh_agent")

Address = tuple[str, int]
# Builds the config source for a store, given the bound listeners' addresses by name.
SourceFactory = Callable[[ConfigStore, Mapping[str, str]], ConfigSource]


class AgentTelemetry(TelemetryLike, Protocol):
    """What the agent needs from its telemetry: the proxy's hooks and the Prometheus text."""

    def prometheus_text(self) -> bytes: ...


class Agent:
    """Inbound, outbound and admin listeners of one service instance around one config store.

    Lifecycle: construct (wiring only, no sockets), optionally put a first config into
    :attr:`store`, :meth:`start` (bind the listeners, start the config source), :meth:`serve`
    (until :meth:`stop`), :meth:`drain` (no new connections; requests in flight may finish
    within ``limits.drain_timeout_s``), :meth:`close`.
    """

    def __init__(
        self,
        *,
        service: str,
        telemetry: AgentTelemetry,
        version: str = "v1",
        namespace: str = "default",
        app: Address | None = None,
        limits: Limits | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        source_factory: SourceFactory | None = None,
        bootstrap: dict[str, Any] | None = None,
    ) -> None:
        self.service = service
        self.version = version
        self.namespace = namespace
        self.app = app
        self.limits = limits or Limits()
        self.telemetry = telemetry
        self.registry = EndpointRegistry()
        self.health = HealthChecker()
        self.store = ConfigStore(self.registry, state_dir, on_swap=self._on_swap)
        self._source_factory = source_factory
        self.source: ConfigSource | None = None  # built by start(), once the listeners are bound
        self.bootstrap: dict[str, Any] = {
            "service": service,
            "version": version,
            "namespace": namespace,
            "app": f"{app[0]}:{app[1]}" if app else None,
            "state_dir": os.fspath(state_dir) if state_dir is not None else None,
            **(bootstrap or {}),
        }
        self.listeners: dict[str, str] = {}
        self.proxy: Proxy | None = None
        self.admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._drained = False

    def _on_swap(self, compiled: CompiledConfig) -> None:
        # Connections to endpoints that no config references any more would otherwise idle on.
        if self.proxy is not None:
            self.proxy.prune_endpoints(compiled.endpoints)
        self.health.update(compiled)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(
        self,
        *,
        outbound: Address,
        inbound: Address | None = None,
        admin: Address | None = None,
    ) -> dict[str, str]:
        """Bind the listeners (inbound only with an app, admin only if given), then build and start
        the config source. Returns the bound addresses by name (port 0 resolved). On OSError
        everything already bound is closed again before the error propagates."""
        self.proxy = proxy = Proxy(
            holder=self.store.holder,
            telemetry=self.telemetry,
            registry=self.registry,
            service=self.service,
            version=self.version,
            namespace=self.namespace,
            app=self.app,
            limits=self.limits,
        )
        listeners = self.listeners
        try:
            if self.app is not None and inbound is not None:
                listeners["inbound"] = _joined(await proxy.inbound.start(*inbound))
            listeners["outbound"] = _joined(await proxy.outbound.start(*outbound))
            if admin is not None:
                self.admin = AdminServer(
                    config=self.store,
                    metrics=self.telemetry,
                    bootstrap={**self.bootstrap, "listeners": listeners},
                    extra_metrics=self._agent_metrics,
                    header_timeout_s=self.limits.header_timeout_s,
                    idle_timeout_s=self.limits.idle_timeout_s,
                )
                listeners["admin"] = _joined(await self.admin.start(*admin))
        except OSError:
            await self.close()
            raise
        self.health.start(self.store.holder.current)
        if self._source_factory is not None:
            self.source = self._source_factory(self.store, dict(listeners))
            self.source.start()
        return dict(listeners)

    def stop(self) -> None:
        """Make :meth:`serve` return (SIGTERM, SIGINT)."""
        self._stop.set()

    def reload(self) -> None:
        """Ask the config source for a config now (SIGHUP)."""
        if self.source is None:
            log.info("reload ignored: no config source")
        else:
            self.source.trigger()

    async def serve(self) -> None:
        """Serve until :meth:`stop`, then drain."""
        await self._stop.wait()
        log.info("draining")
        await self.drain()

    async def drain(self) -> None:
        """Stop taking configs and connections; let requests in flight finish (up to
        ``limits.drain_timeout_s``), then close client and upstream connections."""
        if self._drained:
            return
        self._drained = True
        if self.source is not None:
            await self.source.stop()
        await self.health.stop()
        if self.proxy is not None:
            await self.proxy.close()

    async def close(self) -> None:
        """Drain if not done yet, then close the admin listener."""
        await self.drain()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None

    # -- admin ------------------------------------------------------------------------------

    def _agent_metrics(self) -> bytes:
        store = self.store
        version = store.loaded.version if store.loaded else "none"
        proxy = self.proxy
        connections = proxy.connection_count() if proxy is not None else 0
        overflowed = proxy.inbound.overflowed + proxy.outbound.overflowed if proxy else 0
        fast_in = proxy.inbound_side.fast_requests if proxy else 0
        fast_out = proxy.outbound_side.fast_requests if proxy else 0
        return (
            "# HELP mesh_agent_config_info Config version in force.\n"
            "# TYPE mesh_agent_config_info gauge\n"
            f'mesh_agent_config_info{{version="{version}"}} 1\n'
            "# HELP mesh_agent_config_updates_total Config updates by result.\n"
            "# TYPE mesh_agent_config_updates_total counter\n"
            f'mesh_agent_config_updates_total{{result="accepted"}} {store.accepted}\n'
            f'mesh_agent_config_updates_total{{result="rejected"}} {store.rejected}\n'
            "# HELP mesh_agent_downstream_connections Open client connections.\n"
            "# TYPE mesh_agent_downstream_connections gauge\n"
            f"mesh_agent_downstream_connections {connections}\n"
            "# HELP mesh_agent_downstream_connections_overflow_total Client connections "
            "closed at once: the listener held --max-connections.\n"
            "# TYPE mesh_agent_downstream_connections_overflow_total counter\n"
            f"mesh_agent_downstream_connections_overflow_total {overflowed}\n"
            "# HELP mesh_agent_fast_path_requests_total Requests relayed from callbacks alone "
            "(no body, an idle pooled connection ready).\n"
            "# TYPE mesh_agent_fast_path_requests_total counter\n"
            f'mesh_agent_fast_path_requests_total{{side="inbound"}} {fast_in}\n'
            f'mesh_agent_fast_path_requests_total{{side="outbound"}} {fast_out}\n'
            "# HELP mesh_agent_compiled_modules Request-path modules running compiled (mypyc); "
            "0: interpreted.\n"
            "# TYPE mesh_agent_compiled_modules gauge\n"
            f"mesh_agent_compiled_modules {len(compiled_modules())}\n"
            + self.health.prometheus_text()
        ).encode()


def _joined(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def state_dir_for(base: str | os.PathLike[str], namespace: str, service: str) -> Path:
    """Where one service instance keeps its last good config under ``--state-dir``."""
    return Path(base) / f"{namespace}.{service}"
