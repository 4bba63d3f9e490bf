"""A PostgreSQL that stops answering, as replicas meet it: a server frozen or stopped, a stuck
pooler, a failover that moved the address. The packets of the connections already open are
acknowledged by the network and never answered, and nothing closes them. The proxy must fail
such a request as an outage (503) within a bounded time, not hang it for minutes.

A TCP relay on loopback between the proxy's code and the test's PostgreSQL freezes the
connections open at a given moment (holds their data both ways, never closes them) and lets
new ones through.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.db import Database, migrate
from proxy.db.engine import CONNECT_TIMEOUT_SECONDS, PING_TIMEOUT_SECONDS, is_unavailable
from proxy.db.ratelimits import TIMEOUT_SECONDS, DatabaseBuckets
from proxy.directory import DomainLimits
from proxy.gateway.errors import GatewayError
from proxy.gateway.service import Gateway
from proxy.gateway.settings import GatewaySettings
from tests.proxy.conftest import PgServer, run
from tests.proxy.fakes import FakeDirectory
from tests.proxy.test_ratelimit import caller

pytestmark = pytest.mark.slow


class FreezingRelay:
    """A TCP relay to ``127.0.0.1:target`` on its own thread and event loop. :meth:`freeze`
    stops every connection open now (or, with ``listening=True``, only those that sent
    ``LISTEN``) from carrying any more data either way, without closing it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._next_id = 0
        self._frozen: set[int] = set()
        self._listening: set[int] = set()
        self._open: set[int] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._silent = False  # new connections accepted and never answered

    def __enter__(self) -> FreezingRelay:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        self.cut()
        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cut(self) -> None:
        """Reset every connection (frozen or not), so that nothing waits on one for good."""

        async def cut() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.transport.abort()

        self._call(cut())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def url(self, pg: PgServer, database: str) -> str:
        return f"postgresql://{pg.user}:{pg.password}@127.0.0.1:{self.port}/{database}"

    def freeze(self, *, listening: bool = False, new: bool = False) -> int:
        """Freeze the connections open now (those that sent LISTEN only, if ``listening``),
        and, if ``new``, every later one too (accepted, never answered: a server that
        stopped as a whole); how many were open."""

        async def mark() -> int:
            chosen = self._listening & self._open if listening else set(self._open)
            self._frozen |= chosen
            self._silent = self._silent or new
            return len(chosen)

        return int(self._call(mark()))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = self._next_id
        self._next_id += 1
        self._open.add(conn)
        self._writers.append(writer)
        if self._silent:
            await asyncio.Event().wait()
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(server_writer)
        await asyncio.gather(
            self._pipe(conn, reader, server_writer, upstream=True),
            self._pipe(conn, server_reader, writer, upstream=False),
            return_exceptions=True,
        )
        self._open.discard(conn)

    async def _pipe(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if upstream and b"LISTEN" in data:
                self._listening.add(conn)
            if conn in self._frozen:
                await asyncio.Event().wait()  # held for good: nothing sent, nothing closed
            writer.write(data)
            await writer.drain()
        writer.close()


@contextlib.contextmanager
def relay_to(pg: PgServer) -> Iterator[FreezingRelay]:
    with FreezingRelay(pg.port) as relay:
        yield relay


def _elapsed(started: float) -> float:
    return time.monotonic() - started


async def _database(pg: PgServer, url: str, relay: FreezingRelay, **timeouts: float) -> Database:
    """The database at ``url``, migrated, reached through ``relay``, one connection pooled."""
    direct = Database.open(url, pool_size=1)
    try:
        await migrate(direct)
    finally:
        await direct.close()
    db = Database.open(relay.url(pg, url.rsplit("/", 1)[1]), pool_size=2, **timeouts)
    await db.ping()
    return db


def test_a_pooled_connection_that_stopped_answering_is_replaced(postgres: PgServer) -> None:
    """The check made before a pooled connection is used has a deadline: a connection that
    stopped answering (a failover that moved the address) is dropped with the rest of the
    pool and the request goes on over a new connection, seconds later, not minutes."""

    url = postgres.create_database()

    async def main() -> None:
        with relay_to(postgres) as relay:
            db = await _database(postgres, url, relay, ping_timeout=1.0)
            try:
                assert relay.freeze() >= 1
                started = time.monotonic()
                await asyncio.wait_for(db.ping(), 30)
                assert _elapsed(started) < 6
            finally:
                await asyncio.wait_for(db.close(), 30)

    run(main())


def test_a_statement_not_answered_in_time_is_an_outage(postgres: PgServer) -> None:
    """A statement on a connection that stopped answering fails after the statement timeout
    as an outage (503 for the caller), and the connection is not used again."""

    url = postgres.create_database()

    async def main() -> None:
        with relay_to(postgres) as relay:
            db = await _database(postgres, url, relay, command_timeout=1.0, ping_timeout=1.0)
            try:
                started = time.monotonic()
                with pytest.raises(Exception) as failed:
                    async with db.write() as conn:
                        await conn.execute(sa.text("SELECT 1"))
                        relay.freeze()
                        await asyncio.wait_for(conn.execute(sa.text("SELECT 2")), 30)
                assert is_unavailable(failed.value), repr(failed.value)
                assert _elapsed(started) < 6
                started = time.monotonic()
                await asyncio.wait_for(db.ping(), 30)  # over a new connection
                assert _elapsed(started) < 6
            finally:
                await asyncio.wait_for(db.close(), 30)

    run(main())


def test_a_server_that_stopped_answering_fails_requests_within_seconds(
    postgres: PgServer,
) -> None:
    """With the default deadlines, as a proxy runs: every connection, old and new, accepted
    and never answered. A request fails as an outage within the ping and connect timeouts
    (and the graceful close of the dead connection), not after minutes."""

    url = postgres.create_database()

    async def main() -> None:
        with relay_to(postgres) as relay:
            db = await _database(postgres, url, relay)
            try:
                relay.freeze(new=True)
                started = time.monotonic()
                with pytest.raises(Exception) as failed:
                    await asyncio.wait_for(db.ping(), 60)
                assert is_unavailable(failed.value), repr(failed.value)
                bound = PING_TIMEOUT_SECONDS + CONNECT_TIMEOUT_SECONDS + 3
                assert _elapsed(started) < bound
            finally:
                await asyncio.wait_for(db.close(), 30)

    run(main())


def test_shared_rate_limits_that_stop_answering_refuse_within_the_timeout(
    postgres: PgServer,
) -> None:
    """The limiter's connections (asyncpg, its own pool): an admission over a connection that
    stopped answering is refused with 503 ``limits_unavailable`` within the limiter's timeout
    (not when the client gives up); the next goes over a new connection; closing does not
    wait for the dead one."""

    url = postgres.create_database()

    async def main() -> None:
        with relay_to(postgres) as relay:
            db = await _database(postgres, url, relay)
            gateway = Gateway(
                FakeDirectory(), GatewaySettings(), replica_buckets=lambda: DatabaseBuckets(db)
            )
            limits = DomainLimits(requests_per_minute=100)
            try:
                await gateway.start()
                await gateway.admit(caller(), limits)
                assert relay.freeze() >= 2
                started = time.monotonic()
                with pytest.raises(GatewayError) as refused:
                    await asyncio.wait_for(gateway.admit(caller(), limits), 60)
                assert (refused.value.status, refused.value.code) == (503, "limits_unavailable")
                assert _elapsed(started) < TIMEOUT_SECONDS + 2
                started = time.monotonic()
                await asyncio.wait_for(gateway.admit(caller(), limits), 60)
                assert _elapsed(started) < TIMEOUT_SECONDS
                relay.freeze()
                gateway.charge(caller(), DomainLimits(tokens_per_minute=100), 5)
                started = time.monotonic()
                await asyncio.wait_for(gateway.close(), 60)
                assert _elapsed(started) < 2 * TIMEOUT_SECONDS + 2
            finally:
                await asyncio.wait_for(db.close(), 30)

    run(main())
