"""Back-pressure on one connection, both ways, for the caller's side and the upstream's alike."""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["BODY", "PEER", "PIPELINE", "FlowControl"]

# Why reading from a connection is held: each reason is released on its own, and reading only
# resumes once none is left.
BODY: Final = 1  # the request body buffer is full until the upstream takes some
PIPELINE: Final = 2  # requests are queued behind the one being served
PEER: Final = 4  # the other end of a relay cannot take more bytes


class FlowControl:
    """Reading stops while any hold is on and resumes when the last is released; writing
    follows the transport's ``pause_writing``/``resume_writing`` and :meth:`drain` waits until
    writes may go on (or the connection is gone)."""

    __slots__ = ("_holds", "_waiter", "closed", "loop", "transport", "write_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        self._holds = 0
        self._waiter: asyncio.Future[None] | None = None

    def hold(self, reason: int) -> None:
        """Stop reading for ``reason``."""
        self._holds |= reason
        t = self.transport
        if t is not None and not self.closed:
            t.pause_reading()

    def release(self, reason: int) -> None:
        """``reason`` no longer holds reading; read again if nothing else does."""
        if not self._holds & reason:
            return
        self._holds &= ~reason
        t = self.transport
        if t is not None and not self.closed and not self._holds:
            t.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def lost(self) -> None:
        """The connection is gone: nothing waits for it any more."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            fut = self.loop.create_future()
            self._waiter = fut
            await fut
