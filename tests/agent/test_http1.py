"""HTTP/1.1 framing helpers and flow control, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.flow import BODY, PEER, FlowControl
from mesh_agent.proxy.http1 import (
    H_CONN,
    H_DROP,
    H_HOST,
    H_RID,
    H_TP,
    H_XFF,
    R_CHUNKED,
    R_CONNECTION,
    R_DROP,
    R_FORWARD,
    R_LENGTH,
    Request,
    connection_tokens,
    content_length_value,
    normalize_target,
    request_header_code,
    response_head,
    response_header_kind,
    split_target,
)
from mesh_agent.proxy.upstream import Pool, Upstream


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


def _upstream_head(
    headers: list[tuple[bytes, bytes]], content_length: int | None = None
) -> Upstream:
    """An upstream connection (no socket) that has parsed these response headers: the relay
    collects what it forwards while parsing (``Upstream.on_header``)."""
    loop = asyncio.new_event_loop()
    try:
        up = Upstream(Pool(Endpoint("127.0.0.1", 1), loop), loop)
    finally:
        loop.close()
    for name, value in headers:
        up.on_header(name, value)
    if content_length is not None:
        up.content_length = content_length
    return up


def _request(method: bytes = b"GET", http11: bool = True, keep_alive: bool = True) -> Request:
    req = Request(0.0)
    req.method, req.http11, req.keep_alive = method, http11, keep_alive
    return req


def test_response_head_drops_hop_by_hop_and_reframes() -> None:
    head = _upstream_head(
        [
            (b"Connection", b"x-a"),
            (b"Connection", b"x-b, close"),
            (b"X-A", b"1"),
            (b"x-b", b"2"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Content-Length", b"3"),
            (b"x-kept", b"yes"),
            (b"Content-Type", b"text/plain"),
        ]
    )
    parts, keep, chunked, no_body = response_head(_request(), 200, head, False)
    text = b"".join(parts)
    assert text.startswith(b"HTTP/1.1 200 OK\r\n") and text.endswith(b"\r\n\r\n")
    assert b"\r\nx-kept: yes\r\nContent-Type: text/plain\r\n" in text
    for gone in (b"X-A", b"x-b", b"Connection", b"Keep-Alive", b"Transfer-Encoding"):
        assert gone + b":" not in text
    # framing re-decided for the caller: the upstream's Content-Length (3) is what counts
    assert b"content-length: 3\r\n" in text and b"chunked" not in text
    assert (keep, chunked, no_body) == (True, False, False)


def test_response_head_reframes_an_unknown_length_as_chunked() -> None:
    head = _upstream_head([(b"Transfer-Encoding", b"chunked"), (b"X-Plain", b"1")])
    parts, keep, chunked, _ = response_head(_request(), 200, head, False)
    text = b"".join(parts)
    assert text == b"HTTP/1.1 200 OK\r\nX-Plain: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    assert (keep, chunked) == (True, True)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (b"Content-Type", R_FORWARD),
        (b"X-Connection", R_FORWARD),  # the length of a dropped name, but not one
        (b"Content-Length", R_LENGTH),
        (b"CONTENT-LENGTH", R_LENGTH),  # not a spelling compared as is: lower-cased
        (b"TRANSFER-ENCODING", R_CHUNKED),
        (b"connection", R_CONNECTION),
        (b"CONNECTION", R_CONNECTION),
        (b"Keep-Alive", R_DROP),
        (b"TE", R_DROP),
        (b"Proxy-Authenticate", R_DROP),
    ],
)
def test_response_header_kind(name: bytes, kind: int) -> None:
    assert response_header_kind(name) == kind


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (b"Host", H_HOST),
        (b"host", H_HOST),
        (b"HOST", H_HOST),  # an unusual spelling is lower-cased, not forwarded as is
        (b"hOsT", H_HOST),
        (b"X-Request-ID", H_RID),
        (b"x-REQUEST-id", H_RID),
        (b"X-Forwarded-For", H_XFF),
        (b"TRACEPARENT", H_TP),
        (b"Connection", H_CONN),
        (b"CONTENT-LENGTH", H_DROP),
        (b"Transfer-ENCODING", H_DROP),
        (b"te", H_DROP),
        (b"PROXY-AUTHORIZATION", H_DROP),
        (b"User-Agent", -1),  # the length of "connection", forwarded
        (b"Accept", -1),  # the length of "expect"
        (b"X-Host", -1),
        (b"", -1),
    ],
)
def test_request_header_code(name: bytes, code: int) -> None:
    assert request_header_code(name) == code


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0", 0),
        (b"12", 12),
        (b" 12 ", 12),
        (b"\t7", 7),
        (b"007", 7),
        (b"123456789012345678", 123456789012345678),
        (b"1234567890123456789012", 1234567890123456789012),  # past the digit loop
        (b"", None),
        (b"1a", None),
        (b"-1", None),
        (b"1 2", None),
        (b"+5", None),
        (b"\xd9\xa3", None),  # not ASCII digits
    ],
)
def test_content_length_value(value: bytes, expected: int | None) -> None:
    assert content_length_value(value) == expected


def test_response_head_for_http10_with_unknown_length_closes() -> None:
    parts, keep, chunked, _ = response_head(_request(http11=False), 200, _upstream_head([]), False)
    assert (keep, chunked) == (False, False)
    assert b"connection: close\r\n" in b"".join(parts)


def test_response_head_for_head_keeps_the_length_and_sends_no_body() -> None:
    head = _upstream_head([], content_length=12)
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
