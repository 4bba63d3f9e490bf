"""The data layer: one code path over SQLite and PostgreSQL, migrations, transactions."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.db import LATEST, Database, DatabaseError, current_version, database_url, migrate, schema
from proxy.db import migrations as migrations_module
from proxy.identity.records import usage_summary
from tests.proxy.conftest import run


async def _open(url: str) -> Database:
    db = Database.open(url)
    await migrate(db)
    return db


def test_database_url_forms(tmp_path: Path) -> None:
    url = database_url(str(tmp_path / "x.db"))
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str((tmp_path / "x.db").resolve())
    assert database_url("sqlite:////var/lib/cube/p.db").drivername == "sqlite+aiosqlite"
    pg = database_url("postgresql://u:secret-pw@db.example:5433/cube")
    assert pg.drivername == "postgresql+asyncpg"
    assert pg.port == 5433 and pg.database == "cube"
    assert database_url("postgres://u@h/d").drivername == "postgresql+asyncpg"
    for bad in (
        "",
        "mysql://u@h/d",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql://u:secret-pw@db.example:notaport/cube",  # was a ValueError traceback
    ):
        with pytest.raises(DatabaseError) as refused:
            database_url(bad)
        assert "secret-pw" not in str(refused.value)


def test_described_location_hides_the_password() -> None:
    db = Database.open("postgresql://cube:hunter2-secret@127.0.0.1:1/x")
    try:
        assert "hunter2-secret" not in db.describe()
        assert "***" in db.describe()
    finally:
        run(db.close())


def test_migrations_create_the_schema_once(database: str) -> None:
    async def body() -> None:
        db = Database.open(database)
        try:
            async with db.read() as conn:
                assert await current_version(conn) == 0
            assert await migrate(db) == list(range(1, LATEST + 1))
            assert await migrate(db) == []  # idempotent
            async with db.read() as conn:
                assert await current_version(conn) == LATEST
                rows = (await conn.execute(sa.select(schema.schema_version))).all()
            assert [r.version for r in rows] == list(range(1, LATEST + 1))
        finally:
            await db.close()

    run(body())


def test_migrated_schema_matches_the_table_definitions(database: str) -> None:
    """A fresh migrated database has every table and column that proxy.db.schema declares."""

    async def body() -> None:
        db = await _open(database)
        try:
            async with db.read() as conn:

                def inspect(c: sa.Connection) -> dict[str, set[str]]:
                    insp = sa.inspect(c)
                    return {
                        t: {col["name"] for col in insp.get_columns(t)}
                        for t in insp.get_table_names()
                    }

                found = await conn.run_sync(inspect)
        finally:
            await db.close()
        expected = {t.name: {c.name for c in t.columns} for t in schema.metadata.sorted_tables}
        assert found == expected

    run(body())


def test_concurrent_starts_migrate_once(database: str) -> None:
    """Replicas starting together: one applies the migrations, the others find them done."""

    async def body() -> None:
        dbs = [Database.open(database) for _ in range(4)]
        try:
            results = await asyncio.gather(*(migrate(db) for db in dbs))
        finally:
            for db in dbs:
                await db.close()
        assert sorted(results, key=len) == [[], [], [], list(range(1, LATEST + 1))]

    run(body())


def test_a_failing_migration_leaves_nothing_behind(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO half_done VALUES (1)"))
        raise RuntimeError("migration failed half way")

    async def body() -> None:
        db = Database.open(database)
        try:
            await migrate(db)
            monkeypatch.setattr(
                migrations_module,
                "MIGRATIONS",
                (*migrations_module.MIGRATIONS, (LATEST + 1, "broken", broken)),
            )
            monkeypatch.setattr(migrations_module, "LATEST", LATEST + 1)
            with pytest.raises(RuntimeError, match="half way"):
                await migrations_module.migrate(db)
            async with db.read() as conn:
                assert await current_version(conn) == LATEST
                tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "half_done" not in tables
        finally:
            await db.close()

    run(body())


def test_a_newer_database_is_refused(database: str) -> None:
    async def body() -> None:
        db = await _open(database)
        try:
            async with db.write() as conn:
                await conn.execute(
                    sa.insert(schema.schema_version).values(version=LATEST + 5, applied_at=0.0)
                )
            with pytest.raises(DatabaseError, match="newer"):
                await migrate(db)
        finally:
            await db.close()

    run(body())


def test_write_rolls_back_on_error(database: str) -> None:
    async def body() -> None:
        db = await _open(database)
        now = time.time()
        try:
            with pytest.raises(ZeroDivisionError):
                async with db.write() as conn:
                    await conn.execute(
                        sa.insert(schema.users).values(
                            id="u" * 32, email="a@b.test", created_at=now, updated_at=now
                        )
                    )
                    _ = 1 / 0
            async with db.read() as conn:
                count = (
                    await conn.execute(sa.select(sa.func.count()).select_from(schema.users))
                ).scalar()
            assert count == 0
        finally:
            await db.close()

    run(body())


def test_concurrent_writers_all_commit(database: str) -> None:
    """Many concurrent read-then-write transactions: none fails with a lock error, none is
    lost (SQLite: BEGIN IMMEDIATE + serialized writers; PostgreSQL: row locks)."""

    async def body() -> None:
        db = await _open(database)
        now = time.time()
        try:
            async with db.write() as conn:
                await conn.execute(
                    sa.insert(schema.domains).values(
                        id="d" * 32, alias="counter", name="0", created_at=now, updated_at=now
                    )
                )

            async def increment() -> None:
                async with db.write() as conn:
                    value = (
                        await conn.execute(
                            sa.select(schema.domains.c.name)
                            .where(schema.domains.c.id == "d" * 32)
                            .with_for_update()
                        )
                    ).scalar()
                    await conn.execute(
                        sa.update(schema.domains)
                        .where(schema.domains.c.id == "d" * 32)
                        .values(name=str(int(str(value)) + 1))
                    )

            await asyncio.gather(*(increment() for _ in range(60)))
            async with db.read() as conn:
                final = (
                    await conn.execute(
                        sa.select(schema.domains.c.name).where(schema.domains.c.id == "d" * 32)
                    )
                ).scalar()
            assert final == "60"
        finally:
            await db.close()

    run(body())


def test_foreign_keys_cascade(database: str) -> None:
    """Deleting a user removes its sessions and memberships on both databases (SQLite needs
    foreign_keys=ON on every connection for this)."""

    async def body() -> None:
        db = await _open(database)
        now = time.time()
        try:
            async with db.write() as conn:
                await conn.execute(
                    sa.insert(schema.users).values(
                        id="u" * 32, email="a@b.test", created_at=now, updated_at=now
                    )
                )
                await conn.execute(
                    sa.insert(schema.sessions).values(
                        id="s" * 32, user_id="u" * 32, created_at=now, expires_at=now + 60
                    )
                )
            async with db.write() as conn:
                await conn.execute(sa.delete(schema.users).where(schema.users.c.id == "u" * 32))
            async with db.read() as conn:
                left = (
                    await conn.execute(sa.select(sa.func.count()).select_from(schema.sessions))
                ).scalar()
            assert left == 0
            with pytest.raises(sa.exc.IntegrityError):
                async with db.write() as conn:
                    await conn.execute(
                        sa.insert(schema.sessions).values(
                            id="t" * 32, user_id="nobody", created_at=now, expires_at=now
                        )
                    )
        finally:
            await db.close()

    run(body())


def test_sqlite_is_durable_on_every_connection(tmp_path: Path) -> None:
    """WAL and synchronous=FULL on every pooled connection: a commit is on disk."""

    async def body() -> None:
        db = await _open(str(tmp_path / "p.db"))
        try:

            async def pragmas() -> tuple[str, int, int]:
                async with db.read() as conn:
                    mode = (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar()
                    sync = (await conn.execute(sa.text("PRAGMA synchronous"))).scalar()
                    fks = (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar()
                    await asyncio.sleep(0.05)  # hold the connection so others are opened
                return str(mode), int(sync or 0), int(fks or 0)

            results = await asyncio.gather(*(pragmas() for _ in range(6)))
        finally:
            await db.close()
        assert set(results) == {("wal", 2, 1)}  # 2 = FULL
        assert (tmp_path / "p.db-wal").exists() or (tmp_path / "p.db").exists()

    run(body())


def test_sqlite_file_is_created_with_its_directory(tmp_path: Path) -> None:
    """Readable by this user only: it holds the signing keys and the password hashes (it
    was 0644 in a 0755 directory, whatever the umask let through)."""
    path = tmp_path / "deep" / "er" / "proxy.db"
    old_umask = os.umask(0o022)
    try:
        run(_close_after_migrate(str(path)))
    finally:
        os.umask(old_umask)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def _close_after_migrate(url: str) -> None:
    db = await _open(url)
    await db.close()


def test_migration_4_counts_the_requests_of_older_usage_rows(database: str) -> None:
    """A database from before usage rows counted requests: each older row stays one request,
    and new rows say how many they sum."""

    async def body() -> list[Any]:
        db = Database.open(database)
        try:
            await migrate(db)
            async with db.write() as conn:  # back to what version 3 had
                await conn.execute(sa.text("ALTER TABLE usage DROP COLUMN requests"))
                await conn.execute(
                    sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 4)
                )
                await conn.execute(
                    sa.text(
                        "INSERT INTO usage (at, domain_id, user_id, model, prompt_tokens, "
                        "completion_tokens) VALUES (1, 'd', 'u', 'm', 5, 6)"
                    )
                )
            assert await migrate(db) == list(range(4, LATEST + 1))
            async with db.write() as conn:
                await conn.execute(
                    sa.insert(schema.usage).values(
                        at=2,
                        domain_id="d",
                        user_id="u",
                        model="m",
                        prompt_tokens=10,
                        completion_tokens=12,
                        requests=2,
                    )
                )
            return await usage_summary(db, "d")
        finally:
            await db.close()

    assert run(body()) == [
        {"user_id": "u", "model": "m", "requests": 3, "prompt_tokens": 15, "completion_tokens": 18}
    ]


def test_migration_5_makes_a_backend_url_one_domains(database: str) -> None:
    """From version 4, where one URL could be a backend of several domains: the upgrade says
    which URLs to sort out and applies nothing; once they are, the URL is unique."""

    async def body() -> tuple[str, list[int], bool]:
        db = Database.open(database)
        try:
            await migrate(db)
            async with db.write() as conn:  # back to what version 4 had
                await conn.execute(sa.text("DROP INDEX uq_backends_url"))
                await conn.execute(
                    sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 5)
                )
                for domain in ("a", "b"):
                    await conn.execute(
                        sa.insert(schema.domains).values(
                            id=domain, alias=domain, name="", created_at=0, updated_at=0
                        )
                    )
                    await conn.execute(
                        sa.insert(schema.backends).values(
                            id=f"{domain}-1",
                            domain_id=domain,
                            url="https://10.0.0.5:8443",
                            kind="vllm",
                            models="[]",
                            created_at=0,
                            updated_at=0,
                        )
                    )
            with pytest.raises(DatabaseError) as refused:
                await migrate(db)
            async with db.write() as conn:
                await conn.execute(sa.delete(schema.backends).where(schema.backends.c.id == "b-1"))
            applied = await migrate(db)
            try:
                async with db.write() as conn:
                    await conn.execute(
                        sa.insert(schema.backends).values(
                            id="b-2",
                            domain_id="b",
                            url="https://10.0.0.5:8443",
                            kind="vllm",
                            models="[]",
                            created_at=0,
                            updated_at=0,
                        )
                    )
                unique = False
            except sa.exc.IntegrityError:
                unique = True
            return str(refused.value), applied, unique
        finally:
            await db.close()

    message, applied, unique = run(body())
    assert "https://10.0.0.5:8443" in message and "several" in message
    assert applied == list(range(5, LATEST + 1)) and unique


def test_migration_6_records_the_aliases_of_existing_domains(database: str) -> None:
    """From version 5: the aliases of the domains there are recorded as issued, so deleting one
    of them does not free its alias."""

    async def body() -> tuple[list[int], set[str]]:
        db = Database.open(database)
        try:
            await migrate(db)
            async with db.write() as conn:  # back to what version 5 had
                await conn.execute(sa.text("DROP TABLE issued_aliases"))
                await conn.execute(
                    sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 6)
                )
                for alias in ("acme", "bank"):
                    await conn.execute(
                        sa.insert(schema.domains).values(
                            id=alias, alias=alias, name="", created_at=0, updated_at=0
                        )
                    )
            applied = await migrate(db)
            async with db.read() as conn:
                issued = set(
                    (await conn.execute(sa.select(schema.issued_aliases.c.alias))).scalars()
                )
            return applied, issued
        finally:
            await db.close()

    assert run(body()) == (list(range(6, LATEST + 1)), {"acme", "bank"})


def test_migration_7_makes_token_counts_64_bit(database: str) -> None:
    """From version 6 (PostgreSQL's 32-bit INTEGER columns): a count beyond 2**31-1, which an
    agent may report, is stored."""
    big = 2**35

    async def body() -> tuple[list[int], list[tuple[int, int | None]]]:
        db = Database.open(database)
        try:
            await migrate(db)
            async with db.write() as conn:  # back to what version 6 had
                if db.dialect == "postgresql":
                    for table in ("usage", "audit"):
                        await conn.execute(
                            sa.text(
                                f"ALTER TABLE {table} ALTER COLUMN prompt_tokens TYPE INTEGER, "
                                "ALTER COLUMN completion_tokens TYPE INTEGER"
                            )
                        )
                await conn.execute(
                    sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 7)
                )
            applied = await migrate(db)
            async with db.write() as conn:
                common = {"at": time.time(), "domain_id": "d", "prompt_tokens": big}
                await conn.execute(
                    sa.insert(schema.usage).values(
                        **common, user_id="u", model="m", completion_tokens=big
                    )
                )
                await conn.execute(
                    sa.insert(schema.audit).values(
                        **common, event="request", route="/v1/x", status=200
                    )
                )
            async with db.read() as conn:
                rows = [
                    (int(r.prompt_tokens), r.completion_tokens)
                    for table in (schema.usage, schema.audit)
                    for r in await conn.execute(sa.select(table))
                ]
            return applied, rows
        finally:
            await db.close()

    assert run(body()) == (list(range(7, LATEST + 1)), [(big, big), (big, None)])


def test_a_row_the_database_refuses_fails_only_its_own_caller(database: str) -> None:
    """Rows queued by several callers share one transaction; one the database refuses fails
    its caller alone, the others' rows are committed."""
    from proxy.identity.records import RecordWriter

    async def body() -> tuple[list[object], list[str]]:
        db = await _open(database)
        writer = RecordWriter(db)
        try:

            def row(model: str | None) -> dict[str, Any]:
                return {
                    "at": time.time(),
                    "domain_id": "d",
                    "user_id": "u",
                    "model": model,
                    "prompt_tokens": 1,
                    "completion_tokens": 2,
                }

            outcomes = await asyncio.gather(
                writer.insert(schema.usage, row("first")),
                writer.insert(schema.usage, row(None)),  # NOT NULL: refused
                writer.insert_many(schema.usage, [row("third"), row("fourth")]),
                return_exceptions=True,
            )
            async with db.read() as conn:
                models = list((await conn.execute(sa.select(schema.usage.c.model))).scalars())
            return [type(o).__name__ if o is not None else None for o in outcomes], models
        finally:
            await writer.close()
            await db.close()

    outcomes, models = run(body())
    assert outcomes == [None, "IntegrityError", None]
    assert sorted(models) == ["first", "fourth", "third"]


def test_postgresql_refusing_work_for_now_is_an_outage(postgres: Any) -> None:
    """PostgreSQL refusing work for now (too many connections; shutting down or starting up
    alike) arrives as a plain DBAPIError: it is an outage (503, audit rows kept for a retry),
    not a refused statement (500, rows dropped)."""
    import asyncpg  # type: ignore[import-untyped]

    from proxy.db.engine import is_unavailable

    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]

    async def body() -> tuple[BaseException, BaseException, BaseException]:
        admin = await asyncpg.connect(postgres.url(name))
        try:
            await admin.execute(
                "CREATE ROLE crowded LOGIN PASSWORD 'crowded-pw' CONNECTION LIMIT 0"
            )
            await admin.execute("CREATE TABLE t (id integer PRIMARY KEY)")
            await admin.execute("GRANT ALL ON t TO crowded")
            db = Database.open(
                url.replace(f"{postgres.user}:{postgres.password}", "crowded:crowded-pw")
            )
            try:
                with pytest.raises(Exception) as crowded:
                    async with db.read() as conn:
                        await conn.execute(sa.text("SELECT 1"))
            finally:
                await db.close()
            db = Database.open(url)
            try:
                with pytest.raises(Exception) as duplicate:
                    async with db.write() as conn:
                        await conn.execute(sa.text("INSERT INTO t VALUES (1), (1)"))
            finally:
                await db.close()
            # A failover that left the proxy on a standby: writes refused for now (25006).
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            db = Database.open(url)
            try:
                with pytest.raises(Exception) as read_only:
                    async with db.write() as conn:
                        await conn.execute(sa.text("INSERT INTO t VALUES (2)"))
            finally:
                await db.close()
                await admin.execute(
                    f'ALTER DATABASE "{name}" SET default_transaction_read_only = off'
                )
            return crowded.value, duplicate.value, read_only.value
        finally:
            await admin.execute("DROP TABLE IF EXISTS t")
            await admin.execute("DROP ROLE IF EXISTS crowded")
            await admin.close()

    crowded, duplicate, read_only = run(body())
    assert is_unavailable(crowded), repr(crowded)
    assert is_unavailable(read_only), repr(read_only)
    assert not is_unavailable(duplicate), repr(duplicate)


def test_an_outage_while_rows_are_retried_per_caller_fails_the_rest_at_once() -> None:
    """A batch refused as a whole is retried caller by caller; if the database goes away
    meanwhile, the callers left fail together rather than one connection timeout each."""
    import contextlib
    from collections.abc import AsyncIterator

    from sqlalchemy import exc as sa_exc

    from proxy.identity.records import RecordWriter

    class FlakyDatabase:
        def __init__(self) -> None:
            self.writes = 0

        @contextlib.asynccontextmanager
        async def write(self) -> AsyncIterator[Any]:
            self.writes += 1
            if self.writes == 1:
                raise sa_exc.IntegrityError("INSERT", None, Exception("a refused row"))
            if self.writes > 1:
                raise sa_exc.OperationalError("INSERT", None, Exception("connection refused"))
            yield None

    async def body() -> tuple[list[str], int]:
        db = FlakyDatabase()
        writer = RecordWriter(db)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(
            *(writer.insert(schema.usage, {"model": str(n)}) for n in range(4)),
            return_exceptions=True,
        )
        return [type(o).__name__ for o in outcomes], db.writes

    names, writes = run(body())
    assert names == ["OperationalError"] * 4
    assert writes == 2  # the batch, then the first caller alone
