"""Active health checks: each endpoint of a service with a ``health_check`` is probed with an
HTTP GET on its own schedule; its ``healthy`` flag (read by the balancers) follows the
thresholds. Probes use their own short-lived connections, never the request pools, so a check
can neither wait behind traffic nor leave a pooled connection in an unknown state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from mesh_agent import schema
from mesh_agent.balancer import Endpoint
from mesh_agent.routing import CompiledConfig

__all__ = ["HealthChecker", "probe"]

log = logging.getLogger("mesh_agent.health")

_MAX_STATUS_LINE = 1024


async def probe(endpoint: Endpoint, check: schema.HealthCheck, host: str) -> bool:
    """One check: True when ``GET check.path`` answers 2xx within ``check.timeout_ms``."""
    request = (
        f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-agent-health\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout_ms / 1000.0):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            writer.write(request)
            line = await reader.readuntil(b"\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = line[:_MAX_STATUS_LINE].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False
    return 200 <= int(parts[1]) < 300


class _Target:
    """One endpoint under one check: its task and its run of passes or failures."""

    __slots__ = ("check", "endpoint", "failures", "passes", "service", "task")

    def __init__(self, endpoint: Endpoint, check: schema.HealthCheck, service: str) -> None:
        self.endpoint = endpoint
        self.check = check
        self.service = service
        self.passes = 0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None


class HealthChecker:
    """Keeps one probing task per checked endpoint in line with the config in force."""

    def __init__(
        self,
        rng: Callable[[], float] = random.random,
        probe: Callable[[Endpoint, schema.HealthCheck, str], Awaitable[bool]] = probe,
    ) -> None:
        self._rng = rng
        self._probe = probe
        self._targets: dict[int, _Target] = {}
        self._running = False
        self.checks = {"pass": 0, "fail": 0}

    def start(self, config: CompiledConfig) -> None:
        self._running = True
        self.update(config)

    def update(self, config: CompiledConfig) -> None:
        """Check what ``config`` asks to be checked: new endpoints get a task, endpoints whose
        check changed get a new one, endpoints no longer checked are healthy again."""
        if not self._running:
            return
        wanted: dict[int, tuple[Endpoint, schema.HealthCheck, str]] = {}
        for svc in config.services:
            check = svc.health_check
            if check is None:
                continue
            for pool in svc.pools.values():
                for ep in pool.endpoints:
                    wanted[id(ep)] = (ep, check, svc.name)
        for key, target in list(self._targets.items()):
            want = wanted.get(key)
            if want is None or want[1] != target.check:
                self._drop(key)
        for key, (ep, check, service) in wanted.items():
            if key not in self._targets:
                target = self._targets[key] = _Target(ep, check, service)
                target.task = asyncio.get_running_loop().create_task(self._run(target))

    def _drop(self, key: int) -> None:
        target = self._targets.pop(key)
        if target.task is not None:
            target.task.cancel()
        target.endpoint.healthy = True  # nothing checks it any more

    async def stop(self) -> None:
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        for key in list(self._targets):
            self._drop(key)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, target: _Target) -> None:
        check = target.check
        interval = check.interval_ms / 1000.0
        jitter = check.jitter_percent / 100.0
        while True:
            try:
                ok = await self._probe(target.endpoint, check, target.service)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check of %s failed unexpectedly", target.endpoint.address)
                ok = False
            self._record(target, ok)
            await asyncio.sleep(interval * (1.0 + jitter * (2.0 * self._rng() - 1.0)))

    def _record(self, target: _Target, ok: bool) -> None:
        ep = target.endpoint
        check = target.check
        self.checks["pass" if ok else "fail"] += 1
        if ok:
            target.passes += 1
            target.failures = 0
            if not ep.healthy and target.passes >= check.healthy_threshold:
                ep.healthy = True
                log.info("%s of %s is healthy again", ep.address, target.service)
        else:
            target.failures += 1
            target.passes = 0
            if ep.healthy and target.failures >= check.unhealthy_threshold:
                ep.healthy = False
                log.warning("%s of %s failed its health check", ep.address, target.service)

    def prometheus_text(self) -> str:
        """Per checked endpoint, whether it is healthy; and the checks made, by result."""
        lines = [
            "# HELP mesh_agent_endpoint_healthy Active health check state (1 healthy, 0 not).\n",
            "# TYPE mesh_agent_endpoint_healthy gauge\n",
        ]
        for t in sorted(self._targets.values(), key=lambda t: (t.service, t.endpoint.address)):
            lines.append(
                f'mesh_agent_endpoint_healthy{{service="{t.service}",'
                f'endpoint="{t.endpoint.address}"}} {int(t.endpoint.healthy)}\n'
            )
        lines += [
            "# HELP mesh_agent_health_checks_total Health checks made, by result.\n",
            "# TYPE mesh_agent_health_checks_total counter\n",
            f'mesh_agent_health_checks_total{{result="pass"}} {self.checks["pass"]}\n',
            f'mesh_agent_health_checks_total{{result="fail"}} {self.checks["fail"]}\n',
        ]
        return "".join(lines)
