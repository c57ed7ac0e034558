"""Join tokens kept in the database (``meshctl``/console: one namespace, an expiry, revocable),
beside the mesh-wide token file. Looked up at most every few seconds per token: discovery polls
arrive all the time, and a revocation may take that long to bite."""

from __future__ import annotations

import asyncio
import time

from app.db import Database
from app.identity.common import digest
from app.identity.tokens import JOIN_TOKEN_PREFIX, JoinGrant, join_grant

__all__ = ["JoinGrants"]

RECHECK_S = 5.0
_MAX_CACHED = 10_000  # distinct presented tokens remembered; a flood of junk cannot grow it


class JoinGrants:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._cache: dict[str, tuple[float, JoinGrant | None]] = {}

    def _lookup(self, secret: str) -> JoinGrant | None:
        with self._database.session(write=False) as session:
            return join_grant(session, secret)

    async def grant(self, secret: str) -> JoinGrant | None:
        if not secret.startswith(JOIN_TOKEN_PREFIX) or len(secret) > 200:
            return None
        key = digest(secret)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < RECHECK_S:
            return cached[1]
        found = await asyncio.to_thread(self._lookup, secret)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now, found)
        return found
