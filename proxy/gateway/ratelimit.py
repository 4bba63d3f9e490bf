"""Per-domain and per-token limits: requests and tokens per minute.

Each limit is a bucket holding at most ``limit`` units that refills at ``limit / 60`` per second.
A request takes one unit from each request bucket it falls under; tokens are only known after
the backend answered, so a token bucket is *charged* afterwards and may go negative, and a
request is admitted only while no token bucket it falls under is negative. A refusal says
when to retry (``Retry-After``, whole seconds, at least 1).

Where the buckets live:

- :class:`LocalBuckets`: in this process (``cube-proxy --workers 1``, tests);
- :class:`SharedBuckets`: in a file every worker of ``cube-proxy --workers N`` maps, so the
  workers together enforce each limit exactly once, whichever worker a connection reaches (the
  kernel spreads *connections*, so per-worker shares would give one kept-alive client a
  fraction of its limit). An admission or a charge reads and updates its buckets under one
  ``flock`` of that file: microseconds, never a wait on I/O.

- :class:`ReplicaRateLimiter`: in the database that proxy replicas (hosts) share
  (``--rate-limits database``, PostgreSQL; :mod:`proxy.db.ratelimits`), so the replicas
  together enforce each limit once; one round trip per admission of a limited caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from cube._tasks import cancel_and_wait
from proxy.directory import Caller, DomainLimits

__all__ = [
    "Bucket",
    "BucketStore",
    "LimitCheck",
    "LimitExceeded",
    "LimitsUnavailable",
    "LocalBuckets",
    "RateLimiter",
    "RemoteBuckets",
    "ReplicaRateLimiter",
    "SharedBuckets",
    "limit_checks",
    "token_key",
]


class Bucket:
    """``limit`` units per minute, at most ``limit`` saved up (may go negative when charged)."""

    __slots__ = ("level", "limit", "rate", "slot", "updated")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.level = float(limit)
        self.updated = now
        self.slot = -1  # its place in a SharedBuckets file (-1: none)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(float(self.limit), self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, units: float) -> float:
        """Seconds until ``units`` are available (0 if they are)."""
        if self.level >= units:
            return 0.0
        return (units - self.level) / self.rate

    def resize(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.rate = limit / 60.0
            self.level = min(self.level, float(limit))

    def full(self, now: float) -> bool:
        """Refilled to its limit: the same as no bucket at all (so it may be forgotten)."""
        return self.level + max(0.0, now - self.updated) * self.rate >= self.limit


@dataclass  # not frozen: raising sets __traceback__ (e.g. through a context manager)
class LimitExceeded(Exception):
    """Which limit refused the request and when to retry."""

    which: str  # "domain_requests", "token_requests", "domain_tokens", "token_tokens"
    retry_after: int

    def __str__(self) -> str:
        return f"{self.which} limit reached; retry in {self.retry_after} s"


class BucketStore(Protocol):
    """Where a :class:`RateLimiter` keeps its buckets."""

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold while reading and updating buckets (one admission or charge)."""

    def get(self, key: Hashable, limit: int, now: float) -> Bucket:
        """The bucket of ``key``, sized to ``limit`` and refilled to ``now`` (new: full)."""

    def put(self, bucket: Bucket) -> None:
        """Store ``bucket`` after changing its level."""


class LocalBuckets:
    """Buckets in this process; not thread-safe (one event loop)."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self.max_buckets = max_buckets
        self._buckets: dict[Hashable, Bucket] = {}

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def get(self, key: Hashable, limit: int, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._prune(now)
            bucket = self._buckets[key] = Bucket(limit, now)
        else:
            bucket.resize(limit)
            bucket.refill(now)
        return bucket

    def put(self, bucket: Bucket) -> None:
        pass  # the bucket is the stored one

    def _prune(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.full(now):
                del self._buckets[key]


#: A slot: key digest (16 bytes; all zero = free), limit, level, last update (monotonic).
_SLOT: Final = struct.Struct("<16sqdd")
_VALUES: Final = struct.Struct("<qdd")
_FREE: Final = bytes(16)
#: Slots probed from a key's home slot before one is reused.
_PROBE: Final = 64
#: 2.5 MiB. A token with limits set takes up to two slots (requests, tokens), a domain two.
SHARED_SLOTS: Final = 65_536


class SharedBuckets:
    """Buckets in a file that the worker processes of one proxy map (an open-addressing table
    keyed by a digest of the bucket's key).

    A bucket refilled to its limit is the same as no bucket, so its slot may be taken by
    another key. Only when all :data:`_PROBE` slots from a key's home slot hold other buckets
    still refilling (tens of thousands of limited tokens active within a minute) is the one
    closest to full taken over: that key's debt is forgiven, which errs on admitting."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        self.slots = size // _SLOT.size
        if self.slots < _PROBE or size % _SLOT.size:
            os.close(self._fd)
            raise ValueError(f"{os.fspath(path)} is not a rate-limit file")
        self._map = mmap.mmap(self._fd, size)
        self._digests: dict[Hashable, bytes] = {}
        #: Slots handed out under the current lock: not to be taken over by another key (a
        #: new bucket is full until the request is taken from it).
        self._claimed: set[int] = set()

    @staticmethod
    def create(path: str | os.PathLike[str], slots: int = SHARED_SLOTS) -> None:
        """A new file of ``slots`` free slots (0600)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * _SLOT.size)
        finally:
            os.close(fd)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self  # (a class-based context manager: a generator one costs more per use)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._claimed.clear()

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _digest(self, key: Hashable) -> bytes:
        digest = self._digests.get(key)
        if digest is None:
            digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
            if digest == _FREE:
                digest = b"\x01" + digest[1:]
            if len(self._digests) >= 100_000:
                self._digests.clear()
            self._digests[key] = digest
        return digest

    def get(self, key: Hashable, limit: int, now: float) -> Bucket:
        digest = self._digest(key)
        home = int.from_bytes(digest[:8], "little") % self.slots
        reuse = -1
        reuse_fill = -1.0
        for i in range(_PROBE):
            slot = (home + i) % self.slots
            found, slot_limit, level, updated = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if found == digest:
                bucket = Bucket(slot_limit, updated)
                bucket.level = level
                bucket.resize(limit)
                bucket.refill(now)
                bucket.slot = slot
                self._claimed.add(slot)
                return bucket
            if slot in self._claimed:
                continue
            if found == _FREE:
                if reuse_fill < 2.0:
                    reuse, reuse_fill = slot, 2.0
                break  # a key is never stored past a free slot
            # How full the bucket would be now; at 1 or more it is as good as absent.
            fill = (level + max(0.0, now - updated) * slot_limit / 60.0) / max(1, slot_limit)
            if fill >= 1.0:
                fill = 1.5
            if fill > reuse_fill:
                reuse, reuse_fill = slot, fill
        if reuse < 0:
            raise RuntimeError("no rate-limit slot could be claimed")  # > _PROBE keys at once
        bucket = Bucket(limit, now)
        bucket.slot = reuse
        self._claimed.add(reuse)
        _SLOT.pack_into(self._map, reuse * _SLOT.size, digest, limit, bucket.level, now)
        return bucket

    def put(self, bucket: Bucket) -> None:
        _VALUES.pack_into(
            self._map, bucket.slot * _SLOT.size + 16, bucket.limit, bucket.level, bucket.updated
        )

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


LimitCheck = tuple[str, str, int, bool]
"""Which limit (``LimitExceeded.which``), its bucket's key, its limit, and whether a request
takes a unit from it (a request bucket) or only needs a balance that is not negative."""


def token_key(caller: Caller) -> str:
    # A PAT is limited on its own; a session token by its user (in that domain).
    if caller.token_id is not None:
        return f"token:{caller.token_id}"
    return f"user:{caller.domain_id}/{caller.user_id}"


def limit_checks(
    caller: Caller, limits: DomainLimits, *, admitting: bool = True
) -> list[LimitCheck]:
    """The buckets a request of ``caller`` falls under. Admitting, a limit of 0 refuses at
    once (:class:`LimitExceeded`); charging, it is skipped."""
    checks: list[LimitCheck] = []
    if limits.requests_per_minute is not None:
        checks.append(
            ("domain_requests", f"dr:{caller.domain_id}", limits.requests_per_minute, True)
        )
    if limits.token_requests_per_minute is not None:
        checks.append(
            ("token_requests", f"tr:{token_key(caller)}", limits.token_requests_per_minute, True)
        )
    if limits.tokens_per_minute is not None:
        checks.append(("domain_tokens", f"dt:{caller.domain_id}", limits.tokens_per_minute, False))
    if limits.token_tokens_per_minute is not None:
        checks.append(
            ("token_tokens", f"tt:{token_key(caller)}", limits.token_tokens_per_minute, False)
        )
    if any(c[2] <= 0 for c in checks):
        if admitting:
            raise LimitExceeded(next(c[0] for c in checks if c[2] <= 0), 60)
        checks = [c for c in checks if c[2] > 0]
    return checks


class RateLimiter:
    """Admits requests and charges tokens against the buckets in ``store``."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, store: BucketStore | None = None
    ) -> None:
        self._clock = clock
        self.store: BucketStore = store if store is not None else LocalBuckets()

    def admit(self, caller: Caller, limits: DomainLimits) -> None:
        """Take one request from every request bucket, or raise :class:`LimitExceeded`
        (taking nothing) if any bucket is empty."""
        checks = limit_checks(caller, limits)
        if not checks:
            return
        store = self.store
        with store.locked():
            now = self._clock()
            taken: list[Bucket] = []
            worst: tuple[float, str] | None = None
            for which, key, limit, is_request in checks:
                bucket = store.get(key, limit, now)
                # Requests need a whole unit; tokens a balance that is not negative.
                wait = bucket.wait_for(1.0) if is_request else bucket.wait_for(0.0)
                if wait > 0 and (worst is None or wait > worst[0]):
                    worst = (wait, which)
                if is_request:
                    taken.append(bucket)
            if worst is not None:
                raise LimitExceeded(worst[1], max(1, math.ceil(worst[0])))
            for bucket in taken:
                bucket.level -= 1.0
                store.put(bucket)

    def charge(self, caller: Caller, limits: DomainLimits, tokens: int) -> None:
        """Charge the tokens a request used to the token buckets."""
        if tokens <= 0:
            return
        checks = [c for c in limit_checks(caller, limits, admitting=False) if not c[3]]
        if not checks:
            return
        store = self.store
        with store.locked():
            now = self._clock()
            for _, key, limit, _ in checks:
                bucket = store.get(key, limit, now)
                bucket.level -= tokens
                store.put(bucket)


class RemoteBuckets(Protocol):
    """Buckets every proxy replica shares (:class:`proxy.db.ratelimits.DatabaseBuckets`)."""

    async def admit(
        self, keys: Sequence[str], limits: Sequence[int], requests: Sequence[bool]
    ) -> tuple[int, float] | None:
        """Take a unit from every request bucket, or nothing: then (index of the check that
        refused, seconds until it admits)."""

    async def charge(self, charges: Sequence[tuple[str, int, int]]) -> None:
        """Charge ``(key, limit, tokens)``, each key once."""

    async def prune(self) -> int:
        """Forget the buckets that have refilled."""

    async def close(self) -> None:
        """Release the store's connections."""


class LimitsUnavailable(Exception):
    """The shared buckets could not be reached: the request is refused (fail closed)."""


class ReplicaRateLimiter:
    """The limits of :class:`RateLimiter`, enforced once across proxy replicas by buckets they
    share (``cube-proxy --rate-limits database``): an admission is one round trip to the
    store; charges are summed here and written every ``flush_interval``."""

    def __init__(
        self,
        store: RemoteBuckets,
        *,
        flush_interval: float = 0.05,
        prune_interval: float = 60.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.prune_interval = prune_interval
        self._log = log or logging.getLogger("cube.proxy.ratelimit")
        self._pending: dict[str, list[int]] = {}  # key -> [limit, tokens]
        self._task: asyncio.Task[None] | None = None

    async def admit(self, caller: Caller, limits: DomainLimits) -> None:
        """As :meth:`RateLimiter.admit`; :class:`LimitsUnavailable` when the store fails."""
        checks = limit_checks(caller, limits)
        if not checks:
            return
        try:
            refused = await self.store.admit(
                [c[1] for c in checks], [c[2] for c in checks], [c[3] for c in checks]
            )
        except Exception as exc:  # the driver's errors: connection, timeout, server
            raise LimitsUnavailable(type(exc).__name__) from None
        if refused is not None:
            index, wait = refused
            raise LimitExceeded(checks[index][0], max(1, math.ceil(wait)))

    def charge(self, caller: Caller, limits: DomainLimits, tokens: int) -> None:
        if tokens <= 0:
            return
        for _, key, limit, is_request in limit_checks(caller, limits, admitting=False):
            if not is_request:
                entry = self._pending.setdefault(key, [limit, 0])
                entry[0] = limit
                entry[1] += tokens

    async def flush(self) -> None:
        """Write the charges summed since the last flush (kept for the next one on failure)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await self.store.charge([(k, v[0], v[1]) for k, v in sorted(pending.items())])
        except Exception as exc:
            self._log.warning("could not write rate-limit charges: %s", type(exc).__name__)
            for key, (limit, tokens) in pending.items():
                entry = self._pending.setdefault(key, [limit, 0])
                entry[1] += tokens

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rate-limit-flush")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.flush()
        await self.store.close()

    async def _run(self) -> None:
        next_prune = time.monotonic() + self.prune_interval
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval
                try:
                    await self.store.prune()
                except Exception as exc:
                    self._log.warning("could not prune rate-limit buckets: %s", type(exc).__name__)
