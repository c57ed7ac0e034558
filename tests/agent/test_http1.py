"""HTTP/1.1 framing helpers and flow control, without sockets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from mesh_agent.proxy.flow import BODY, PEER, FlowControl
from mesh_agent.proxy.http1 import (
    Request,
    connection_tokens,
    normalize_target,
    response_head,
    split_target,
)


@pytest.mark.parametrize(
    ("url", "host", "expected"),
    [
        (b"/a?b", b"h", (b"h", b"/a?b")),
        (b"http://reviews/a/b?q=1", None, (b"reviews", b"/a/b?q=1")),
        (b"http://reviews", None, (b"reviews", b"/")),
        (b"http://reviews?x", None, (b"reviews", b"/?x")),
        (b"http://user:pw@reviews:8080/p", None, (b"reviews:8080", b"/p")),
        (b"*", b"h", (b"h", b"*")),
        (b"https://reviews/", b"h", (None, b"")),
    ],
)
def test_split_target(url: bytes, host: bytes | None, expected: tuple[bytes | None, bytes]) -> None:
    assert split_target(url, host) == expected


def test_normalize_target_keeps_query_and_authority_and_drops_fragment() -> None:
    assert normalize_target(b"/a/../b?x=/../y#frag", "reject") == b"/b?x=/../y"
    assert normalize_target(b"http://svc//a/./b", "reject") == b"http://svc/a/b"
    assert normalize_target(b"/plain/path?q", "reject") == b"/plain/path?q"
    assert normalize_target(b"/a%2Fb", "reject") is None
    assert normalize_target(b"*", "reject") == b"*"


def test_connection_tokens() -> None:
    assert connection_tokens(b" Keep-Alive , X-Foo,,x-bar ") == {b"keep-alive", b"x-foo", b"x-bar"}


@dataclass
class Head:
    headers: list[tuple[bytes, bytes]]
    content_length: int | None = None
    complete: bool = False
    body_parts: list[bytes] = field(default_factory=list)


def _request(method: bytes = b"GET", http11: bool = True, keep_alive: bool = True) -> Request:
    req = Request(0.0)
    req.method, req.http11, req.keep_alive = method, http11, keep_alive
    return req


def test_response_head_drops_hop_by_hop_and_reframes() -> None:
    head = Head(
        headers=[
            (b"Connection", b"x-a"),
            (b"Connection", b"x-b, close"),
            (b"X-A", b"1"),
            (b"x-b", b"2"),
            (b"Transfer-Encoding", b"chunked"),
            (b"x-kept", b"yes"),
        ]
    )
    parts, keep, chunked, no_body = response_head(_request(), 200, head, False)
    text = b"".join(parts)
    assert text.startswith(b"HTTP/1.1 200 OK\r\n") and text.endswith(b"\r\n\r\n")
    assert b"x-kept: yes" in text and b"transfer-encoding: chunked" in text
    for gone in (b"X-A", b"x-b", b"Connection"):
        assert gone + b":" not in text
    assert (keep, chunked, no_body) == (True, True, False)


def test_response_head_for_http10_with_unknown_length_closes() -> None:
    parts, keep, chunked, _ = response_head(_request(http11=False), 200, Head([]), False)
    assert (keep, chunked) == (False, False)
    assert b"connection: close\r\n" in b"".join(parts)


def test_response_head_for_head_keeps_the_length_and_sends_no_body() -> None:
    head = Head([], content_length=12)
    parts, keep, chunked, no_body = response_head(_request(b"HEAD"), 200, head, False)
    assert b"content-length: 12\r\n" in b"".join(parts)
    assert (keep, chunked, no_body) == (True, False, True)


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def test_flow_control_reads_again_only_when_every_hold_is_released() -> None:
    async def scenario() -> None:
        flow = FlowControl(asyncio.get_running_loop())
        transport = _Transport()
        flow.transport = transport  # type: ignore[assignment]
        flow.hold(BODY)
        flow.hold(PEER)
        flow.release(BODY)
        assert not transport.reading
        flow.release(PEER)
        assert transport.reading
        flow.pause_writing()
        waiting = asyncio.ensure_future(flow.drain())
        await asyncio.sleep(0)
        assert not waiting.done()
        flow.resume_writing()
        await waiting
        flow.pause_writing()
        waiting = asyncio.ensure_future(flow.drain())
        await asyncio.sleep(0)
        flow.lost()  # a closed connection does not keep anyone waiting
        await waiting

    asyncio.run(scenario())
