"""Computed topologies kept for a few seconds, per query.

The topology page refreshes every few seconds, and every open console asks for the same few
graphs. Building one (200 services, 1,000 edges: summing figures, the stages, percentiles for
every node and edge, validation, JSON) costs 50 to 200 ms of CPU however well the rollups are
cached (:class:`app.telemetry.read.EdgeWindowCache` covers only the database read). A graph
from ``ttl_s`` ago is as good an answer to a refresh: its figures are rates over a window of a
minute or more, and the agents report every few seconds anyway. So the graph, and its JSON
once asked for, are kept for ``ttl_s`` per query; errors (an unknown focus) are not kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from app.topology import schemas

__all__ = ["CachedTopology", "TopologyCache"]

DEFAULT_TTL_S = 2.0


class CachedTopology:
    """One computed graph and, made on first use, its JSON."""

    def __init__(self, graph: schemas.Topology) -> None:
        self.graph = graph
        self._json: bytes | None = None

    @property
    def json(self) -> bytes:
        # Two threads may both serialise it once; both answers are the same bytes.
        if self._json is None:
            self._json = self.graph.model_dump_json().encode()
        return self._json


class TopologyCache:
    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        max_entries: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, CachedTopology]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], schemas.Topology]) -> CachedTopology:
        """The cached graph for ``key`` if younger than ``ttl_s``, else ``compute()``'s (whose
        exceptions propagate and leave nothing cached)."""
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is not None and now - found[0] < self.ttl_s:
                self.hits += 1
                self._entries.move_to_end(key)  # the least recently asked for go first
                return found[1]
            self.misses += 1
        # Computed outside the lock: two concurrent misses may both compute, and the later one
        # is kept; neither waits for the other's database read.
        entry = CachedTopology(compute())
        with self._lock:
            self._entries[key] = (self._clock(), entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry
