"""HTTP/1.1 as the proxy speaks it, without sockets: which headers are hop-by-hop, how a request
target is split and normalised, what head a relayed response gets. Everything here is a pure
function or plain data, testable on bytes alone."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from mesh_agent.proxy.downstream import Body
    from mesh_agent.proxy.upstream import Upstream

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEADER_BYTES",
    "PLAIN_CONNECTION",
    "REQUEST_SPECIAL",
    "RESPONSE_DROP",
    "R_CHUNKED",
    "R_CONNECTION",
    "R_DROP",
    "R_FORWARD",
    "R_LENGTH",
    "Request",
    "connection_tokens",
    "content_length_value",
    "normalize_path",
    "normalize_target",
    "request_header_code",
    "response_head",
    "response_header_kind",
    "split_target",
    "status_line",
]

MAX_HEADER_BYTES: Final = 64 * 1024

# RFC 9110 section 7.6.1 (plus the de-facto Proxy-Connection and Keep-Alive): never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the agent rewrites itself; codes tell on_header where to put them.
H_HOST: Final = 0
H_XFF: Final = 1
H_RID: Final = 2
H_TP: Final = 3
H_SRC: Final = 4
H_EXPECT: Final = 5
H_CONN: Final = 6
H_DROP: Final = 7
REQUEST_SPECIAL: Final[dict[bytes, int]] = {
    b"host": H_HOST,
    b"x-forwarded-for": H_XFF,
    b"x-request-id": H_RID,
    b"traceparent": H_TP,
    b"x-mesh-source": H_SRC,
    b"expect": H_EXPECT,
    b"connection": H_CONN,
    b"content-length": H_DROP,  # framing is re-decided for the upstream side
}
for _name in HOP_BY_HOP - {b"connection"}:
    REQUEST_SPECIAL[_name] = H_DROP
# The same names as clients usually spell them (lower case, or "X-Request-Id"), so that the
# common header is looked up as it comes, not lower-cased first; any other spelling of a
# special name has one of these lengths and is lower-cased (``request_header_code``).
REQUEST_SPECIAL_AS_SENT: Final[dict[bytes, int]] = {
    **REQUEST_SPECIAL,
    **{b"-".join(p.capitalize() for p in n.split(b"-")): c for n, c in REQUEST_SPECIAL.items()},
    b"X-Request-ID": H_RID,
    b"TE": H_DROP,
}
_SPECIAL_LENGTH_BITS: Final = sum(1 << n for n in frozenset(len(n) for n in REQUEST_SPECIAL))
RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})
# What a response header is to the relay (``response_header_kind``).
R_FORWARD: Final = 0
R_LENGTH: Final = 1
R_CHUNKED: Final = 2
R_CONNECTION: Final = 3
R_DROP: Final = 4
# Bit n is set when some dropped response header name is n bytes long: one shift and one "and"
# tell most headers apart from every dropped one (a set lookup boxes the length and hashes it).
_DROP_LENGTH_BITS: Final = sum(1 << n for n in frozenset(len(n) for n in RESPONSE_DROP))

_STATUS_LINE: Final[dict[int, bytes]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINE.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)  # RFC 3986 section 2.3: decoding these never changes what a path means
_HEXDIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_SLASHES: Final = (0x2F, 0x5C)  # "/" and "\\"
_MULTI_SLASH: Final = re.compile(rb"//+")


def normalize_path(path: bytes, escaped_slashes: str = "reject") -> bytes | None:
    """An origin-form path (no query) normalised as Envoy does before route matching, so that
    ``/public/../admin``, ``/public/%2e%2e/admin`` and ``//admin`` cannot slip past a prefix
    route: percent-encoded unreserved characters decoded (other escapes kept, upper-cased),
    repeated slashes merged, ``.`` and ``..`` segments removed (RFC 3986 section 5.2.4).
    Encoded slashes (``%2F``, ``%5C``) follow ``escaped_slashes``: "reject", "keep" or
    "unescape". None: the path is to be refused (a bad escape, or a rejected encoded slash)."""
    if path.find(b"%") >= 0:
        out = bytearray()
        i = 0
        n = len(path)
        while i < n:
            c = path[i]
            if c != 0x25:
                out.append(c)
                i += 1
                continue
            hi = path[i + 1 : i + 3]
            if len(hi) != 2 or hi[0] not in _HEXDIGITS or hi[1] not in _HEXDIGITS:
                return None
            value = int(hi, 16)
            if value in _UNRESERVED:
                out.append(value)
            elif value in _SLASHES and escaped_slashes != "keep":
                if escaped_slashes == "reject":
                    return None
                out.append(value)
            else:
                out += b"%" + hi.upper()
            i += 3
        path = bytes(out)
    if path.find(b"//") >= 0:
        path = _MULTI_SLASH.sub(b"/", path)
    if path.find(b"/.") >= 0:
        segments = path.split(b"/")
        kept: list[bytes] = []
        for seg in segments[1:]:
            if seg == b"..":
                if kept:
                    kept.pop()
            elif seg != b".":
                kept.append(seg)
        if segments[-1] in (b".", b".."):
            kept.append(b"")  # "/a/b/.." is "/a/": the result names a directory
        path = b"/" + b"/".join(kept)
    return path


def normalize_target(url: bytes, escaped_slashes: str) -> bytes | None:
    """The request target with its path normalised (origin or absolute form) and any
    ``#fragment`` dropped (a client must not send one; RFC 9112 section 3.2). None: refuse."""
    hash_at = url.find(b"#")
    if hash_at >= 0:
        url = url[:hash_at]
    if url[:1] == b"/":
        start = 0
    elif url[:7].lower() == b"http://":
        start = url.find(b"/", 7)
        if start < 0:
            return url
    else:
        return url  # "*", authority form: nothing to normalise
    q = url.find(b"?", start)
    path = url[start:] if q < 0 else url[start:q]
    if path.find(b"%") < 0 and path.find(b"//") < 0 and path.find(b"/.") < 0:
        return url  # the common case costs three scans and no copy
    normal = normalize_path(path, escaped_slashes)
    if normal is None:
        return None
    return url[:start] + normal + (b"" if q < 0 else url[q:])


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def split_target(url: bytes, host: bytes | None) -> tuple[bytes | None, bytes]:
    """(authority, origin-form path) from a request target in origin or absolute form."""
    if url[:1] == b"/":
        return host, url
    if url[:7].lower() == b"http://":
        rest = url[7:]
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority = rest[:end]
        at = authority.rfind(b"@")
        if at >= 0:
            authority = authority[at + 1 :]
        path = rest[end:]
        if not path:
            path = b"/"
        elif path[:1] == b"?":
            path = b"/" + path
        return authority or None, path
    if url == b"*":
        return host, url
    return None, b""


class Request:
    __slots__ = (
        "asked_keep_alive",
        "body",
        "chunked",
        "content_length",
        "expect_continue",
        "extra_hop",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "method",
        "plan",
        "request_id",
        "source",
        "started",
        "traceparent",
        "url",
        "xff",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.request_id: bytes | None = None
        self.traceparent: bytes | None = None
        self.source: bytes | None = None
        self.expect_continue = False
        self.extra_hop: set[bytes] | None = None
        self.asked_keep_alive = False  # a Connection header listed keep-alive
        self.keep_alive = True
        self.http11 = True
        self.content_length: int | None = None
        self.chunked = False
        self.body: Body | None = None
        # Routing already decided by a fast path that then could not take the request (no idle
        # connection): the general path reuses it rather than drawing a second endpoint.
        self.plan: Any = None

    def lookup(self) -> dict[bytes, bytes]:
        """Lower-cased header map for header-based routing (built only when a route needs it)."""
        d = {n.lower(): v for n, v in self.headers}
        if self.host is not None:
            d[b"host"] = self.host
        return d


def response_header_kind(name: bytes) -> int:
    """How the relay treats a response header: R_FORWARD (as received), R_LENGTH and
    R_CHUNKED (framing, re-decided for the caller), R_CONNECTION (hop-by-hop, and may name
    more hop-by-hop headers) or R_DROP (hop-by-hop). Most headers are told apart by their
    length alone; the usual spellings of the two that every response has are compared as they
    are, and only the rest is lower-cased."""
    if not (_DROP_LENGTH_BITS >> len(name)) & 1:
        return R_FORWARD
    if name == b"Content-Length" or name == b"content-length":
        return R_LENGTH
    if name == b"Connection" or name == b"connection":
        return R_CONNECTION
    lname = name.lower()
    if lname not in RESPONSE_DROP:
        return R_FORWARD
    if lname == b"content-length":
        return R_LENGTH
    if lname == b"transfer-encoding":
        return R_CHUNKED
    if lname == b"connection":
        return R_CONNECTION
    return R_DROP


def request_header_code(name: bytes) -> int:
    """Which of the request headers the agent rewrites ``name`` is (its H_ code), or -1 for
    one it forwards as it is."""
    if not (_SPECIAL_LENGTH_BITS >> len(name)) & 1:
        return -1
    code = REQUEST_SPECIAL_AS_SENT.get(name)
    if code is None:
        code = REQUEST_SPECIAL.get(name.lower(), -1)
    return code


def content_length_value(value: bytes) -> int | None:
    """A Content-Length value as a number (blanks around it allowed), None if it is not one.
    Plain digits are read in a loop: ``int(bytes)`` goes through a str and the number parser."""
    if 0 < len(value) <= 18:
        total = 0
        for c in value:
            if c < 48 or c > 57:
                break
            total = total * 10 + (c - 48)
        else:
            return total
    stripped = value.strip()
    return int(stripped) if stripped.isdigit() else None


def response_head(
    req: Request, status: int, response: Upstream, caller_closed: bool
) -> tuple[list[bytes], bool, bool, bool]:
    """The head to send the caller for an upstream response: (parts, keep-alive, chunked,
    no body). Hop-by-hop headers go, framing is re-decided for the caller's side. It reads
    what the upstream connection collected while its head was parsed (``Upstream.on_header``):
    the header lines to forward, the tokens its Connection headers listed beyond keep-alive and
    close (those headers go too), and its framing. Typed as the class, not a protocol, so that
    compiled code reads the fields directly."""
    parts = [_STATUS_LINE.get(status) or status_line(status)]
    extra = response.extra_hop
    if extra:
        for line in response.forwarded:
            if line[: line.find(b":")].lower() not in extra:
                parts.append(line)
    else:
        parts += response.forwarded
    no_body = req.method == b"HEAD" or status in (204, 304)
    keep = req.keep_alive and not caller_closed
    chunked = False
    if no_body:
        if response.content_length is not None and status != 204:
            parts.append(b"content-length: %d\r\n" % response.content_length)
    elif response.content_length is not None:
        parts.append(b"content-length: %d\r\n" % response.content_length)
    elif response.complete:
        parts.append(b"content-length: %d\r\n" % sum(len(p) for p in response.body_parts))
    elif req.http11:
        chunked = True
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        keep = False  # HTTP/1.0 caller, unknown length: the end of the body is the close
    if not keep:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return parts, keep, chunked, no_body
