"""Versioned schema migrations, applied at start in one transaction.

``schema_version`` holds one row per applied migration. :func:`migrate` takes the write lock
(SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock, so replicas
starting together migrate once), applies every migration newer than the database's version in
order, records each, and commits — all or nothing, since DDL is transactional on both
databases. Running it again is a no-op. A database newer than this code is refused (an old
proxy must not write into a schema it does not know).

To change the schema: edit :mod:`proxy.db.schema` and append a migration bringing version N-1
to N. Migration 1 creates the tables from the schema module, which is why later migrations must
be written as ALTERs against what existed before them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.db import schema
from proxy.db.engine import Database, DatabaseError

__all__ = ["MIGRATIONS", "current_version", "migrate"]

Migration = Callable[[sa.Connection], None]
# Any constant: the advisory lock key that serializes migrations across replicas.
_PG_LOCK_KEY = 0x43554245  # "CUBE"


def _v1_initial(conn: sa.Connection) -> None:
    tables = [t for t in schema.metadata.sorted_tables if t.name != "schema_version"]
    schema.metadata.create_all(conn, tables=tables)


def _v2_rate_buckets(conn: sa.Connection) -> None:
    # (Already there when migration 1 ran from this schema module.)
    schema.rate_buckets.create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        from proxy.db.ratelimits import INSTALL

        conn.exec_driver_sql("ALTER TABLE rate_buckets SET UNLOGGED")  # (no WAL: see there)
        conn.exec_driver_sql(INSTALL)


def _v3_login_attempts(conn: sa.Connection) -> None:
    schema.login_attempts.create(conn, checkfirst=True)


def _v4_usage_requests(conn: sa.Connection) -> None:
    # (Already there when migration 1 ran from this schema module.) Rows written before
    # counted one request each, as usage_summary counted them then.
    columns = {c["name"] for c in sa.inspect(conn).get_columns("usage")}
    if "requests" not in columns:
        conn.exec_driver_sql("ALTER TABLE usage ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")


def _v5_backend_url_unique(conn: sa.Connection) -> None:
    # (Already there when migration 1 ran from this schema module.) A database holding one URL
    # in several domains cannot take the index: say which, rather than fail on the DDL.
    shared = conn.execute(
        sa.select(schema.backends.c.url)
        .group_by(schema.backends.c.url)
        .having(sa.func.count() > 1)
        .limit(5)
    ).scalars()
    urls = list(shared)
    if urls:
        raise DatabaseError(
            "an agent serves one domain, but these backend URLs are registered in several: "
            f"{', '.join(urls)}; remove the extra registrations, then start this proxy"
        )
    (index,) = [i for i in schema.backends.indexes if i.name == "uq_backends_url"]
    index.create(conn, checkfirst=True)


def _v6_issued_aliases(conn: sa.Connection) -> None:
    # (Already there when migration 1 ran from this schema module.) Aliases of domains deleted
    # before this version are not known; those of the domains there now are.
    schema.issued_aliases.create(conn, checkfirst=True)
    conn.execute(
        sa.insert(schema.issued_aliases).from_select(
            ["alias", "issued_at"],
            sa.select(schema.domains.c.alias, schema.domains.c.created_at).where(
                schema.domains.c.alias.not_in(sa.select(schema.issued_aliases.c.alias))
            ),
        )
    )


def _v7_token_counts_64_bit(conn: sa.Connection) -> None:
    # An agent reporting more than 2**31-1 tokens overflowed PostgreSQL's INTEGER, and the
    # failed insert took its batch with it. (SQLite's INTEGER is 64-bit already.)
    if conn.dialect.name == "postgresql":
        for table in ("usage", "audit"):
            conn.exec_driver_sql(
                f"ALTER TABLE {table} ALTER COLUMN prompt_tokens TYPE BIGINT, "
                "ALTER COLUMN completion_tokens TYPE BIGINT"
            )


#: (version, description, function), in order; versions start at 1 and have no gaps.
MIGRATIONS: tuple[tuple[int, str, Migration], ...] = (
    (1, "initial schema", _v1_initial),
    (2, "rate-limit buckets shared by replicas", _v2_rate_buckets),
    (3, "login attempts shared by workers and replicas", _v3_login_attempts),
    (4, "usage rows count the requests they sum", _v4_usage_requests),
    (5, "a backend URL belongs to one domain", _v5_backend_url_unique),
    (6, "an alias is never given to a second domain", _v6_issued_aliases),
    (7, "token counts are 64-bit", _v7_token_counts_64_bit),
)

LATEST = MIGRATIONS[-1][0]


async def current_version(conn: AsyncConnection) -> int:
    """The database's schema version (0 for an empty database)."""
    exists = await conn.run_sync(lambda c: sa.inspect(c).has_table("schema_version"))
    if not exists:
        return 0
    value = (await conn.execute(sa.select(sa.func.max(schema.schema_version.c.version)))).scalar()
    return int(value or 0)


async def migrate(db: Database) -> list[int]:
    """Bring the database to the latest version; returns the versions applied now."""
    applied: list[int] = []
    async with db.write() as conn:
        if db.dialect == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        await conn.run_sync(lambda c: schema.metadata.create_all(c, tables=[schema.schema_version]))
        version = await current_version(conn)
        if version > LATEST:
            raise DatabaseError(
                f"the database schema is version {version}, newer than this proxy knows "
                f"({LATEST}); upgrade the proxy"
            )
        for number, _description, function in MIGRATIONS:
            if number <= version:
                continue
            await conn.run_sync(function)
            await conn.execute(
                sa.insert(schema.schema_version).values(version=number, applied_at=time.time())
            )
            applied.append(number)
    return applied
