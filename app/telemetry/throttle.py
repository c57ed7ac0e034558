"""Keeping OTLP ingest from crowding out the console.

Two guards: a token bucket per client (429 with Retry-After when one client sends faster than
its share), and a fixed number of worker threads for decoding and storing (other requests wait
on the event loop, which costs nothing, and past a queue bound get 503). The console's own
routes run in AnyIO's default thread pool, which ingest never touches.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio

__all__ = ["ClientRateLimiter", "IngestSlots"]


class ClientRateLimiter:
    """Token buckets keyed by client; the least recently seen clients are forgotten first."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def client_key(authorization: str | None, address: str | None, agent: str | None = None) -> str:
        # Tokens are hashed so the limiter never holds a credential in memory longer than needed.
        # Every agent presents the same join token, so an agent's own id (X-Mesh-Agent) and its
        # address split the buckets: one agent flooding does not throttle the fleet.
        if authorization:
            token = hashlib.sha256(authorization.encode()).hexdigest()[:32]
            return f"t:{token}:{address or '?'}:{(agent or '')[:128]}"
        return "a:" + (address or "?")

    def acquire(self, key: str) -> float:
        """Take one token; 0.0 when granted, else the seconds until one will be available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))


class IngestSlots:
    """A dedicated thread limiter for ingest with a bound on how many may wait for it."""

    def __init__(self, workers: int, max_waiting: int) -> None:
        self.limiter = anyio.CapacityLimiter(workers)
        self.max_waiting = max_waiting

    @property
    def full(self) -> bool:
        return self.limiter.statistics().tasks_waiting >= self.max_waiting and (
            self.limiter.available_tokens == 0
        )
