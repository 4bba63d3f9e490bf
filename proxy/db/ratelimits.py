"""Rate-limit buckets kept in PostgreSQL, so that proxy replicas sharing a database enforce each
limit once between them (``cube-proxy --rate-limits database``).

The buckets are those of :mod:`proxy.gateway.ratelimit` (``limit`` units a minute, at most
``limit`` saved up, token buckets charged afterwards and allowed to go negative), held in the
``rate_buckets`` table and timed by the database's clock, so the replicas' clocks do not matter.

An admission is one statement, ``cube_rate_admit``, a PL/pgSQL function (installed by migration
2): it creates the missing buckets, locks the request's buckets in key order (two admissions
never deadlock), and takes a unit from each request bucket only when every bucket admits. One
round trip, atomic, whatever the number of replicas. Charges are written in batches (they only
ever lower a level, and a few milliseconds of delay cannot admit a request twice over).

A bucket refilled to its limit is the same as no bucket; :meth:`DatabaseBuckets.prune` deletes
those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg  # type: ignore[import-untyped]

from proxy.db.engine import Database

__all__ = ["INSTALL", "TIMEOUT_SECONDS", "DatabaseBuckets"]

T = TypeVar("T")

#: Installed on PostgreSQL by migration 2 (``CREATE OR REPLACE``: a later migration may
#: install a new version). Returns one row: the 1-based index of the check that refused (0:
#: admitted) and the seconds until it would admit.
INSTALL = """
CREATE OR REPLACE FUNCTION cube_rate_admit(
    p_keys text[], p_limits bigint[], p_requests boolean[]
) RETURNS TABLE (refused integer, wait double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_now double precision := extract(epoch FROM clock_timestamp());
    v_keys text[] := '{}';
    v_limits bigint[] := '{}';
    v_levels double precision[] := '{}';
    v_level double precision;
    v_need double precision;
    v_wait double precision;
    b record;
BEGIN
    -- Buckets need no durability (a crash forgets them: every bucket full again); a commit
    -- that waits for the disk would be most of an admission's time.
    SET LOCAL synchronous_commit = off;
    refused := 0;
    wait := 0;
    INSERT INTO rate_buckets (key, lim, level, updated)
        SELECT t.k, t.l, t.l, v_now FROM unnest(p_keys, p_limits) AS t(k, l) ORDER BY t.k
        ON CONFLICT (key) DO NOTHING;
    FOR b IN
        SELECT t.i, t.k, t.l, t.r, rb.level AS old_level, rb.updated AS old_updated
        FROM rate_buckets rb
        JOIN unnest(p_keys, p_limits, p_requests) WITH ORDINALITY AS t(k, l, r, i)
            ON rb.key = t.k
        ORDER BY rb.key
        FOR UPDATE OF rb
    LOOP
        -- Resized to the current limit, then refilled at its rate up to it.
        v_level := least(
            b.l::double precision,
            least(b.old_level, b.l) + greatest(0, v_now - b.old_updated) * b.l / 60.0
        );
        v_need := CASE WHEN b.r THEN 1.0 ELSE 0.0 END;
        IF v_level < v_need THEN
            v_wait := (v_need - v_level) / (b.l / 60.0);
            IF v_wait > wait THEN
                refused := b.i;
                wait := v_wait;
            END IF;
        ELSIF b.r THEN
            v_keys := v_keys || b.k;
            v_limits := v_limits || b.l;
            v_levels := v_levels || (v_level - 1.0);
        END IF;
    END LOOP;
    IF refused = 0 AND cardinality(v_keys) > 0 THEN
        UPDATE rate_buckets rb SET lim = v.l, level = v.v, updated = v_now
            FROM unnest(v_keys, v_limits, v_levels) AS v(k, l, v) WHERE rb.key = v.k;
    END IF;
    RETURN NEXT;
END
$$;
"""

_ADMIT = "SELECT refused, wait FROM cube_rate_admit($1::text[], $2::bigint[], $3::boolean[])"

# A new bucket starts full and is charged: level = limit - tokens. An existing one is resized
# to the limit, refilled to now, and charged the same tokens (excluded.lim - excluded.level).
_CHARGE = """
    INSERT INTO rate_buckets AS rb (key, lim, level, updated)
    SELECT t.k, t.l, t.l - t.n, extract(epoch FROM clock_timestamp())
    FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(k, l, n)
    ORDER BY t.k
    ON CONFLICT (key) DO UPDATE SET
        lim = excluded.lim,
        level = least(
            excluded.lim::double precision,
            least(rb.level, excluded.lim)
                + greatest(0, excluded.updated - rb.updated) * excluded.lim / 60.0
        ) - (excluded.lim - excluded.level),
        updated = excluded.updated
"""

_PRUNE = (
    "DELETE FROM rate_buckets WHERE level + greatest(0, extract(epoch FROM clock_timestamp())"
    " - updated) * lim / 60.0 >= lim"
)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is: these statements leave no session state
    (the default reset is one more round trip per statement)."""
    del connection


#: The most an admission, a charge or a prune may take, connecting included (a server that
#: stops answering must refuse the request with 503 promptly, not hold it).
TIMEOUT_SECONDS = 5.0


class DatabaseBuckets:
    """The ``rate_buckets`` of a PostgreSQL database, through connections of their own
    (asyncpg, each statement its own transaction): an admission is one round trip, not the
    four of a pooled SQLAlchemy transaction (checkout ping, BEGIN, statement, COMMIT)."""

    def __init__(
        self, db: Database, *, pool_size: int = 4, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        if db.dialect != "postgresql":
            raise ValueError("rate limits kept in the database need PostgreSQL")
        self._dsn = db.driver_dsn()
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _connections(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self._pool_size,
                        timeout=self._timeout,  # to connect
                        command_timeout=self._timeout,
                        reset=_keep_session,
                    )
        return self._pool

    async def _run(self, statement: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``statement`` on a pooled connection, all of it (connecting, waiting for a free
        connection, the round trip, giving it back) within the timeout: TimeoutError past it.
        A connection whose statement ran out of time is closed at once, not reset (its
        server may never answer again, and a graceful reset would wait for it), and the
        others are replaced before their next use (they likely reach the same server)."""
        try:
            async with asyncio.timeout(self._timeout):
                pool = await self._connections()
                conn = await pool.acquire()
                try:
                    return await statement(conn)
                except (TimeoutError, asyncio.CancelledError):
                    conn.terminate()
                    raise
                finally:
                    await pool.release(conn)
        except TimeoutError:
            if self._pool is not None:
                await self._pool.expire_connections()
            raise

    async def admit(
        self, keys: Sequence[str], limits: Sequence[int], requests: Sequence[bool]
    ) -> tuple[int, float] | None:
        """Take a unit from every request bucket (``requests[i]``), or nothing if any bucket
        refuses: then the index of the one that refused and the seconds until it admits."""
        row = await self._run(
            lambda conn: conn.fetchrow(_ADMIT, list(keys), list(limits), list(requests))
        )
        refused, wait = int(row[0]), float(row[1])
        return (refused - 1, wait) if refused else None

    async def charge(self, charges: Sequence[tuple[str, int, int]]) -> None:
        """Charge ``(key, limit, tokens)``; a key appears at most once."""
        if not charges:
            return
        await self._run(
            lambda conn: conn.execute(
                _CHARGE,
                [c[0] for c in charges],
                [c[1] for c in charges],
                [c[2] for c in charges],
            )
        )

    async def prune(self) -> int:
        """Delete the buckets that have refilled (they are the same as none); how many."""
        status = await self._run(lambda conn: conn.execute(_PRUNE))
        return int(status.rsplit(" ", 1)[-1])  # "DELETE n"

    async def close(self) -> None:
        """Close the connections (at once, if the server does not answer in time)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except TimeoutError:
                pool.terminate()
