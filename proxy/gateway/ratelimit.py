"""Per-domain and per-token limits: requests and tokens per minute.

Each limit is a bucket holding at most ``limit`` units that refills at ``limit / 60`` per second.
A request takes one unit from each request bucket it falls under; tokens are only known after
the backend answered, so a token bucket is *charged* afterwards and may go negative, and a
request is admitted only while no token bucket it falls under is negative. A refusal says
when to retry (``Retry-After``, whole seconds, at least 1).

Limits live in this process. ``cube-proxy --workers N`` runs N processes on one port; each
enforces ``ceil(limit / N)`` (``share``), so together they admit about the limit. The kernel
spreads *connections* over the workers, so one client on one kept-alive connection meets only
its worker's share. Separate proxy replicas (hosts) each enforce the whole limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from proxy.directory import Caller, DomainLimits

__all__ = ["Bucket", "LimitExceeded", "RateLimiter"]


class Bucket:
    """``limit`` units per minute, at most ``limit`` saved up (may go negative when charged)."""

    __slots__ = ("level", "limit", "rate", "updated")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.level = float(limit)
        self.updated = now

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


@dataclass(frozen=True)
class LimitExceeded(Exception):
    """Which limit refused the request and when to retry."""

    which: str  # "domain_requests", "token_requests", "domain_tokens", "token_tokens"
    retry_after: int

    def __str__(self) -> str:
        return f"{self.which} limit reached; retry in {self.retry_after} s"


_MAX_BUCKETS = 100_000


def _part(limit: int, share: int) -> int:
    """This worker's part of ``limit`` (0 stays 0: refuse all)."""
    return limit if share == 1 or limit <= 0 else -(-limit // share)


class RateLimiter:
    """Buckets by key; not thread-safe (one event loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, share: int = 1) -> None:
        self._clock = clock
        self.share = max(1, share)
        self._buckets: dict[Hashable, Bucket] = {}

    @staticmethod
    def token_key(caller: Caller) -> tuple[str, str]:
        # A PAT is limited on its own; a session token by its user (in that domain).
        if caller.token_id is not None:
            return ("token", caller.token_id)
        return ("user", f"{caller.domain_id}/{caller.user_id}")

    def _bucket(self, key: Hashable, limit: int, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[key] = Bucket(limit, now)
        else:
            bucket.resize(limit)
            bucket.refill(now)
        return bucket

    def _prune(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.level >= bucket.limit:
                del self._buckets[key]

    def _limits(
        self, caller: Caller, limits: DomainLimits
    ) -> Iterable[tuple[str, Hashable, int, bool]]:
        tk = self.token_key(caller)
        n = self.share
        if limits.requests_per_minute is not None:
            yield (
                "domain_requests",
                ("dr", caller.domain_id),
                _part(limits.requests_per_minute, n),
                True,
            )
        if limits.token_requests_per_minute is not None:
            yield "token_requests", ("tr", *tk), _part(limits.token_requests_per_minute, n), True
        if limits.tokens_per_minute is not None:
            yield (
                "domain_tokens",
                ("dt", caller.domain_id),
                _part(limits.tokens_per_minute, n),
                False,
            )
        if limits.token_tokens_per_minute is not None:
            yield "token_tokens", ("tt", *tk), _part(limits.token_tokens_per_minute, n), False

    def admit(self, caller: Caller, limits: DomainLimits) -> None:
        """Take one request from every request bucket, or raise :class:`LimitExceeded`
        (taking nothing) if any bucket is empty."""
        now = self._clock()
        taken: list[Bucket] = []
        worst: tuple[float, str] | None = None
        for which, key, limit, is_request in self._limits(caller, limits):
            if limit <= 0:
                raise LimitExceeded(which, 60)
            bucket = self._bucket(key, limit, now)
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

    def charge(self, caller: Caller, limits: DomainLimits, tokens: int) -> None:
        """Charge the tokens a request used to the token buckets."""
        if tokens <= 0:
            return
        now = self._clock()
        for _, key, limit, is_request in self._limits(caller, limits):
            if not is_request and limit > 0:
                self._bucket(key, limit, now).level -= tokens
