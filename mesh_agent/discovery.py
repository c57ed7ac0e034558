"""The control-plane config source: register, then long-poll for snapshots, ACK or NACK each.

xDS semantics over plain HTTP/1.1: every poll carries the version the agent runs and answers the
previous response's nonce (an ACK, or a NACK with the error, the version in force unchanged).
The control plane holds the poll until the agent's group has a snapshot it does not run yet, so
a change arrives as soon as it is compiled and nothing is sent while nothing changes. A rejected
snapshot never replaces the config in force (:class:`~mesh_agent.control.ConfigStore` keeps the
last good one and persists it, so a restart while the control plane is away serves it too).
Connection failures back off with full jitter; traffic goes on meanwhile with the config in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

from mesh_agent import __version__
from mesh_agent.config import ConfigError, validate_config
from mesh_agent.control import ConfigStore
from mesh_agent.schema import Registration, to_json

__all__ = ["ControlPlaneError", "ControlPlaneSource", "stable_agent_id"]

log = logging.getLogger("mesh_agent.discovery")

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
CONNECT_TIMEOUT_S = 5.0


class ControlPlaneError(Exception):
    """The control plane could not be reached or answered something unusable."""


class _Unauthorized(ControlPlaneError):
    pass


class _UnknownAgent(ControlPlaneError):
    pass


def stable_agent_id(namespace: str, service: str, version: str, address: str | None) -> str:
    """The same instance gets the same id across restarts, so the control plane updates its
    record instead of collecting dead ones."""
    seed = f"{namespace}/{service}/{version}/{address or 'no-inbound'}"
    return f"{service}-{hashlib.sha256(seed.encode()).hexdigest()[:12]}"


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.done = False
        self.keep_alive = True
        self.too_large = False
        self.parser: httptools.HttpResponseParser | None = None

    # httptools callbacks
    def on_headers_complete(self) -> None:
        # Asked here, not after feed_data: once the message is complete the parser has reset
        # for the next one, forgotten the Content-Length, and says "not keep-alive" every time
        # (each poll then paid for a new TCP connection).
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_RESPONSE_BYTES:
            self.too_large = True
            return
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class _Connection:
    """One keep-alive HTTP/1.1 connection to the control plane (requests go one at a time)."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.base = parts.path.rstrip("/")
        self.host_header = parts.netloc
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, payload: bytes | None, timeout_s: float
    ) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s):
            for attempt in (0, 1):
                fresh = self.writer is None
                if fresh:
                    await self._connect()
                try:
                    return await self._exchange(method, path, payload)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    self.close()
                    # A pooled connection the server closed while idle: retry once on a new one.
                    if fresh or attempt:
                        raise ControlPlaneError(f"connection lost: {exc}") from None
        raise ControlPlaneError("unreachable")  # pragma: no cover

    async def _connect(self) -> None:
        context = ssl.create_default_context() if self.tls else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, ssl=context
                )
        except (OSError, TimeoutError) as exc:
            raise ControlPlaneError(f"cannot connect to {self.host}:{self.port}: {exc}") from None

    async def _exchange(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        assert self.reader is not None
        assert self.writer is not None
        body = payload or b""
        head = (
            f"{method} {self.base}{path} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            f"Authorization: Bearer {self.token}\r\n"
            f"User-Agent: mesh-agent/{__version__}\r\n"
            "Accept: application/json\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        self.writer.write(head + body)
        await self.writer.drain()
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        while not response.done:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("closed by the control plane")
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                self.close()
                raise ControlPlaneError(f"malformed response: {exc}") from None
            if response.too_large:
                self.close()
                raise ControlPlaneError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        status = parser.get_status_code()
        if not response.keep_alive:
            self.close()
        return status, bytes(response.body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class ControlPlaneSource:
    """Feeds ``store`` from the control plane at ``url``; a :class:`ConfigSource`."""

    def __init__(
        self,
        store: ConfigStore,
        *,
        url: str,
        token: str,
        registration: Registration,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 5.0,
    ) -> None:
        self.store = store
        self.url = url.rstrip("/")
        self.registration = registration
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._conn = _Connection(self.url, token)
        self._token = token
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.hold_s = 30.0
        self.connected = False
        self.registered = False
        self.last_error: str | None = None
        self.last_contact: float | None = None
        self._last_log = 0.0
        self._suppressed = 0

    @property
    def agent_id(self) -> str:
        return self.registration.agent_id

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def trigger(self) -> None:
        """Reconnect now instead of waiting out the backoff (SIGHUP)."""
        self._kick.set()

    async def stop(self, *, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._conn.close()
        if deregister and self.registered:
            # Leave the callers' config now rather than after the disconnect grace period.
            conn = _Connection(self.url, self._token)
            with contextlib.suppress(ControlPlaneError, OSError, TimeoutError):
                await conn.request("DELETE", f"/api/v1/agents/{self.agent_id}", None, 2.0)
            conn.close()

    def status(self) -> dict[str, Any]:
        """For the admin /config document."""
        return {
            "control_plane": self.url,
            "agent_id": self.agent_id,
            "connected": self.connected,
            "last_contact": self.last_contact,
            "last_error": self.last_error,
        }

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._register()
                failures = 0
                await self._poll_forever()
            except _UnknownAgent:
                log.warning("the control plane does not know this agent; registering again")
                continue
            except ControlPlaneError as exc:
                self._trouble(str(exc))
            except TimeoutError:
                self._trouble("the control plane did not answer in time")
            except (ValueError, KeyError, TypeError) as exc:
                self._trouble(f"unusable answer from the control plane: {exc}")
            self.connected = False
            self._conn.close()
            failures += 1
            # Full jitter: a fleet reconnecting after an outage spreads itself out.
            delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**failures))
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()

    def _trouble(self, message: str) -> None:
        self.last_error = message
        now = time.monotonic()
        if now - self._last_log >= 60:
            more = f" ({self._suppressed} similar since)" if self._suppressed else ""
            kept = self.store.loaded.version if self.store.loaded else "none"
            log.warning("control plane %s: %s; serving config %s%s", self.url, message, kept, more)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    async def _register(self) -> None:
        status, body = await self._conn.request(
            "POST", "/api/v1/agents", json.dumps(to_json(self.registration)).encode(), 10.0
        )
        self._check(status, body)
        answer = json.loads(body)
        self.hold_s = float(answer.get("poll_hold_s", self.hold_s))
        self.registered = True
        log.info("registered with %s as %s", self.url, self.agent_id)

    def _check(self, status: int, body: bytes) -> None:
        if status == 401:
            raise _Unauthorized("the control plane refused the join token (401)")
        if status == 404:
            raise _UnknownAgent("unknown agent")
        if status >= 400:
            detail = body[:300].decode("utf-8", "replace")
            raise ControlPlaneError(f"HTTP {status}: {detail}")

    async def _poll_forever(self) -> None:
        nonce: str | None = None
        error: str | None = None
        reg = self.registration
        while True:
            loaded = self.store.loaded
            # protocol.DiscoveryRequest, an ACK or NACK; fields that are None are left out
            request = {
                "service": reg.service,
                "service_version": reg.version,
                "namespace": reg.namespace,
                "agent_id": reg.agent_id,
                "version": loaded.version if loaded else None,
                "response_nonce": nonce,
                "error_detail": error,
            }
            status, body = await self._conn.request(
                "POST",
                f"/api/v1/agents/{reg.agent_id}/discovery",
                json.dumps({k: v for k, v in request.items() if v is not None}).encode(),
                self.hold_s + 15.0,
            )
            self._check(status, body)
            self.connected = True
            self.last_contact = time.time()
            self.last_error = None
            nonce, error = None, None
            if status == 204:
                continue
            document = json.loads(body)
            nonce = str(document["nonce"])
            offered = str(document["version"])
            try:
                loaded_config = validate_config(
                    document.get("config"), source=f"control-plane:{self.url}"
                )
            except ConfigError as exc:
                self.store.reject(exc)
                error = exc.detail()
                continue
            if loaded_config.version != offered:
                log.warning(
                    "control plane sent version %s but its content hashes to %s",
                    offered,
                    loaded_config.version,
                )
            self.store.offer(loaded_config)
