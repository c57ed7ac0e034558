"""The latest snapshot per agent group, and the held polls waiting for a newer one.

Written by the hub's compiler thread, read by the discovery route on the event loop: state sits
behind a lock, and waiters are futures of the loop, woken through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from app.agents.snapshot import GroupKey
from mesh_agent.protocol import MeshConfig

__all__ = ["GroupSnapshot", "SnapshotCache"]

HISTORY = 64


@dataclass
class GroupSnapshot:
    version: str
    generation: int
    config: MeshConfig
    services: list[GroupKey]
    config_json: bytes = b""
    # version -> generation of the recent snapshots, to tell whether an ACKed version is at
    # least as new as a change.
    history: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def body(self, nonce: str) -> bytes:
        """The DiscoveryResponse, serialised once per version (only the nonce varies)."""
        head = json.dumps({"version": self.version, "nonce": nonce})[:-1].encode()
        return head + b', "config": ' + self.config_json + b"}"


class SnapshotCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[GroupKey, GroupSnapshot] = {}
        self._futures: dict[GroupKey, asyncio.Future[None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def get(self, key: GroupKey) -> GroupSnapshot | None:
        with self._lock:
            return self._groups.get(key)

    def groups(self) -> dict[GroupKey, GroupSnapshot]:
        with self._lock:
            return dict(self._groups)

    def generation_of(self, key: GroupKey, version: str | None) -> int:
        """-1 for a version this control plane never served (e.g. one from before a restart)."""
        if version is None:
            return -1
        with self._lock:
            snap = self._groups.get(key)
            return -1 if snap is None else snap.history.get(version, -1)

    def set(self, key: GroupKey, config: MeshConfig, version: str, services: list[GroupKey]) -> int:
        """Store a group's snapshot; returns its generation, bumped only if the content changed
        (so agents already on it are not woken)."""
        with self._lock:
            old = self._groups.get(key)
            if old is not None and old.version == version:
                old.services = services
                return old.generation
            generation = old.generation + 1 if old is not None else 1
            history = old.history if old is not None else OrderedDict()
            history[version] = generation
            while len(history) > HISTORY:
                history.popitem(last=False)
            self._groups[key] = GroupSnapshot(
                version=version,
                generation=generation,
                config=config,
                services=services,
                config_json=config.model_dump_json().encode(),
                history=history,
            )
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, key)
        return generation

    def _wake(self, key: GroupKey) -> None:
        future = self._futures.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(
        self, key: GroupKey, known: Collection[str | None], hold_s: float
    ) -> GroupSnapshot | None:
        """The group's snapshot as soon as its version is none of ``known`` (what the agent
        runs, what it refused), or None after ``hold_s`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        while True:
            snap = self.get(key)
            if snap is not None and snap.version not in known:
                return snap
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            future = self._futures.get(key)
            if future is None or future.done():
                future = self._futures[key] = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(future), remaining)
            except TimeoutError:
                return None
