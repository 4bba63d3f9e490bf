"""The identity layer's per-process cache of authentications and domain data.

What the request path needs from it, measured (``scripts/bench-proxy``, py-spy): a plain TTL
cache makes every entry expire at once, and then every request in flight misses together and
runs its own SQL (4 queries for an authentication) on the database's single connection thread:
a stall of up to a second every ``ttl`` seconds at 64 clients. So:

- **one load per key**: concurrent misses share one load (a task: a caller that goes away does
  not cancel it for the others);
- **refresh ahead**: an entry past ``refresh_fraction`` of its life is still served while one
  background load replaces it; a background load that fails (a token revoked elsewhere) drops
  the entry, so the next request is checked afresh and refused;
- **explicit invalidation**: :meth:`LoadingCache.clear` forgets everything, and a load that
  began before a clear never stores its (possibly stale) answer;
- **across worker processes** (``cube-proxy --workers N``): a :class:`SharedGeneration` (8 bytes
  in a file every worker maps) is rewritten with a fresh random value on every clear; each
  lookup compares it with the value it last saw (one memory read) and clears its own entries
  when it changed. A change made through one worker is therefore seen by all the others at
  their next request, as within one process.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Final

__all__ = ["LoadingCache", "SharedGeneration"]

_SIZE: Final = 8
#: Loaders return the value and, optionally, a wall-clock time it must not outlive.
Loader = Callable[[], Awaitable[tuple[Any, float | None]]]


class SharedGeneration:
    """A change marker shared by the processes that map the same file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < _SIZE:
                raise ValueError(f"{path} is not a generation file")
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.path = Path(path)

    @staticmethod
    def create(path: str | os.PathLike[str]) -> SharedGeneration:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(_SIZE))
        finally:
            os.close(fd)
        return SharedGeneration(path)

    def read(self) -> bytes:
        return self._map[:_SIZE]

    def bump(self) -> None:
        # A fresh random value, not a counter: two workers bumping at once can never write
        # back a value another worker already saw.
        self._map[:_SIZE] = os.urandom(_SIZE)

    def close(self) -> None:
        self._map.close()


class LoadingCache:
    """Entries by key, each valid until ``ttl`` seconds (or its own expiry) have passed."""

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = 10_000,
        refresh_fraction: float = 0.75,
        shared: SharedGeneration | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.refresh_fraction = refresh_fraction
        self.shared = shared
        self._clock = clock
        # key -> (expires, refresh_at, value), monotonic times
        self._data: OrderedDict[Hashable, tuple[float, float, Any]] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Task[Any]] = {}
        self._generation = 0
        self._seen = shared.read() if shared is not None else b""

    def _sync(self) -> None:
        if self.shared is not None:
            current = self.shared.read()
            if current != self._seen:
                self._seen = current
                self._forget()

    def _forget(self) -> None:
        self._data.clear()
        # A load started before now may read what the clear was about (a revocation): later
        # lookups start their own instead of joining it.
        self._loading.clear()
        self._generation += 1

    def clear(self) -> None:
        """Forget everything, here and (through the shared generation) in every worker."""
        self._forget()
        if self.shared is not None:
            self.shared.bump()
            self._seen = self.shared.read()

    def get(self, key: Hashable) -> Any | None:
        """The value cached for ``key`` (no load), or None."""
        if self.ttl <= 0:
            return None
        self._sync()
        hit = self._data.get(key)
        if hit is None or hit[0] <= self._clock():
            return None
        return hit[2]

    def put(self, key: Hashable, value: Any, *, expires_at: float | None = None) -> None:
        self._store(key, value, expires_at, self._generation)

    def _store(self, key: Hashable, value: Any, expires_at: float | None, generation: int) -> None:
        if self.ttl <= 0 or generation != self._generation:
            return  # loaded before a clear: possibly stale
        ttl = self.ttl
        if expires_at is not None:
            ttl = min(ttl, expires_at - time.time())
        if ttl <= 0:
            return
        now = self._clock()
        self._data[key] = (now + ttl, now + ttl * self.refresh_fraction, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def load(self, key: Hashable, loader: Loader) -> Any:
        """The cached value, or the one ``loader`` gives (shared with concurrent callers)."""
        if self.ttl <= 0:
            value, _ = await loader()
            return value
        self._sync()
        hit = self._data.get(key)
        if hit is not None:
            now = self._clock()
            if hit[0] > now:
                if now >= hit[1] and key not in self._loading:
                    self._start(key, loader)  # refresh ahead; this caller is served now
                return hit[2]
        task = self._loading.get(key)
        if task is None:
            task = self._start(key, loader)
        return await asyncio.shield(task)

    def _start(self, key: Hashable, loader: Loader) -> asyncio.Task[Any]:
        generation = self._generation

        async def run() -> Any:
            try:
                value, expires_at = await loader()
            except BaseException:
                # Refused now (revoked, deleted) or failing: never keep serving the old answer.
                if generation == self._generation:
                    self._data.pop(key, None)
                raise
            self._store(key, value, expires_at, generation)
            return value

        task = asyncio.get_running_loop().create_task(run())
        self._loading[key] = task

        def done(finished: asyncio.Task[Any]) -> None:
            if self._loading.get(key) is finished:
                del self._loading[key]
            if not finished.cancelled():
                finished.exception()  # retrieved: the waiters (if any) re-raise it

        task.add_done_callback(done)
        return task
