"""Which idle connection the gateway's client to agents may reuse: only one opened under the
same certificate pin (a request under another pin connects afresh and is refused before any
byte is written), and only within the keep-alive."""

from __future__ import annotations

import asyncio

import pytest

from proxy.gateway.upstream import CertificateMismatch, UpstreamPool
from tests.proxy.test_upstream import PIN, Server, read_request, run

_LIMIT = 1 << 20
OTHER_PIN = bytes(range(32))  # the pin of some other certificate


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while True:
        request = await read_request(reader)
        _received.append(request)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


_received: list[bytes] = []


@pytest.fixture(autouse=True)
def _clear_received() -> None:
    _received.clear()


async def _get(pool: UpstreamPool, server: Server, pin: bytes, target: str = "/a") -> None:
    response = await pool.request(server.origin, pin, method="GET", target=target)
    assert response.status == 200
    assert await response.read(_LIMIT) == b"ok"
    response.release()


def test_an_idle_connection_is_not_reused_under_another_pin() -> None:
    async def main() -> None:
        pool = UpstreamPool(connect_timeout=5, keepalive=30)
        async with Server(_answer_ok) as server:
            await _get(pool, server, PIN)  # one idle connection, opened under PIN
            assert pool.opened == 1 and len(_received) == 1
            with pytest.raises(CertificateMismatch) as refused:
                await pool.request(
                    server.origin,
                    OTHER_PIN,
                    method="POST",
                    target="/v1/chat/completions",
                    headers=[("Authorization", "Bearer secret-token")],
                    body=b'{"prompt":"secret"}',
                )
            # A new connection was tried and refused; nothing was written on any connection.
            assert refused.value.presented == PIN
            assert len(_received) == 1
            assert pool.opened == 1
            # The connection opened under PIN is still there for PIN.
            await _get(pool, server, PIN, "/b")
            assert pool.opened == 1
            assert len(_received) == 2
            await pool.close()

    run(main())


def test_an_idle_connection_past_the_keepalive_is_not_reused() -> None:
    async def main() -> None:
        pool = UpstreamPool(connect_timeout=5, keepalive=0.3)
        async with Server(_answer_ok) as server:
            await _get(pool, server, PIN)
            await _get(pool, server, PIN)  # within the keep-alive: reused
            assert pool.opened == 1 and server.connections == 1
            await asyncio.sleep(0.5)
            await _get(pool, server, PIN)  # idle too long: a new connection
            assert pool.opened == 2 and server.connections == 2
            assert len(_received) == 3
            await pool.close()

    run(main())
