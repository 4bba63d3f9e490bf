"""Short-lived caches in front of the directory, so a request costs no database round trip.

Each answer is reused for ``ttl`` seconds; concurrent misses for one key share one load.
Authentication results are keyed by the SHA-256 of the credential (never the credential) and
the domain named; only successes are cached, so a revoked or expired credential is refused at
most ``auth_cache_seconds`` late, and a failing one is checked every time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from proxy.directory import BackendSpec, Caller, Directory, DomainLimits

__all__ = ["DirectoryCache", "TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MAX_ENTRIES = 50_000


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        if self.ttl <= 0:
            return await load()
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        else:
            if not future.done():
                future.set_result(value)
            if len(self._entries) >= _MAX_ENTRIES:
                self._prune(now)
            self._entries[key] = (self._clock() + self.ttl, value)
            return value
        finally:
            self._loading.pop(key, None)

    def invalidate(self, key: K | None = None) -> None:
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()


class DirectoryCache:
    """The directory's answers for the request path."""

    def __init__(
        self,
        directory: Directory,
        *,
        ttl: float,
        auth_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._auth: TtlCache[tuple[bytes, str | None], Caller] = TtlCache(auth_ttl, clock=clock)
        self._backends: TtlCache[str, list[BackendSpec]] = TtlCache(ttl, clock=clock)
        self._policy: TtlCache[str, bytes | None] = TtlCache(ttl, clock=clock)
        self._limits: TtlCache[str, DomainLimits] = TtlCache(ttl, clock=clock)

    async def authenticate(self, bearer: str, domain_alias: str | None) -> Caller:
        key = (hashlib.sha256(bearer.encode("utf-8", "surrogateescape")).digest(), domain_alias)
        return await self._auth.get(
            key, lambda: self.directory.authenticate(bearer, domain_alias=domain_alias)
        )

    async def backends(self, domain_id: str) -> list[BackendSpec]:
        return await self._backends.get(domain_id, lambda: self.directory.backends(domain_id))

    async def policy(self, domain_id: str) -> bytes | None:
        return await self._policy.get(domain_id, lambda: self.directory.policy(domain_id))

    async def limits(self, domain_id: str) -> DomainLimits:
        return await self._limits.get(domain_id, lambda: self.directory.limits(domain_id))

    def invalidate(self) -> None:
        for cache in (self._auth, self._backends, self._policy, self._limits):
            cache.invalidate()
