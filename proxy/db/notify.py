"""Change notices between proxy replicas sharing a PostgreSQL database (``LISTEN``/``NOTIFY``).

Each replica caches authentications and domain data for up to ``--identity-cache-seconds``.
Within one host the workers already forget their caches together on any change (a shared
generation file); across hosts, a change — a revoked token, a disabled user, a removed member —
would otherwise be honoured by the other replicas only once their entries expire. So every
change made through one replica is announced on :data:`CHANNEL`, and every replica listening
forgets its cache when another one announces: revocation reaches all replicas in milliseconds.

The notice carries no data, only the announcing process's random id (so a replica skips its
own). A listener that loses its connection — closed, or silent: it is pinged every
:data:`PING_INTERVAL_SECONDS` — reconnects with backoff and forgets its cache when it is back
(it may have missed notices); meanwhile the cache's TTL still bounds staleness, and this
replica's own notices go through the database's pooled connections.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa

from cube._tasks import cancel_and_wait
from proxy.db.engine import Database

__all__ = ["CHANNEL", "ChangeNotices"]

log = logging.getLogger("cube.proxy.notify")

CHANNEL: Final = "cube_identity_changed"
_RETRY_SECONDS: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
#: A connection can die without a word (a server frozen or moved, a cut that sends no reset):
#: the listening connection is asked ``SELECT 1`` this often, and taken for lost (dropped,
#: reconnected, the cache forgotten) when it does not answer within PING_TIMEOUT_SECONDS or
#: a notice sent over it fails or takes longer than SEND_TIMEOUT_SECONDS.
PING_INTERVAL_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 5.0
_CLOSE_SECONDS: Final = 2.0
_FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class ChangeNotices:
    """Announces this process's changes and calls ``on_change`` for everyone else's."""

    def __init__(self, db: Database, on_change: Callable[[], None]) -> None:
        if db.dialect != "postgresql":
            raise ValueError("change notices need PostgreSQL")
        self._db = db
        self._dsn = db.driver_dsn()
        self._on_change = on_change
        self.origin = secrets.token_hex(8)
        self._conn: Any = None  # asyncpg.Connection, while connected
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.received = 0

    async def start(self) -> None:
        """Connect and listen (raises if the database cannot be reached), then keep the
        connection in the background."""
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="change-notices")

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=PING_TIMEOUT_SECONDS, command_timeout=PING_TIMEOUT_SECONDS
        )
        try:
            await conn.add_listener(CHANNEL, self._received)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._give_up)
        self._conn = conn
        self._lost.clear()

    def _give_up(self, conn: object) -> None:
        """Take ``conn`` for lost (closed, reset, or not answering), if it is still ours."""
        if conn is not None and conn is self._conn:
            self._lost.set()

    def _received(self, conn: object, pid: int, channel: str, payload: str) -> None:
        del conn, pid, channel
        if payload != self.origin:
            self.received += 1
            self._on_change()

    async def _keep(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), PING_INTERVAL_SECONDS)
            except TimeoutError:
                await self._ping()
                continue
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()  # no goodbye: it may never answer again
            log.warning("change notices: connection lost; reconnecting")
            for attempt in range(1_000_000):
                await asyncio.sleep(_RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)])
                try:
                    await self._connect()
                except _FAILURES as exc:
                    log.warning("change notices: reconnect failed (%s)", type(exc).__name__)
                    continue
                self._on_change()  # notices may have been missed meanwhile
                log.info("change notices: listening again")
                break

    async def _ping(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            async with self._lock:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS)
        except _FAILURES as exc:
            log.warning("change notices: the connection did not answer (%s)", type(exc).__name__)
            self._give_up(conn)

    def publish(self) -> None:
        """Announce a change (committed already) to the other replicas, in the background."""
        task = asyncio.get_running_loop().create_task(self._send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                async with self._lock:
                    await conn.execute(
                        "SELECT pg_notify($1, $2)",
                        CHANNEL,
                        self.origin,
                        timeout=SEND_TIMEOUT_SECONDS,
                    )
            except _FAILURES as exc:
                log.warning(
                    "change notices: a notice failed on the listening connection (%s)",
                    type(exc).__name__,
                )
                self._give_up(conn)
            else:
                return
        # Reconnecting: the notice goes through the database's own connections instead.
        try:
            async with self._db.write() as pooled:
                await pooled.execute(
                    sa.text("SELECT pg_notify(:channel, :origin)"),
                    {"channel": CHANNEL, "origin": self.origin},
                )
        except Exception as exc:  # the others fall back to their cache TTL
            log.warning("change notice not sent (%s)", type(exc).__name__)

    async def flush(self) -> None:
        """Wait for the notices being sent (tests, shutdown)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        await cancel_and_wait(self._task)
        self._task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), _CLOSE_SECONDS)
            except _FAILURES:
                conn.terminate()
