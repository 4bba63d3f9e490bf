"""One async database handle over SQLite (a file, the default) and PostgreSQL.

Both go through SQLAlchemy Core's async engine (aiosqlite, asyncpg), so every query is written
once. Transactions are explicit: :meth:`Database.read` for a consistent snapshot,
:meth:`Database.write` for changes.

SQLite specifics, all set on every new connection:

- ``journal_mode=WAL`` and ``synchronous=FULL``: a transaction is durable when COMMIT returns
  (the WAL is fsynced on every commit), so a write acknowledged to a client survives SIGKILL
  or power loss;
- ``foreign_keys=ON`` (off by default in SQLite) so cascades behave as on PostgreSQL;
- ``busy_timeout`` so a second process (``cube admin`` over the file, another proxy) waits for
  the write lock instead of failing;
- SQLAlchemy, not the sqlite3 module, emits BEGIN, so reads are real transactions and writes
  start with ``BEGIN IMMEDIATE`` (taking the write lock up front: a read-then-write
  transaction can never fail half way with SQLITE_BUSY_SNAPSHOT). Writers in one process are
  also serialized by an asyncio lock, so they queue on the loop rather than on a file lock.

PostgreSQL runs at READ COMMITTED; code that must not race uses conditional UPDATEs (checking
the affected row count) or ``SELECT ... FOR UPDATE`` (ignored by SQLite, whose writers are
serial anyway).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

__all__ = [
    "Database",
    "DatabaseError",
    "Dialect",
    "database_url",
    "is_unavailable",
    "redacted_spec",
    "redacted_url",
]

log = logging.getLogger("cube.proxy.db")

Dialect = Literal["sqlite", "postgresql"]
_IMMEDIATE = "cube_begin_immediate"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: PostgreSQL: the most a new connection (TCP, TLS, authentication) and one statement may take.
CONNECT_TIMEOUT_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 15.0
#: How long a pooled connection may take to answer the check made before each use.
PING_TIMEOUT_SECONDS = 5.0
_WAL_ATTEMPTS = 10


class DatabaseError(Exception):
    """The database could not be opened, migrated or used (message free of credentials)."""


def database_url(spec: str) -> URL:
    """A SQLAlchemy async URL from what a user passes to ``--database``.

    Accepted: a file path (SQLite), ``sqlite:///path``, ``postgresql://...`` or
    ``postgres://...`` (asyncpg). Anything else is refused.
    """
    spec = spec.strip()
    if not spec:
        raise DatabaseError("empty database location")
    if "://" not in spec:
        return URL.create("sqlite+aiosqlite", database=str(Path(spec).expanduser().resolve()))
    try:
        url = make_url(spec)
        url.port  # noqa: B018 - parsed lazily: a non-numeric port raises here, not later
    except (ArgumentError, ValueError):
        raise DatabaseError("malformed database URL") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise DatabaseError("SQLite needs a file (an in-memory database loses every write)")
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+asyncpg")
    raise DatabaseError(f"unsupported database {backend!r} (use a SQLite file or postgresql://)")


def _private_file(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by this user only: it holds the
    signing keys (PEM unless a key secret is set) and the password hashes. SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DatabaseError(f"cannot create the database file ({exc.strerror})") from None
    try:
        if os.fstat(fd).st_mode & 0o077:
            log.warning(
                "the database file is readable by other users: it holds the signing keys "
                "(chmod 600 it)"
            )
    finally:
        os.close(fd)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached now (a connection refused, lost or
    timed out, a statement not answered in time) or the transaction must be tried again (a
    deadlock), as opposed to a statement it refused: the caller answers 503, not 500."""
    if isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.DisconnectionError,
            sa_exc.TimeoutError,
        ),
    ):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # PostgreSQL refusing work for now (shutting down, starting up, too many connections)
    # comes as a plain DBAPIError: its SQLSTATE tells an outage from a refused statement.
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or ""
    return isinstance(state, str) and state.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)


#: Class 08 (connection exceptions), 53 (insufficient resources: disk full, out of memory,
#: too many connections), 57P (shutting down, starting up), 25006: a read-only transaction —
#: a failover that left the proxy on a standby until the primary is back —, and 40001 and
#: 40P01: a transaction the server rolled back to break a deadlock or a serialization
#: conflict with another one (concurrent requests, maybe on other replicas), which succeeds
#: when tried again: the caller answers 503 with Retry-After, as for an outage.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P", "25006", "40001", "40P01")


_SECRET_QUERY_KEYS = frozenset({"password", "passfile", "sslpassword", "sslkey"})


def redacted_url(url: URL) -> str:
    """``url`` for logs and printing: its password hidden, wherever it is given (asyncpg also
    takes ``?password=``)."""
    query = {k: ("***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True)


def redacted_spec(spec: str) -> str:
    """What a user passed to ``--database``, for printing without its secrets."""
    try:
        url = make_url(spec) if "://" in spec else None
    except ArgumentError:
        return "(a malformed database URL)"
    return spec if url is None else redacted_url(url)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin); the driver must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        for attempt in range(_WAL_ATTEMPTS):
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                # Connections switching a new file to WAL together can deadlock on its lock,
                # and SQLite then answers one of them "locked" at once, without waiting. Once
                # it gave up its lock the switch goes through (or finds it done): ask again.
                if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                    raise
        mode = cursor.fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise DatabaseError("SQLite refused WAL journal mode")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    immediate = conn.get_execution_options().get(_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


_FRESH = "cube_fresh"


def _fresh_connection(_dbapi_connection: Any, record: Any) -> None:
    record.info[_FRESH] = True


def _ping_on_checkout(
    dbapi_connection: Any, record: Any, _proxy: Any, *, timeout: float = PING_TIMEOUT_SECONDS
) -> None:
    """Check a pooled PostgreSQL connection before handing it out (one just opened needs no
    check): a connection the server closed (a restart) or one that stopped answering (no
    answer within ``timeout``) makes the pool drop every connection it holds and
    open a new one, so the request goes on over a fresh connection, or fails as an outage
    if none can be opened."""
    if record.info.pop(_FRESH, False):
        return
    driver = dbapi_connection.driver_connection
    try:
        await_only(driver.fetchval("SELECT 1", timeout=timeout))
    except Exception as exc:
        log.warning("database connection lost (%s); reconnecting", type(exc).__name__)
        raise sa_exc.InvalidatePoolError(type(exc).__name__) from None


def _quiet_driver_loggers() -> None:
    """aiosqlite logs every statement WITH its parameters at DEBUG (password hashes, token
    hashes, signing keys): an application running at DEBUG must never see them."""
    driver = logging.getLogger("aiosqlite")
    if driver.level < logging.WARNING:  # NOTSET (0) would inherit the root level
        driver.setLevel(logging.WARNING)


class Database:
    """The proxy's database. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine, dialect: Dialect, url: URL) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect
        self.url = url
        self._write_lock = asyncio.Lock()

    @classmethod
    def open(
        cls,
        spec: str | URL,
        *,
        pool_size: int = 10,
        command_timeout: float | None = COMMAND_TIMEOUT_SECONDS,
        ping_timeout: float = PING_TIMEOUT_SECONDS,
    ) -> Database:
        url = spec if isinstance(spec, URL) else database_url(spec)
        backend = url.get_backend_name()
        _quiet_driver_loggers()
        if backend == "sqlite":
            if url.database:
                _private_file(Path(url.database))
            # hide_parameters: SQL parameters never appear in SQLAlchemy's logs or in the
            # messages of its exceptions (they carry hashes and keys).
            engine = create_async_engine(
                url, pool_size=pool_size, max_overflow=0, hide_parameters=True
            )
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
            return cls(engine, "sqlite", url)
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            hide_parameters=True,
            # A server that stops answering (frozen, a stuck pooler, a failover that moved the
            # address: packets acknowledged, never answered, nothing closed) fails a
            # connection or a statement as an outage instead of holding the request for good.
            connect_args={"timeout": CONNECT_TIMEOUT_SECONDS, "command_timeout": command_timeout},
        )
        # Instead of SQLAlchemy's pool_pre_ping, which has no deadline of its own and, when the
        # statement's runs out, fails the request instead of reconnecting: _ping_on_checkout.
        event.listen(engine.sync_engine, "connect", _fresh_connection)
        ping = functools.partial(_ping_on_checkout, timeout=ping_timeout)
        event.listen(engine.sync_engine, "checkout", ping)
        return cls(engine, "postgresql", url)

    def driver_dsn(self) -> str:
        """The PostgreSQL URL for a connection of asyncpg's own (outside SQLAlchemy's pool:
        listening for notices, single-statement round trips). It holds the password: never
        log it."""
        if self.dialect != "postgresql":
            raise DatabaseError("a driver connection needs PostgreSQL")
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def describe(self) -> str:
        """The location without its password (for logs)."""
        return redacted_url(self.url)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction (a snapshot on both databases for its single statements)."""
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block exits without an exception."""
        if self.dialect == "sqlite":
            async with self._write_lock, self.engine.connect() as conn:
                await conn.execution_options(**{_IMMEDIATE: True})
                async with conn.begin():
                    yield conn
        else:
            async with self.engine.connect() as conn, conn.begin():
                yield conn

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()
