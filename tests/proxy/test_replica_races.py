"""Writes of two replicas (or two connections) over one PostgreSQL racing each other.

The other replica's write in flight is a transaction held open on a connection of its own
that runs the statements that replica's Identity method runs, and so holds the locks it
would. The request under test starts, the test waits until it is blocked on one of those
locks (or finished), then the held transaction commits: the interleaving that a real race
produces now and then, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa

from proxy.db.engine import is_unavailable
from proxy.db.schema import pats
from proxy.identity import Forbidden, Identity, NotFound, Unauthorized
from tests.proxy.conftest import PgServer, identity_config, run
from tests.proxy.test_pats import PASSWORD, _setup

pytestmark = pytest.mark.slow

T = TypeVar("T")


class Held:
    """A transaction on a connection of its own: another replica's write in flight."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.tx = conn.transaction()

    async def run(self, statement: str, *args: object) -> str:
        return str(await self.conn.execute(statement, *args))


@contextlib.asynccontextmanager
async def held(url: str, *statements: tuple[str, ...]) -> AsyncIterator[Held]:
    """A transaction that ran ``statements`` (SQL, then its arguments) and is held open;
    rolled back at the end unless the body committed it."""
    conn = await asyncpg.connect(url)
    try:
        hold = Held(conn)
        await hold.tx.start()
        for sql, *args in statements:
            await hold.run(sql, *args)
        yield hold
    finally:
        await conn.close()


async def blocked_or_done(url: str, task: asyncio.Task[Any], seconds: float = 10.0) -> None:
    """Wait until a connection of this database (other than the held one, which does not
    wait) waits for a lock, or ``task`` has finished."""
    watcher = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + seconds
        while not task.done():
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the request neither blocked nor finished")
            await asyncio.sleep(0.02)
    finally:
        await watcher.close()


async def race(
    url: str, statements: list[tuple[str, ...]], request: Callable[[], Awaitable[T]]
) -> T:
    """``request`` while a transaction that ran ``statements`` is in flight, committed once
    the request waits for it; the request's outcome (its exception raised)."""
    async with held(url, *statements) as hold:
        task = asyncio.create_task(request())  # type: ignore[arg-type]
        await blocked_or_done(url, task)
        await hold.tx.commit()
        return await asyncio.wait_for(task, 30)


def with_identity(postgres: PgServer, body: Callable[[Identity, str], Awaitable[None]]) -> None:
    url = postgres.create_database()

    async def main() -> None:
        identity = await Identity.open(identity_config(url))
        try:
            await body(identity, url)
        finally:
            await identity.close()

    run(main())


_DELETE_DOMAIN = "DELETE FROM domains WHERE id = $1"
_DELETE_USER = "DELETE FROM users WHERE id = $1"


# -- a create racing a delete: 404 (or a refused login), never 500 ---------------------------


def test_a_token_created_while_its_domain_is_deleted_is_not_found(postgres: PgServer) -> None:
    async def body(identity: Identity, url: str) -> None:
        env = await _setup(identity)
        with pytest.raises(NotFound):
            await race(
                url,
                [(_DELETE_DOMAIN, env["acme"].id)],
                lambda: identity.create_pat(env["member"], "acme", name="ci"),
            )

    with_identity(postgres, body)


@pytest.mark.parametrize(
    ("deleted", "statement"),
    [("user", _DELETE_USER), ("domain", _DELETE_DOMAIN)],
)
def test_a_member_added_while_the_user_or_domain_is_deleted_is_not_found(
    postgres: PgServer, deleted: str, statement: str
) -> None:
    async def body(identity: Identity, url: str) -> None:
        env = await _setup(identity)
        access = await identity.domain_access(env["owner"], "acme")
        target = env["stranger_id"] if deleted == "user" else env["acme"].id
        with pytest.raises(NotFound):
            await race(
                url,
                [(statement, target)],
                lambda: identity.set_member(
                    access, user_id=env["stranger_id"], role="member", platform_admin=False
                ),
            )

    with_identity(postgres, body)


def test_a_login_while_the_account_is_deleted_is_refused(postgres: PgServer) -> None:
    async def body(identity: Identity, url: str) -> None:
        env = await _setup(identity)
        with pytest.raises(Unauthorized) as refused:
            await race(
                url,
                [(_DELETE_USER, env["stranger_id"])],
                lambda: identity.login("stranger@example.com", PASSWORD),
            )
        assert refused.value.code == "invalid_credentials"

    with_identity(postgres, body)


def test_a_domain_created_for_an_owner_being_deleted_is_not_found(postgres: PgServer) -> None:
    """Not "this alias exists or existed": the alias is free, the owner is gone."""

    async def body(identity: Identity, url: str) -> None:
        env = await _setup(identity)
        with pytest.raises(NotFound) as missing:
            await race(
                url,
                [(_DELETE_USER, env["stranger_id"])],
                lambda: identity.create_domain(alias="fresh", name="", owner_id=env["stranger_id"]),
            )
        assert "user" in missing.value.message
        created = await identity.create_domain(alias="fresh", name="", owner_id=env["owner_id"])
        assert created.alias == "fresh"

    with_identity(postgres, body)


# -- a token created during its member's removal dies with the membership -------------------


def test_a_token_created_while_its_member_is_removed_is_refused(postgres: PgServer) -> None:
    """remove_member revokes the member's tokens under the domain's lock; a token whose
    creation waited on that lock must not land afterwards unrevoked (it would work again
    once the member is added back)."""

    async def body(identity: Identity, url: str) -> None:
        env = await _setup(identity)
        domain_id, user_id = env["acme"].id, env["member_id"]
        removal = [
            ("SELECT id FROM domains WHERE id = $1 FOR UPDATE", domain_id),
            ("DELETE FROM members WHERE domain_id = $1 AND user_id = $2", domain_id, user_id),
            (
                "UPDATE pats SET revoked_at = extract(epoch FROM now()) "
                "WHERE domain_id = $1 AND user_id = $2 AND revoked_at IS NULL",
                domain_id,
                user_id,
            ),
        ]
        with pytest.raises((NotFound, Forbidden)):
            await race(url, removal, lambda: identity.create_pat(env["member"], "acme"))
        access = await identity.domain_access(env["owner"], "acme")
        await identity.set_member(access, user_id=user_id, role="member", platform_admin=False)
        async with identity.db.read() as conn:
            alive = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(pats)
                    .where(pats.c.user_id == user_id, pats.c.revoked_at.is_(None))
                )
            ).scalar()
        assert alive == 0

    with_identity(postgres, body)


# -- a refresh during a password change or a disable -----------------------------------------


def test_a_refresh_during_a_password_change_does_not_deadlock(postgres: PgServer) -> None:
    """update_user locks the user, then revokes the sessions; a refresh that locked its
    session and then waited for the user deadlocked with it (500). Now the refresh locks only
    its refresh token: both go through, and the session stays revoked."""

    async def body(identity: Identity, url: str) -> None:
        await _setup(identity)
        pair = await identity.login("stranger@example.com", PASSWORD)
        user_id = (await identity.authenticate_principal(pair.access_token)).user.id
        async with held(url, ("SELECT id FROM users WHERE id = $1 FOR UPDATE", user_id)) as hold:
            refresh = asyncio.create_task(identity.refresh(pair.refresh_token))
            await blocked_or_done(url, refresh)
            revoke = asyncio.create_task(
                hold.run(
                    "UPDATE sessions SET revoked_at = extract(epoch FROM now()), "
                    "revoked_reason = 'password_changed' "
                    "WHERE user_id = $1 AND revoked_at IS NULL",
                    user_id,
                )
            )
            done, _ = await asyncio.wait({refresh, revoke}, timeout=30)
            assert revoke in done and revoke.exception() is None, revoke
            await hold.tx.commit()
            rotated = await asyncio.wait_for(refresh, 30)
        with pytest.raises(Unauthorized):  # the session was revoked after all
            await identity.refresh(rotated.refresh_token)

    with_identity(postgres, body)


def test_a_deadlock_is_an_outage_to_retry_not_a_server_error(postgres: PgServer) -> None:
    """PostgreSQL breaks a deadlock by rolling one transaction back (40P01); tried again it
    succeeds, so the caller answers 503 with Retry-After, not 500."""

    async def body(identity: Identity, url: str) -> None:
        await _setup(identity)
        first, second = sorted(str(r[0]) for r in await _fetch(url, "SELECT id FROM users LIMIT 2"))
        lock = "SELECT id FROM users WHERE id = $1 FOR UPDATE"
        async with held(url, (lock, first)) as hold:

            async def crossing() -> None:
                async with identity.db.write() as conn:
                    await conn.execute(
                        sa.text("SELECT id FROM users WHERE id = :id FOR UPDATE"), {"id": second}
                    )
                    await conn.execute(
                        sa.text("SELECT id FROM users WHERE id = :id FOR UPDATE"), {"id": first}
                    )

            task = asyncio.create_task(crossing())
            await blocked_or_done(url, task)
            with contextlib.suppress(asyncpg.DeadlockDetectedError):
                await hold.run(lock, second)
            outcome = await asyncio.gather(task, return_exceptions=True)
        failed = outcome[0]
        if failed is None:
            pytest.skip("the server rolled the held transaction back instead")
        assert isinstance(failed, Exception) and is_unavailable(failed), repr(failed)

    with_identity(postgres, body)


async def _fetch(url: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()
