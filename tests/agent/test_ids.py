"""Request, trace and span ids: their wire format, uniqueness across pool refills, and no two
processes handing out the same ids after a fork."""

from __future__ import annotations

import os
import re

from mesh_agent import ids
from mesh_agent.telemetry import parse_traceparent

UUID4_LAYOUT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_ids_have_their_wire_format_and_do_not_repeat_across_refills() -> None:
    # Several pools' worth (a pool serves about 50 requests), so refills are crossed.
    request_ids = [ids.new_request_id() for _ in range(1000)]
    trace_ids = [ids.new_trace_id() for _ in range(1000)]
    span_ids = [ids.new_span_id() for _ in range(1000)]
    assert all(UUID4_LAYOUT.fullmatch(r) for r in request_ids)
    assert all(re.fullmatch(rb"[0-9a-f]{32}", t) for t in trace_ids)
    assert all(re.fullmatch(rb"[0-9a-f]{16}", s) for s in span_ids)
    assert len(set(request_ids)) == len(set(trace_ids)) == len(set(span_ids)) == 1000


def test_a_new_unsampled_traceparent_is_valid_new_and_not_sampled() -> None:
    seen = set()
    for _ in range(200):  # across pool refills
        header = ids.new_unsampled_traceparent()
        context = parse_traceparent(header)
        assert context is not None and not context.sampled, header
        assert header[:3] == b"00-" and header[-3:] == b"-00"
        seen.add(context.trace_id)
    assert len(seen) == 200


def test_an_unsampled_traceparent_never_carries_an_all_zero_id() -> None:
    try:
        for zeros in (b"0" * 32 + b"cd" * 8, b"ef" * 16 + b"0" * 16):
            ids._POOL.digits = zeros + b"12" * 64
            ids._POOL.at = 0
            context = parse_traceparent(ids.new_unsampled_traceparent())
            assert context is not None  # a zero id would be refused as invalid
            assert context.trace_id != b"0" * 32 and context.parent_id != b"0" * 16
    finally:
        ids._POOL.reset()


def test_all_zero_ids_are_never_handed_out() -> None:
    # Invalid on the wire (W3C Trace Context): a run of zero digits in the pool is skipped.
    try:
        ids._POOL.digits = b"0" * 32 + b"12" * 16
        ids._POOL.at = 0
        assert ids.new_trace_id() == b"12" * 16
        ids._POOL.digits = b"0" * 16 + b"ab" * 8
        ids._POOL.at = 0
        assert ids.new_span_id() == b"ab" * 8
    finally:
        ids._POOL.reset()


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    ids._POOL.reset()
    ids.new_trace_id()  # a fresh pool, filled: the child inherits it, with ids to spare
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        try:
            os.write(write_end, ids.new_trace_id())
        finally:
            os._exit(0)
    os.close(write_end)
    parent_next = ids.new_trace_id()
    with os.fdopen(read_end, "rb") as pipe:
        child_next = pipe.read()
    os.waitpid(pid, 0)
    assert len(child_next) == 32
    assert child_next != parent_next
