"""Where the config comes from and how it is swapped in.

:class:`ConfigStore` owns the config in force: it validates a candidate as a whole, compiles it,
swaps it in with a single assignment (requests in flight keep the compiled object they started
with), persists it as the last good config, and remembers the last rejection so that ``/config``
can show it. A rejected config never replaces the one in force.

:class:`FileSource` feeds the store from ``--config FILE``: it polls the file's stat every second
(cheap: one ``stat`` call) and reloads on change or on demand (SIGHUP). The control-plane stream
is a second :class:`ConfigSource` feeding the same store, ACKing or NACKing with what ``offer``
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mesh_agent.balancer import EndpointRegistry
from mesh_agent.config import (
    ConfigError,
    LoadedConfig,
    load_file,
    load_last_good,
    save_last_good,
)
from mesh_agent.proxy import ConfigHolder
from mesh_agent.routing import CompiledConfig, compile_config
from mesh_agent.schema import MeshConfig, config_version, to_json

__all__ = ["ConfigSource", "ConfigStore", "FileSource", "initial_config"]

log = logging.getLogger("mesh_agent.control")


class ConfigSource(Protocol):
    """Where configs come from: something that offers them to a :class:`ConfigStore` (and
    reports its rejections there) on its own schedule. :class:`FileSource` is one; the
    control-plane client is another. The agent builds one per run from its store."""

    def start(self) -> None:
        """Begin feeding the store (called on the running loop, after the listeners are up)."""

    async def stop(self) -> None:
        """Stop feeding the store; return once nothing more will be offered."""

    def trigger(self) -> None:
        """Reload or reconnect now rather than at the next scheduled time (SIGHUP)."""


class ConfigStore:
    def __init__(
        self,
        registry: EndpointRegistry,
        state_dir: str | os.PathLike[str] | None = None,
        on_swap: Callable[[CompiledConfig], None] | None = None,
    ) -> None:
        self.registry = registry
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.on_swap = on_swap
        empty = MeshConfig()
        self.holder = ConfigHolder(compile_config(empty, config_version(empty), registry))
        self.loaded: LoadedConfig | None = None
        self.loaded_at: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.accepted = 0
        self.rejected = 0

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    def offer(self, loaded: LoadedConfig) -> bool:
        """Swap ``loaded`` in unless it is what is already in force. Returns True if swapped.

        Either way the latest attempt succeeded, so a previous rejection is no longer current.
        """
        self.last_error = None
        if self.loaded is not None and loaded.version == self.loaded.version:
            self.loaded = loaded
            return False
        compiled = compile_config(
            loaded.config, loaded.version, self.registry, previous=self.holder.current
        )
        self.holder.current = compiled
        self.loaded = loaded
        self.loaded_at = time.time()
        self.accepted += 1
        log.info("config %s in force (from %s)", loaded.version, loaded.source)
        if self.state_dir is not None and not loaded.source.startswith("state:"):
            try:
                save_last_good(self.state_dir, loaded)
            except OSError as exc:
                # Serving on is more important than persisting; say so loudly.
                log.error(
                    "could not persist config %s to %s: %s", loaded.version, self.state_dir, exc
                )
        if self.on_swap is not None:
            self.on_swap(compiled)
        return True

    def reject(self, error: ConfigError) -> None:
        self.rejected += 1
        self.last_error = {
            "source": error.source,
            "at": time.time(),
            "error": error.detail(),
            "issues": [{"path": i.path, "message": i.message} for i in error.issues],
        }
        kept = self.loaded.version if self.loaded else "none"
        log.error("%s (keeping config %s)", error.detail(), kept)

    def dump(self) -> dict[str, Any]:
        """The /config document: what is in force, where it came from, the last rejection."""
        loaded = self.loaded
        return {
            "version": loaded.version if loaded else None,
            "source": loaded.source if loaded else None,
            "loaded_at": loaded_at_iso(self.loaded_at),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "last_error": self.last_error,
            "config": to_json(loaded.config) if loaded else None,
        }


def loaded_at_iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def initial_config(store: ConfigStore, config_file: str | None) -> None:
    """At start: the config file if given and valid, else the persisted last good config.

    When the file was unusable and the agent falls back to the persisted config, the file's
    error stays in ``last_error``: /config must say why the agent runs on an older config.
    """
    if config_file is not None:
        try:
            store.offer(load_file(config_file))
            return
        except ConfigError as exc:
            store.reject(exc)
    if store.state_dir is not None:
        try:
            persisted = load_last_good(store.state_dir)
        except ConfigError as exc:
            store.reject(exc)
            persisted = None
        if persisted is not None:
            why = store.last_error
            store.offer(persisted)
            store.last_error = why
            log.warning("started from the persisted config %s", persisted.version)


class FileSource:
    """Reload ``path`` into the store on change (stat polling) or on :meth:`trigger`."""

    def __init__(
        self, path: str | os.PathLike[str], store: ConfigStore, interval_s: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.interval_s = interval_s
        self._stamp = self._stat()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def trigger(self) -> None:
        """Reload now, even if the file looks unchanged (SIGHUP)."""
        self._kick.set()

    def reload(self) -> bool:
        self._stamp = self._stat()
        try:
            loaded = load_file(self.path)
        except ConfigError as exc:
            self.store.reject(exc)
            return False
        self.store.offer(loaded)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._kick.wait()
            except TimeoutError:
                pass
            forced = self._kick.is_set()
            self._kick.clear()
            stamp = self._stat()
            if forced or (stamp != self._stamp and stamp is not None):
                try:
                    self.reload()
                except Exception:
                    log.exception("unexpected error while reloading %s", self.path)
            elif stamp is None and self._stamp is not None:
                self._stamp = None
                log.warning("config file %s disappeared; keeping the config in force", self.path)
