"""The gateway's HTTP/1.1 client to agents, against scripted TLS servers on loopback: pinning
before any byte is sent, keep-alive reuse, body framings, and the failures it must tell apart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from yarl import URL

from agent.identity import AgentIdentity
from proxy.gateway.upstream import (
    CertificateMismatch,
    ConnectFailed,
    StaleConnection,
    UpstreamError,
    UpstreamPool,
)

IDENTITY = AgentIdentity.generate()
PIN = IDENTITY.cert_sha256

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer, self.connections)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=IDENTITY.ssl_context()
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def origin(self) -> URL:
        return URL(f"https://127.0.0.1:{self.port}")


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_keep_alive_reuse_and_framings() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            server.received.append(request)
            if b"/chunked" in request:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: text/event-stream\r\n\r\n"
                    b"6;ext=1\r\ndata: \r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
                )
            elif b"/close" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof")
                await writer.drain()
                return
            else:
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
            await writer.drain()

    async def main() -> None:
        pool = UpstreamPool(connect_timeout=5, keepalive=30)
        for _ in range(3):
            response = await pool.request(
                server.origin,
                PIN,
                method="POST",
                target="/x?y=1",
                body=b'{"a":1}',
                headers=[("Authorization", "Bearer t")],
            )
            assert (response.status, response.headers["X-A"]) == (201, "1")
            assert await response.read() == b"hello"
            response.release()
        assert server.connections == 1 and pool.opened == 1
        first = server.received[0]
        assert first.startswith(b"POST /x?y=1 HTTP/1.1\r\n")
        assert b"Content-Length: 7\r\n" in first and first.endswith(b'\r\n\r\n{"a":1}')
        chunked = await pool.request(server.origin, PIN, method="GET", target="/chunked")
        assert [c async for c in chunked.chunks()] == [b"data: ", b"abc"]
        chunked.release()
        closing = await pool.request(server.origin, PIN, method="GET", target="/close")
        assert await closing.read() == b"until-eof"
        closing.release()
        again = await pool.request(server.origin, PIN, method="GET", target="/x")
        assert await again.read() == b"hello"
        again.release()
        assert server.connections == 2  # the closed one was not reused
        await pool.close()

    async def outer() -> None:
        nonlocal server
        async with Server(script) as s:
            server = s
            await main()

    server: Server = None  # type: ignore[assignment]
    run(outer())


def test_a_wrong_certificate_is_refused_before_anything_is_sent() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        data = await reader.read(65536)
        received.append(data)

    received: list[bytes] = []

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            with pytest.raises(CertificateMismatch) as refused:
                await pool.request(
                    server.origin, bytes(32), method="POST", target="/v1/x", body=b"secret-body"
                )
            assert refused.value.presented == PIN
            await asyncio.sleep(0.1)
            assert received in ([], [b""])  # the connection closed with nothing written
            await pool.close()

    run(main())


def test_stale_and_failed_connections_are_told_apart() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 3:
            return  # a fresh connection that hangs up without answering
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the second request on this connection: hang up unanswered

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            first = await pool.request(server.origin, PIN, method="GET", target="/a")
            assert await first.read() == b"ok"
            first.release()
            with pytest.raises(StaleConnection):
                await pool.request(server.origin, PIN, method="GET", target="/b")
            retry = await pool.request(server.origin, PIN, method="GET", target="/b", fresh=True)
            assert await retry.read() == b"ok"
            retry.release()
            with pytest.raises(UpstreamError) as broken:
                await pool.request(server.origin, PIN, method="GET", target="/c", fresh=True)
            # Not "stale" (the request may have been processed) and not "connect failed".
            assert type(broken.value) is UpstreamError
            assert server.connections == 3
            await pool.close()
        with pytest.raises(ConnectFailed):
            await UpstreamPool(connect_timeout=2, keepalive=1).request(
                server.origin, PIN, method="GET", target="/"
            )

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
def test_malformed_answers_are_errors(answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            with pytest.raises(UpstreamError):
                response = await pool.request(server.origin, PIN, method="GET", target="/")
                await response.read()
            await pool.close()

    run(main())


def test_abandoning_a_body_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if not await reader.read(1):  # the client closed: stop "generating"
            closed.set()

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            response = await pool.request(server.origin, PIN, method="GET", target="/")
            stream = response.chunks()
            assert await stream.__anext__() == b"first"
            response.close()
            await asyncio.wait_for(closed.wait(), 5)
            await pool.close()

    run(main())
