"""The gateway's HTTP/1.1 client to agents, against scripted TLS servers on loopback: pinning
before any byte is sent, keep-alive reuse, body framings, and the failures it must tell apart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
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
_LIMIT = 16 << 20

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
            assert await response.read(_LIMIT) == b"hello"
            response.release()
        assert server.connections == 1 and pool.opened == 1
        first = server.received[0]
        assert first.startswith(b"POST /x?y=1 HTTP/1.1\r\n")
        assert b"Content-Length: 7\r\n" in first and first.endswith(b'\r\n\r\n{"a":1}')
        chunked = await pool.request(server.origin, PIN, method="GET", target="/chunked")
        assert [c async for c in chunked.chunks()] == [b"data: ", b"abc"]
        chunked.release()
        closing = await pool.request(server.origin, PIN, method="GET", target="/close")
        assert await closing.read(_LIMIT) == b"until-eof"
        closing.release()
        again = await pool.request(server.origin, PIN, method="GET", target="/x")
        assert await again.read(_LIMIT) == b"hello"
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
            assert await first.read(_LIMIT) == b"ok"
            first.release()
            with pytest.raises(StaleConnection):
                await pool.request(server.origin, PIN, method="GET", target="/b")
            retry = await pool.request(server.origin, PIN, method="GET", target="/b", fresh=True)
            assert await retry.read(_LIMIT) == b"ok"
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
        # An interim answer nothing asked for (its final answer would reach the next request).
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
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
                await response.read(_LIMIT)
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


# -- the socket-level client: large bodies, idle hang-ups, stalls, descriptors, cancellation -----

LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on the standard loop or on uvloop (the proxy's loop in production)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(coro)
    return asyncio.run(coro)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


@pytest.mark.parametrize("loop", LOOPS)
def test_large_bodies_cross_intact_both_ways(loop: str) -> None:
    request_body = os.urandom(8 * 1024 * 1024)
    answer = os.urandom(3 * 1024 * 1024 + 17)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            body = request.partition(b"\r\n\r\n")[2]
            digest = hashlib.sha256(body).hexdigest().encode()
            if b"/big" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
            elif b"/chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for start in range(0, len(answer), 1_000_000):
                    piece = answer[start : start + 1_000_000]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + digest)
            await writer.drain()

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            response = await pool.request(
                server.origin, PIN, method="POST", target="/upload", body=request_body
            )
            assert await response.read(_LIMIT) == hashlib.sha256(request_body).hexdigest().encode()
            response.release()
            # A slow reader: the client stops reading while its buffer is full, then resumes.
            response = await pool.request(server.origin, PIN, method="GET", target="/big")
            parts = []
            async for part in response.chunks():
                parts.append(part)
                await asyncio.sleep(0.001)
            assert b"".join(parts) == answer
            response.release()
            response = await pool.request(server.origin, PIN, method="GET", target="/chunked")
            assert await response.read(_LIMIT) == answer
            response.release()
            assert server.connections == 1 and pool.opened == 1
            await pool.close()

    run_on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_connection_the_agent_closed_is_not_reused(loop: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 2:
            # Speak unasked on the idle connection: it must not be reused either.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
            await writer.drain()
            await reader.read(1)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:
            await asyncio.sleep(0.1)
            return  # hang up while the client holds the connection idle
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def get(pool: UpstreamPool, server: Server) -> None:
        response = await pool.request(server.origin, PIN, method="GET", target="/")
        assert await response.read(_LIMIT) == b"ok"
        response.release()

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            await get(pool, server)
            await asyncio.sleep(0.5)  # the agent hangs up meanwhile
            await get(pool, server)  # no StaleConnection: the client saw the hang-up
            assert (server.connections, pool.opened) == (2, 2)
            await asyncio.sleep(0.5)  # the agent sends bytes nobody asked for
            await get(pool, server)
            assert (server.connections, pool.opened) == (3, 3)
            await get(pool, server)  # an ordinary idle connection is reused
            assert (server.connections, pool.opened) == (3, 3)
            await pool.close()

    run_on(loop, main())


@needs_proc
@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_handshake_fails_within_the_connect_timeout(loop: str) -> None:
    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # accept TCP, never answer the ClientHello

        tcp = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        before = open_fds()
        pool = UpstreamPool(connect_timeout=0.5, keepalive=30)
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as failed:
            await pool.request(URL(f"https://127.0.0.1:{port}"), PIN, method="GET", target="/")
        assert 0.4 < time.monotonic() - started < 2.0
        assert "TimeoutError" in str(failed.value)
        assert len(accepted) == 1
        accepted[0].close()  # the server's end of the connection
        await asyncio.sleep(0.05)
        assert open_fds() == before
        tcp.close()
        await pool.close()

    run_on(loop, main())


@needs_proc
@pytest.mark.parametrize("loop", LOOPS)
def test_no_descriptor_leaks_across_many_connections(loop: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            if b"/stream" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
                await writer.drain()
                await reader.read(1)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def main() -> None:
        async with Server(script) as server:
            before = open_fds()
            for round_ in range(40):
                pool = UpstreamPool(connect_timeout=5, keepalive=30)
                response = await pool.request(
                    server.origin, PIN, method="POST", target="/", body=b"x", fresh=True
                )
                assert await response.read(_LIMIT) == b"ok"
                response.release()  # back to the pool: closed by pool.close()
                streaming = await pool.request(server.origin, PIN, method="GET", target="/stream")
                assert await streaming.chunks().__anext__() == b"hi"
                streaming.close()
                with pytest.raises(CertificateMismatch):
                    await pool.request(server.origin, bytes(32), method="GET", target="/")
                if round_ % 10 == 0:
                    response = await pool.request(server.origin, PIN, method="GET", target="/")
                    await response.read(_LIMIT)
                    response.release()
                    pool.forget(server.origin)
                await pool.close()
            await asyncio.sleep(0.2)
            assert open_fds() <= before
        with pytest.raises(ConnectFailed):
            await UpstreamPool(connect_timeout=2, keepalive=1).request(
                server.origin, PIN, method="GET", target="/"
            )

    run_on(loop, main())


@needs_proc
@pytest.mark.parametrize("loop", LOOPS)
def test_cancelling_while_waiting_for_the_head_closes_the_connection(loop: str) -> None:
    async def main() -> None:
        hung_up = asyncio.Event()
        got_request = asyncio.Event()

        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
        ) -> None:
            await read_request(reader)
            got_request.set()
            if not await reader.read(1):  # never answer; notice the client going
                hung_up.set()

        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            before = open_fds()
            task = asyncio.ensure_future(
                pool.request(server.origin, PIN, method="POST", target="/", body=b"{}")
            )
            await asyncio.wait_for(got_request.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(hung_up.wait(), 5)
            assert open_fds() <= before + 1  # the server's side may linger a moment
            await pool.close()

    run_on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_an_early_answer_while_a_large_body_is_still_being_sent(loop: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")  # refuse without reading the 16 MiB body
        writer.write(b"HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            response = await pool.request(
                server.origin, PIN, method="POST", target="/", body=bytes(16 * 1024 * 1024)
            )
            assert response.status == 413
            assert await response.read(_LIMIT) == b"big"
            response.release()
            assert not pool._idle  # not kept: the agent asked to close
            await pool.close()

    run_on(loop, main())


def test_an_answer_past_the_limit_is_refused_and_a_huge_chunk_streams_in_slices() -> None:
    # An agent a tenant controls may answer anything: the proxy never holds more than the
    # limit of a whole answer, nor a declared chunk of any size in one piece.
    big = 3 * 256 * 1024 + 5

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            if b"/length" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
                writer.write(b"x" * big)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n" % big + b"y" * big + b"\r\n0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        pool = UpstreamPool(connect_timeout=5, keepalive=30)
        for path in ("/length", "/chunks"):
            response = await pool.request(server.origin, PIN, method="GET", target=path)
            with pytest.raises(UpstreamError, match="larger than 1024 bytes"):
                await response.read(1024)
        response = await pool.request(server.origin, PIN, method="GET", target="/chunks")
        pieces = [piece async for piece in response.chunks()]
        assert b"".join(pieces) == b"y" * big
        assert max(len(p) for p in pieces) <= 256 * 1024 and len(pieces) >= 4
        response = await pool.request(server.origin, PIN, method="GET", target="/chunks")
        assert await response.read(big) == b"y" * big  # exactly the limit is fine
        await pool.close()

    async def with_server() -> None:
        nonlocal server
        async with Server(script) as server:
            await main()

    server: Server
    run(with_server())


def test_a_post_the_agent_may_have_read_is_never_sent_twice() -> None:
    """An agent that reads a POST on a kept-alive connection and hangs up unanswered may have
    acted on it: that is an error for the caller, not a stale connection to retry (the
    retry sent it twice). A GET in the same place stays retryable."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the second request: read, then hang up unanswered

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            for method, expected in (("POST", UpstreamError), ("GET", StaleConnection)):
                first = await pool.request(server.origin, PIN, method=method, target="/a")
                assert await first.read(_LIMIT) == b"ok"
                first.release()
                with pytest.raises(UpstreamError) as failed:
                    await pool.request(server.origin, PIN, method=method, target="/b", body=b"{}")
                assert type(failed.value) is expected, method
            await pool.close()

    run(main())


@pytest.mark.parametrize("ending", ["close_notify", "ragged"])
def test_an_answer_framed_by_the_close_ends_only_with_tls_close_notify(ending: str) -> None:
    """A body that runs to the connection's end is whole only if TLS says so: a bare TCP close
    (no close_notify) may be an attacker cutting it, so it is an error, not a clean end."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        await writer.drain()
        if ending == "ragged":
            writer.transport.abort()  # TCP FIN/RST without TLS close_notify
        else:
            writer.close()
            await writer.wait_closed()

    async def main() -> None:
        async with Server(script) as server:
            pool = UpstreamPool(connect_timeout=5, keepalive=30)
            response = await pool.request(server.origin, PIN, method="GET", target="/")
            if ending == "ragged":
                with pytest.raises(UpstreamError):
                    await response.read(_LIMIT)
            else:
                assert await response.read(_LIMIT) == b"partial"
            await pool.close()

    run(main())
