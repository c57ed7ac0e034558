"""Computed topologies, kept per query and refreshed off the request path.

The topology page refreshes every few seconds, and every open console asks for the same few
graphs. Building one (200 services, 1,000 edges: summing figures, the stages, percentiles for
every node and edge, validation, JSON) costs 50 to 200 ms of CPU however well the rollups are
cached (:class:`app.telemetry.read.EdgeWindowCache` covers only the database read), and more
on a busy machine. Its figures are rates over a window of a minute or more that agents update
every few seconds, so a graph a few seconds old answers a refresh as well as a new one:

- younger than ``ttl_s``: answered as is;
- older, but younger than ``max_stale_s``: answered as is, and recomputed in a background
  thread for the next request (a person refreshing every 5 s sees figures about 5 s old);
- older than ``max_stale_s``, or never computed: computed while the request waits.

Errors (an unknown focus) are never kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from app.topology import schemas

__all__ = ["DEFAULT_MAX_STALE_S", "DEFAULT_TTL_S", "CachedTopology", "TopologyCache"]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 2.0
DEFAULT_MAX_STALE_S = 30.0

Compute = Callable[[], schemas.Topology]


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
        max_stale_s: float = DEFAULT_MAX_STALE_S,
        max_entries: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, CachedTopology]] = OrderedDict()
        self._refreshing: dict[Hashable, threading.Thread] = {}

    def get(
        self, key: Hashable, compute: Compute, compute_later: Compute | None = None
    ) -> CachedTopology:
        """The graph for ``key``. ``compute`` runs on the caller's thread (with the request's
        session); ``compute_later`` in a background thread, so it must open its own. Without
        ``compute_later`` a graph older than ``ttl_s`` is recomputed at once."""
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                age = now - found[0]
                fresh = age < self.ttl_s
                usable = fresh or (compute_later is not None and age < self.max_stale_s)
                if usable:
                    self._entries.move_to_end(key)  # the least recently asked for go first
                    if not fresh and compute_later is not None:
                        self._refresh_later(key, compute_later)
                    return found[1]
        # Computed outside the lock: two concurrent misses may both compute, and the later one
        # is kept; neither waits for the other's database read.
        return self._store(key, compute())

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the background refreshes under way (tests, benchmarks)."""
        with self._lock:
            threads = list(self._refreshing.values())
        for thread in threads:
            thread.join(timeout_s)

    def _store(self, key: Hashable, graph: schemas.Topology) -> CachedTopology:
        entry = CachedTopology(graph)
        with self._lock:
            self._entries[key] = (self._clock(), entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry

    def _refresh_later(self, key: Hashable, compute_later: Compute) -> None:
        """Start one background recompute of ``key`` unless one is running (lock held)."""
        if key in self._refreshing:
            return

        def refresh() -> None:
            try:
                graph = compute_later()
                self._store(key, graph).json  # noqa: B018  (serialised here, off the request)
            except Exception:
                # The stale graph stays; the next request past max_stale_s computes on its own
                # thread and reports the error to its caller.
                log.warning("background topology refresh failed", exc_info=True)
            finally:
                with self._lock:
                    self._refreshing.pop(key, None)

        # A daemon thread per refresh (at most one per query at a time, a few a minute): an
        # app made and dropped without shutdown, as tests do, leaves no pool behind.
        thread = threading.Thread(target=refresh, name="topology-refresh", daemon=True)
        self._refreshing[key] = thread
        thread.start()
