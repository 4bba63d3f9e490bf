"""Rate limits shared by proxy replicas through PostgreSQL (``--rate-limits database``): the
buckets of ``proxy.db.ratelimits`` under the gateway's :class:`ReplicaRateLimiter`, then two
real ``cube-proxy`` processes over one database. Every test runs a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from proxy.db import LATEST, Database, migrate, schema
from proxy.db.ratelimits import DatabaseBuckets
from proxy.directory import DomainLimits
from proxy.gateway.errors import GatewayError
from proxy.gateway.ratelimit import LimitExceeded, LimitsUnavailable, ReplicaRateLimiter
from proxy.gateway.service import Gateway
from proxy.gateway.settings import GatewaySettings
from tests.proxy.conftest import PgServer, free_port, run
from tests.proxy.fakes import FakeDirectory
from tests.proxy.processes import ProxyProcess
from tests.proxy.test_ratelimit import caller
from tests.proxy.test_workers import _statuses

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_database(postgres: PgServer) -> str:
    return postgres.create_database()


class Replicas:
    """Two limiters, each over a database connection of its own: two proxy replicas."""

    def __init__(self, dbs: list[Database]) -> None:
        self.dbs = dbs
        self.limiters = [ReplicaRateLimiter(DatabaseBuckets(db)) for db in dbs]

    async def level(self, key: str) -> float | None:
        async with self.dbs[0].read() as conn:
            value = (
                await conn.execute(
                    sa.select(schema.rate_buckets.c.level).where(schema.rate_buckets.c.key == key)
                )
            ).scalar()
        return None if value is None else float(value)


def with_replicas(url: str, body: Callable[[Replicas], Awaitable[None]]) -> None:
    async def main() -> None:
        dbs = [Database.open(url, pool_size=4) for _ in range(2)]
        replicas = Replicas(dbs)
        try:
            await migrate(dbs[0])
            await body(replicas)
        finally:
            for limiter in replicas.limiters:
                await limiter.close()
            for db in dbs:
                await db.close()

    run(main())


async def _admitted(
    limiter: ReplicaRateLimiter, limits: DomainLimits, who: str = "pat-1", domain: str = "d1"
) -> bool:
    try:
        await limiter.admit(caller(token_id=who, domain=domain), limits)
    except LimitExceeded:
        return False
    return True


def test_replicas_enforce_each_limit_once_together(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        first, second = replicas.limiters
        limits = DomainLimits(token_requests_per_minute=6)
        started = time.monotonic()
        results = [await _admitted(limiter, limits) for limiter in (first, second) * 5]
        # The bucket refills at 6 a minute: at most one more over a slow run.
        extra = int((time.monotonic() - started) * 6 / 60)
        assert results.count(True) <= 6 + extra and results[:6] == [True] * 6
        with pytest.raises(LimitExceeded) as refused:
            await second.admit(caller(), limits)
        assert refused.value.which == "token_requests"
        assert 1 <= refused.value.retry_after <= 10
        # Another token has a bucket of its own.
        assert await _admitted(first, limits, who="pat-2")

    with_replicas(pg_database, body)


def test_concurrent_admissions_on_two_replicas_admit_the_limit(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        limits = DomainLimits(requests_per_minute=30)
        started = time.monotonic()
        results = await asyncio.gather(
            *(_admitted(replicas.limiters[i % 2], limits) for i in range(80))
        )
        extra = int((time.monotonic() - started) * 30 / 60) + 1
        assert 30 <= results.count(True) <= 30 + extra

    with_replicas(pg_database, body)


def test_a_refused_request_takes_nothing(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        limiter = replicas.limiters[0]
        limits = DomainLimits(requests_per_minute=3, token_requests_per_minute=60)
        assert [await _admitted(limiter, limits) for _ in range(5)] == [True] * 3 + [False] * 2
        with pytest.raises(LimitExceeded) as refused:
            await limiter.admit(caller(), limits)
        assert refused.value.which == "domain_requests"
        # The token's bucket gave 3 units and none to the 3 refused requests (refilling at 1 a
        # second meanwhile).
        level = await replicas.level("tr:token:pat-1")
        assert level is not None and 57 <= level < 58.5

    with_replicas(pg_database, body)


def test_tokens_charged_by_one_replica_hold_back_the_other(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        first, second = replicas.limiters
        limits = DomainLimits(tokens_per_minute=120)
        assert await _admitted(second, limits)
        first.charge(caller(), limits, 150)
        first.charge(caller(), limits, 30)  # summed with the first charge before it is written
        await first.flush()
        with pytest.raises(LimitExceeded) as refused:
            await second.admit(caller(), limits)
        # 60 tokens in debt, refilled at 2 a second: about 30 s.
        assert refused.value.which == "domain_tokens"
        assert 25 <= refused.value.retry_after <= 31

    with_replicas(pg_database, body)


def test_charges_are_written_in_the_background_and_at_close(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        limiter = ReplicaRateLimiter(DatabaseBuckets(replicas.dbs[0]), flush_interval=0.01)
        limiter.start()
        limits = DomainLimits(token_tokens_per_minute=1000)
        limiter.charge(caller(), limits, 400)
        for _ in range(200):
            if (level := await replicas.level("tt:token:pat-1")) is not None:
                break
            await asyncio.sleep(0.01)
        assert level is not None and 600 <= level < 620
        limiter.charge(caller(), limits, 100)
        await limiter.close()
        level = await replicas.level("tt:token:pat-1")
        assert level is not None and level < 530

    with_replicas(pg_database, body)


def test_refilled_buckets_are_pruned(pg_database: str) -> None:
    async def body(replicas: Replicas) -> None:
        limiter = replicas.limiters[0]
        assert await _admitted(limiter, DomainLimits(requests_per_minute=60_000), domain="fast")
        assert await _admitted(limiter, DomainLimits(requests_per_minute=5), domain="slow")
        await asyncio.sleep(0.05)  # the first refills its unit in 1 ms; the second takes 12 s
        assert await replicas.limiters[1].store.prune() == 1
        assert await replicas.level("dr:fast") is None
        assert await replicas.level("dr:slow") is not None

    with_replicas(pg_database, body)


def test_an_unreachable_database_refuses_the_request() -> None:
    async def body() -> None:
        db = Database.open(f"postgresql://cube:x@127.0.0.1:{free_port()}/none", pool_size=1)
        try:
            limiter = ReplicaRateLimiter(DatabaseBuckets(db))
            with pytest.raises(LimitsUnavailable):
                await limiter.admit(caller(), DomainLimits(requests_per_minute=10))
            # Unlimited callers never wait on the database.
            await limiter.admit(caller(), DomainLimits())
            # Through the gateway: a 503 that says why, never admitted.
            gateway = Gateway(
                FakeDirectory(), GatewaySettings(), replica_buckets=lambda: DatabaseBuckets(db)
            )
            await gateway.start()
            try:
                with pytest.raises(GatewayError) as refused:
                    await gateway.admit(caller(), DomainLimits(requests_per_minute=10))
                assert (refused.value.status, refused.value.code) == (503, "limits_unavailable")
                assert refused.value.headers == {"Retry-After": "1"}
            finally:
                await gateway.close()
        finally:
            await db.close()

    run(body())


def test_a_version_1_database_is_migrated_to_shared_buckets(pg_database: str) -> None:
    async def body() -> None:
        db = Database.open(pg_database, pool_size=2)
        try:
            await migrate(db)
            async with db.write() as conn:  # back to what migration 1 left before this schema
                await conn.execute(
                    sa.text("DROP FUNCTION cube_rate_admit(text[], bigint[], boolean[])")
                )
                await conn.execute(sa.text("DROP TABLE rate_buckets"))
                await conn.execute(sa.text("DROP TABLE login_attempts"))
                await conn.execute(
                    sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 2)
                )
            assert await migrate(db) == list(range(2, LATEST + 1))
            limiter = ReplicaRateLimiter(DatabaseBuckets(db))
            limits = DomainLimits(requests_per_minute=1)
            assert [await _admitted(limiter, limits) for _ in range(2)] == [True, False]
        finally:
            await db.close()

    run(body())


@pytest.mark.parametrize("mode", ["database", "local"])
def test_two_proxy_replicas_over_one_postgresql(
    mode: str, pg_database: str, tmp_path: Path
) -> None:
    """Two ``cube-proxy`` processes over one PostgreSQL database, a client alternating between
    them: with ``--rate-limits database`` the token gets its limit once; ``local`` (each
    replica its own buckets) shows what that prevents: the limit once per replica."""
    replicas = [
        ProxyProcess(pg_database, tmp_path / f"proxy{i}.log", extra={"rate-limits": mode})
        for i in range(2)
    ]
    with replicas[0], replicas[1]:
        admin = replicas[0].login()
        replicas[0].admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        replicas[0].admin(
            "PUT", "/admin/domains/acme/limits", {"token_requests_per_minute": 4}, token=admin
        )
        pat = replicas[0].admin(
            "POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin
        )
        statuses = [
            _statuses(replicas[i % 2], "/acme/v1/models", pat["token"], 1)[0] for i in range(12)
        ]
        # Admitted: 503 (the domain has no backend); refused: 429.
        admitted = 4 if mode == "database" else 8
        assert statuses.count(503) == admitted and statuses.count(429) == 12 - admitted
        for replica in replicas:
            assert replica.stop() == 0
