"""The control-plane client keeps one connection for its polls, and opens a new one only when
the server says it closes."""

from __future__ import annotations

import asyncio

from mesh_agent.discovery import _Connection

from .support import run


class _Server:
    """A tiny HTTP/1.1 server on loopback: counts connections, answers each request in turn."""

    def __init__(self, responses: list[bytes]) -> None:
        self.responses = responses
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                response = self.responses[self.requests]
                self.requests += 1
                writer.write(response)
                await writer.drain()
                if b"connection: close" in response.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
CLOSING = (
    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n"
    b"content-type: application/json\r\n\r\n{}"
)


def test_successive_requests_reuse_one_connection() -> None:
    async def scenario() -> None:
        server = _Server([OK, NO_CONTENT, OK])
        async with server as port:
            conn = _Connection(f"http://127.0.0.1:{port}", "token")
            for _ in range(3):
                status, _body = await conn.request("POST", "/api/v1/x", b"{}", 10)
                assert status in (200, 204)
            conn.close()
        assert server.requests == 3
        assert server.connections == 1

    run(scenario())


def test_a_response_saying_close_gets_a_new_connection_next_time() -> None:
    async def scenario() -> None:
        server = _Server([CLOSING, OK])
        async with server as port:
            conn = _Connection(f"http://127.0.0.1:{port}", "token")
            assert (await conn.request("POST", "/api/v1/x", b"{}", 10))[0] == 200
            assert conn.writer is None  # not reused: the server said it closes
            assert (await conn.request("POST", "/api/v1/x", b"{}", 10))[0] == 200
            conn.close()
        assert server.requests == 2
        assert server.connections == 2

    run(scenario())
