"""Random identifiers for requests and traces, cut from a pool of random hex digits.

Every proxied request needs a request id and a trace id, often a span id too. Formatting a fresh
128-bit integer as hex for each of them (``b"%032x" % getrandbits(128)``) was a sizeable share
of the agent's CPU per request; one ``os.urandom(...)`` turned into hex serves about fifty
requests, and each id is then one slice. The kernel's generator is also the cheaper one here:
``random.randbytes`` builds a 16,384-bit integer and converts it back to bytes, which cost
several times the instructions of the ``getrandom`` call (``bench/proxy_instructions.py``).
"""

from __future__ import annotations

import binascii
import os
from typing import Final

__all__ = [
    "ZERO_SPAN_ID",
    "ZERO_TRACE_ID",
    "new_request_id",
    "new_span_id",
    "new_trace_id",
    "new_unsampled_traceparent",
]

_POOL_BYTES: Final = 2048  # 4,096 hex digits: a request id and a traceparent for ~50 requests
# Invalid on the wire (W3C Trace Context): never handed out, refused when parsed (telemetry).
ZERO_TRACE_ID: Final = b"0" * 32
ZERO_SPAN_ID: Final = b"0" * 16


class HexPool:
    """Random lowercase hex digits, handed out in slices and refilled when used up."""

    __slots__ = ("at", "digits")

    def __init__(self) -> None:
        self.digits = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        at = self.at
        end = at + n
        if end > len(self.digits):
            self.digits = binascii.hexlify(os.urandom(_POOL_BYTES))
            at = 0
            end = n
        self.at = end
        return self.digits[at:end]

    def reset(self) -> None:
        """Forget the digits: a forked child must not hand out its parent's ids again."""
        self.digits = b""
        self.at = 0


_POOL: Final = HexPool()
os.register_at_fork(after_in_child=_POOL.reset)


def new_trace_id() -> bytes:
    """32 hex digits, never all zero (an all-zero trace id is invalid on the wire)."""
    trace_id = _POOL.take(32)
    while trace_id == ZERO_TRACE_ID:
        trace_id = _POOL.take(32)
    return trace_id


def new_span_id() -> bytes:
    """16 hex digits, never all zero."""
    span_id = _POOL.take(16)
    while span_id == ZERO_SPAN_ID:
        span_id = _POOL.take(16)
    return span_id


def new_unsampled_traceparent() -> bytes:
    """A ``traceparent`` for a new trace that is not sampled (flags 00): what a hop sends on
    when the request came without a valid one and no span of ours is recorded. One slice of
    the pool and one format, as it is built for most requests that start a trace."""
    digits = _POOL.take(48)
    trace_id = digits[:32]
    span_id = digits[32:]
    if trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID:
        return b"00-%b-%b-00" % (new_trace_id(), new_span_id())
    return b"00-%b-%b-00" % (trace_id, span_id)


def new_request_id() -> bytes:
    """A random id in the layout of a version 4 UUID (as Envoy's ``x-request-id``)."""
    h = _POOL.take(31)
    return b"%b-%b-4%b-%b-%b" % (h[:8], h[8:12], h[12:15], h[15:19], h[19:])
