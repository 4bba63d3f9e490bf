"""Replicas over one PostgreSQL tell each other about changes (``proxy.db.notify``): a token
revoked through one replica is refused by the others at once, not when their caches expire.
Two Identity layers over one real PostgreSQL database, each its own replica, with a cache TTL
of a minute (without the notices the second would accept the revoked token that long)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.db import notify
from proxy.directory import AuthError
from proxy.identity import Identity
from proxy.identity.models import Pat
from tests.proxy.conftest import PgServer, identity_config, run
from tests.proxy.processes import ProxyProcess
from tests.proxy.test_pats import _setup
from tests.proxy.test_replica_outages import FreezingRelay
from tests.proxy.test_workers import _statuses

pytestmark = pytest.mark.slow


async def _refused_within(identity: Identity, secret: str, seconds: float) -> float:
    """Seconds until ``identity`` refuses ``secret`` (AssertionError after ``seconds``)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            await identity.authenticate(secret, domain_alias="acme")
        except AuthError:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"still accepted after {seconds} s")


Replicas = tuple[Identity, Identity, dict[str, Any], Pat, str]


@contextlib.asynccontextmanager
async def two_replicas(url: str, second_url: str | None = None) -> AsyncIterator[Replicas]:
    """Two Identity layers over a new database (caches of a minute; the second reaching it
    at ``second_url`` if given); a domain and a PAT, made through the first and
    authenticated (so cached) by both."""
    first = await Identity.open(identity_config(url, auth_cache_seconds=60))
    second = await Identity.open(identity_config(second_url or url, auth_cache_seconds=60))
    try:
        env = await _setup(first)
        pat, secret = await first.create_pat(env["member"], "acme", name="ci")
        for identity in (first, second):
            assert (await identity.authenticate(secret, domain_alias="acme")).token_id
        yield first, second, env, pat, secret
    finally:
        await second.close()
        await first.close()


def test_a_token_revoked_through_one_replica_is_refused_by_the_other(postgres: PgServer) -> None:
    url = postgres.create_database()

    async def main() -> None:
        async with two_replicas(url) as (first, second, env, pat, secret):
            await first.revoke_pat(env["member"], pat.id)
            assert await _refused_within(second, secret, 5.0) < 5.0
            assert second._notices is not None and second._notices.received >= 1
            # A replica does not act on its own notices.
            assert first._notices is not None and first._notices.received == 0

    run(main())


def test_a_listener_that_lost_its_connection_reconnects_and_forgets(postgres: PgServer) -> None:
    url = postgres.create_database()

    async def main() -> None:
        async with two_replicas(url) as (first, second, env, pat, secret):
            notices = second._notices
            assert notices is not None and notices._conn is not None
            # The server ends the listening session (as a restart or a network cut would).
            await first.db.ping()
            async with first.db.write() as conn:
                await conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                    )
                )
            deadline = time.monotonic() + 10
            while notices._conn is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # A change made while it is away is not announced to it...
            await first.revoke_pat(env["member"], pat.id)
            # ...but it forgets its cache once it is back, so the token is refused.
            assert await _refused_within(second, secret, 10.0) < 10.0

    run(main())


def test_a_listener_that_stopped_answering_is_noticed_and_reconnects(
    postgres: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listening connection that dies without a word (its packets acknowledged, never
    answered, nothing closed: a frozen server, a cut that sends no reset) is found out by
    the listener's ping, dropped and replaced; the replica forgets its cache once back, so
    a token revoked meanwhile is refused in seconds, not when the cache expires."""
    monkeypatch.setattr(notify, "PING_INTERVAL_SECONDS", 0.5)
    monkeypatch.setattr(notify, "PING_TIMEOUT_SECONDS", 1.0)
    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]

    async def main() -> None:
        with FreezingRelay(postgres.port) as relay:
            async with two_replicas(url, relay.url(postgres, name)) as replicas:
                first, second, env, pat, secret = replicas
                assert relay.freeze(listening=True) == 1
                try:
                    await first.revoke_pat(env["member"], pat.id)
                    assert await _refused_within(second, secret, 10.0) < 10.0
                finally:
                    relay.cut()

    run(main())


def test_a_notice_the_listening_connection_cannot_send_goes_another_way(
    postgres: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notice that times out on the listening connection is sent through the database's
    pooled connections instead (the change is committed: the others must hear of it), and
    the silent listening connection is replaced."""
    monkeypatch.setattr(notify, "PING_INTERVAL_SECONDS", 1000.0)  # no ping: the send finds out
    monkeypatch.setattr(notify, "SEND_TIMEOUT_SECONDS", 1.0)
    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]

    async def main() -> None:
        with FreezingRelay(postgres.port) as relay:
            async with two_replicas(url, relay.url(postgres, name)) as replicas:
                first, second, env, pat, secret = replicas
                notices = second._notices
                assert notices is not None
                frozen = notices._conn
                assert relay.freeze(listening=True) == 1
                try:
                    await second.revoke_pat(env["member"], pat.id)
                    assert await _refused_within(first, secret, 10.0) < 10.0
                    deadline = time.monotonic() + 10
                    while notices._conn in (None, frozen) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert notices._conn not in (None, frozen)
                finally:
                    relay.cut()

    run(main())


def test_two_proxy_processes_share_revocations(postgres: PgServer, tmp_path: Path) -> None:
    url = postgres.create_database()
    extra = {"identity-cache-seconds": "60"}
    replicas = [ProxyProcess(url, tmp_path / f"proxy{i}.log", extra=extra) for i in range(2)]
    with replicas[0], replicas[1]:
        admin = replicas[0].login()
        replicas[0].admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        pat = replicas[0].admin(
            "POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin
        )
        # Authenticated by both (the domain has no backend: 503), and cached for a minute.
        for replica in replicas:
            assert _statuses(replica, "/acme/v1/models", pat["token"], 2) == [503, 503]
        replicas[0].admin("DELETE", f"/admin/tokens/{pat['id']}", token=admin)
        deadline = time.monotonic() + 5
        while _statuses(replicas[1], "/acme/v1/models", pat["token"], 1) != [401]:
            assert time.monotonic() < deadline, "the other replica still accepts the token"
            time.sleep(0.05)
        for replica in replicas:
            assert replica.stop() == 0
