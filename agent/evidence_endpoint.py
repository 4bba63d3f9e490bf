"""``GET /attestation?nonce=HEX``: the agent's ``cube-evidence/1`` document.

The nonce (hex of 32 to 64 bytes, hex digits only) comes from the client; the claims are rebuilt
for every request (fresh ``issued_at``) and bound into the TEE report and vTPM quote by
:class:`attestation.evidence.EvidenceCollector`. Collection is serialised (configfs-tsm and a
TPM session take one report at a time): requests wait on an asyncio lock, so waiting costs no
worker thread; busy devices are retried inside :class:`attestation.guest.ConfigfsTsm` and, if
still busy, answered 503 with ``Retry-After``. Rate limits (:class:`PeerRateLimit`): each
peer address (an IPv6 address by its /64) has its own token bucket
(``evidence_rate_per_second``/``evidence_burst``), so one caller looping on the route cannot
starve the verifiers; all peers together have a bucket :data:`GLOBAL_RATE_FACTOR` times larger,
so many addresses cannot keep the device busy without end. Beyond either: 429 with
``Retry-After``. No authentication: clients verify what they receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from agent.config import AgentConfig
from agent.identity import AgentIdentity
from agent.metrics import AgentMetrics
from agent.ops import json_error
from agent.rotation import KEY_ROTATION
from attestation.errors import AttestationError, DeviceBusyError, MalformedError
from attestation.evidence import NONCE_MAX_BYTES, EvidenceCollector, parse_nonce

__all__ = [
    "EVIDENCE",
    "GLOBAL_RATE_FACTOR",
    "EvidenceService",
    "PeerRateLimit",
    "TokenBucket",
    "setup",
]

log = logging.getLogger("cube.agent.evidence")

_BUSY_RETRY_AFTER = 1
#: How long a successful collection counts as "evidence obtainable" for /ready.
READY_WINDOW_SECONDS = 60.0
#: At most one trial collection for /ready per this many seconds.
TRIAL_INTERVAL_SECONDS = 5.0
#: The bucket all peers share is this many times the per-peer rate and burst.
GLOBAL_RATE_FACTOR = 4
#: Per-peer buckets kept (least recently used forgotten: such a peer starts with a full one).
MAX_PEERS = 4096


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. Not thread-safe (event loop)."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def take(self) -> float:
        """0.0 when a token was taken; otherwise the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def refund(self) -> None:
        """Give back a token just taken (another limit refused the request)."""
        self._tokens = min(self.burst, self._tokens + 1.0)


class EvidenceService:
    """Builds claims and collects evidence, one document at a time."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        identity: AgentIdentity,
        collector: EvidenceCollector,
        metrics: AgentMetrics,
        model_digest: str | None = None,
        tpm_ak_sha256: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.identity = identity
        self.collector = collector
        self.metrics = metrics
        self.model_digest = model_digest or config.model_digest
        self.tpm_ak_sha256 = tpm_ak_sha256
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = asyncio.Lock()
        self.last_success: float | None = None
        self.last_error: str | None = None
        self._last_trial: float | None = None
        self._trial: asyncio.Task[tuple[bool, str]] | None = None

    @property
    def platform(self) -> str:
        return self.collector.platform

    def claims(self, identity: AgentIdentity | None = None) -> bytes:
        """The claims naming ``identity``'s certificate (default: the current one) and the
        current HPKE key."""
        return (identity or self.identity).claims(
            self.config,
            model_digest=self.model_digest,
            tpm_ak_sha256=self.tpm_ak_sha256,
            hpke_public_key=self.identity.hpke_public_key,
            now=self._wall_clock(),
        )

    async def collect(self, nonce: bytes, identity: AgentIdentity | None = None) -> bytes:
        """One evidence document for ``nonce`` (serialised), naming ``identity``'s certificate
        (default: the current one). Records the outcome."""
        async with self._lock:
            try:
                document = await self.collector.acollect(nonce, self.claims(identity))
            except DeviceBusyError:
                self.metrics.evidence.labels(outcome="busy").inc()
                self.last_error = "the TEE device is busy"
                raise
            except Exception as exc:
                self.metrics.evidence.labels(outcome="error").inc()
                self.last_error = str(exc) if isinstance(exc, AttestationError) else "error"
                raise
            self.metrics.evidence.labels(outcome="ok").inc()
            self.last_success = self._clock()
            self.last_error = None
            return document

    def recently_ok(self, window: float = READY_WINDOW_SECONDS) -> bool:
        return self.last_success is not None and self._clock() - self.last_success <= window

    async def obtainable(self, window: float = READY_WINDOW_SECONDS) -> tuple[bool, str]:
        """For /ready: a recent success, or a trial collection with a random nonce."""
        if self.recently_ok(window):
            return True, f"{self.platform} evidence collected recently"
        trial = self._trial
        if trial is not None and not trial.done():
            # A trial is running (another poll started it): its outcome is this poll's too.
            # (shielded: one poll giving up does not cancel the others' trial)
            return await asyncio.shield(trial)
        now = self._clock()
        if self._last_trial is not None and now - self._last_trial < TRIAL_INTERVAL_SECONDS:
            # /ready is unauthenticated: a failing device is not asked again at every poll.
            return False, self.last_error or "evidence collection failed"
        self._last_trial = now
        self._trial = trial = asyncio.get_running_loop().create_task(
            self._try_collect(), name="ready-evidence-trial"
        )
        return await asyncio.shield(trial)

    async def _try_collect(self) -> tuple[bool, str]:
        try:
            await self.collect(secrets.token_bytes(32))
        except DeviceBusyError:
            return False, "the TEE device is busy"
        except AttestationError as exc:
            return False, f"evidence collection failed: {exc}"
        except Exception:
            log.exception("trial evidence collection failed")
            return False, "evidence collection failed"
        return True, f"{self.platform} evidence collected"


def peer_key(remote: str | None) -> str:
    """The rate-limit key of a peer address: an IPv6 address counts by its /64 (one host
    usually holds a whole /64), anything else as given."""
    if not remote:
        return ""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(remote)
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is not None:
                return str(mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)
    return remote


class PeerRateLimit:
    """A token bucket per peer address (at most ``max_peers`` remembered, least recently used
    forgotten) under one shared bucket ``factor`` times larger."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        factor: int = GLOBAL_RATE_FACTOR,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._clock = clock
        self.shared = TokenBucket(rate * factor, burst * factor, clock=clock)
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, remote: str | None) -> float:
        """0.0 when ``remote`` may collect now; otherwise the seconds to wait."""
        key = peer_key(remote)
        bucket = self._peers.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, clock=self._clock)
            self._peers[key] = bucket
            if len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(key)
        wait = bucket.take()
        if wait > 0:
            return wait  # (a peer over its own rate takes nothing from the others')
        wait = self.shared.take()
        if wait > 0:
            bucket.refund()
        return wait

    def __len__(self) -> int:
        return len(self._peers)


EVIDENCE = web.AppKey("evidence", EvidenceService)
RATE_LIMIT = web.AppKey("evidence_rate_limit", PeerRateLimit)


def _bad_nonce(metrics: AgentMetrics, message: str) -> web.Response:
    metrics.evidence.labels(outcome="bad_nonce").inc()
    return json_error(400, message, type_="invalid_request_error", code="invalid_nonce")


async def attestation(request: web.Request) -> web.Response:
    service = request.app[EVIDENCE]
    metrics = service.metrics
    values = request.query.getall("nonce", [])
    if len(values) != 1:
        return _bad_nonce(metrics, "give exactly one 'nonce' query parameter (hex, 32 to 64 bytes)")
    value = values[0]
    if len(value) > 2 * NONCE_MAX_BYTES:
        return _bad_nonce(metrics, "nonce: must be 32 to 64 bytes of hex")
    try:
        nonce = parse_nonce(value)
    except MalformedError as exc:
        return _bad_nonce(metrics, str(exc))
    wait = request.app[RATE_LIMIT].take(request.remote)
    if wait > 0:
        metrics.evidence.labels(outcome="rate_limited").inc()
        return json_error(
            429,
            "too many evidence requests; retry later",
            type_="rate_limit_error",
            code="rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    try:
        # The certificate this connection presented, even if the key rotated since.
        rotation = request.app.get(KEY_ROTATION)
        identity = rotation.for_connection(request.transport) if rotation is not None else None
        document = await service.collect(nonce, identity)
    except DeviceBusyError:
        return json_error(
            503,
            "the TEE is busy generating another report; retry shortly",
            type_="server_error",
            code="tee_busy",
            headers={"Retry-After": str(_BUSY_RETRY_AFTER)},
        )
    except AttestationError as exc:
        # The library's messages are public facts (devices, certificates), never secrets.
        log.error("evidence collection failed", extra={"fields": {"error": str(exc)}})  # noqa: TRY400
        return json_error(
            500, "evidence collection failed", type_="server_error", code="evidence_failed"
        )
    return web.Response(
        body=document,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def setup(app: web.Application, service: EvidenceService) -> None:
    """Serve ``GET /attestation`` from ``service``."""
    app[EVIDENCE] = service
    app[RATE_LIMIT] = PeerRateLimit(
        service.config.evidence_rate_per_second, service.config.evidence_burst
    )
    app.router.add_get("/attestation", attestation, name="attestation")
