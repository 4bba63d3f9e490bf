"""Fixtures for the proxy's storage and identity tests: a real PostgreSQL server, a fresh
database per test on SQLite or PostgreSQL, and the admin API served on loopback.

- ``postgres`` (session): ``initdb`` a throwaway cluster into a temporary directory (as the
  ``postgres`` user when the tests run as root, since PostgreSQL refuses to run as root), start
  it with ``pg_ctl`` on a free loopback port (``listen_addresses=127.0.0.1``, its unix socket in
  the same directory, password authentication), stop it and delete it at session end.
- ``database`` (parametrized ``sqlite`` / ``postgresql``; the PostgreSQL variant is marked
  slow): a URL for an empty database of that kind — a new file, or a new PostgreSQL database.
- ``admin_server``: the standalone admin API (``proxy.admin_api.make_app``) over ``database``
  on a background event loop, with an admin bootstrapped; synchronous HTTP helpers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from proxy.admin_api import make_app
from proxy.identity import IdentityConfig

T = TypeVar("T")

ADMIN_EMAIL = "admin@cube.test"
ADMIN_PASSWORD = "admin-password-1234"
#: Cheap argon2id for tests (the production defaults are checked in test_users.py).
FAST_ARGON2 = {"argon2_memory_kib": 8192, "argon2_time_cost": 1, "argon2_parallelism": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@dataclass
class PgServer:
    port: int
    user: str
    password: str
    root: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:16]

        async def create() -> None:
            import asyncpg  # type: ignore[import-untyped]

            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=self.port,
                user=self.user,
                password=self.password,
                database="postgres",
            )
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)


def _as_postgres_user() -> list[str]:
    """The prefix that runs a command as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError (a clear failure) if the user does not exist
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="cube-pg-"))
    prefix = _as_postgres_user()
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    password = secrets.token_urlsafe(18)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if prefix:
        shutil.chown(pwfile, "postgres", "postgres")
    data = root / "data"
    port = free_port()
    subprocess.run(
        [
            *prefix,
            initdb,
            "-D",
            str(data),
            "-U",
            "cube",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200"
    started = subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if started.returncode != 0:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr.decode()} {log}")
    try:
        yield PgServer(port=port, user="cube", password=password, root=root)
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "proxy.db")
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


def identity_config(database: str, **overrides: Any) -> IdentityConfig:
    values: dict[str, Any] = {
        "database": database,
        "issuer_url": "https://proxy.cube.test",
        "admin_email": ADMIN_EMAIL,
        "admin_password": ADMIN_PASSWORD,
        "auth_cache_seconds": 0,
        **FAST_ARGON2,
    }
    values.update(overrides)
    return IdentityConfig(**values)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- the admin API on a background loop -----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AdminServer:
    """The standalone admin API served from a background event loop."""

    def __init__(self, config: IdentityConfig) -> None:
        self.config = config
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.app = make_app(config)
        # As cube-proxy's runner (proxy/cli.py): bodies reach the handlers as sent.
        self.runner = web.AppRunner(self.app, access_log=None, auto_decompress=False)
        self.call(self._start())

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    @property
    def identity(self) -> Any:
        from proxy.identity import IDENTITY

        return self.app[IDENTITY]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            sent = dict(headers or {})
            data = raw
            if body is not None:
                data = json.dumps(body).encode()
                sent["Content-Type"] = "application/json"
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, dict(response.headers), response.read())
        finally:
            conn.close()

    def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> dict[str, Any]:
        reply = self.request("POST", "/auth/login", {"email": email, "password": password})
        assert reply.status == 200, reply.body
        out: dict[str, Any] = reply.json()
        return out

    def token(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> str:
        return str(self.login(email, password)["access_token"])


@pytest.fixture
def admin_server(database: str) -> Iterator[AdminServer]:
    server = AdminServer(identity_config(database))
    try:
        yield server
    finally:
        server.close()


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def use_identity(database: str, body: Any, **overrides: Any) -> Any:
    """Open an Identity over ``database`` (config overrides allowed), run ``body(identity)``
    in a fresh event loop, close it."""
    from proxy.identity import Identity

    async def main() -> Any:
        identity = await Identity.open(identity_config(database, **overrides))
        try:
            return await body(identity)
        finally:
            await identity.close()

    return run(main())


async def dump_database(db: Any) -> str:
    """Every row of every table, as text (to look for secrets that must not be stored)."""
    import sqlalchemy as sa

    from proxy.db import schema

    out = []
    async with db.read() as conn:
        for table in schema.metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                out.append(repr(tuple(row)))
    return "\n".join(out)
