"""The gateway's state: directory cache, agents, attestation gate, limits, audit writer, the
pinned client session to agents, the forwarded-token cache, and the health checker.

One :class:`Gateway` per application, created by :func:`proxy.gateway.setup` and owned by the
application's ``cleanup_ctx`` (sessions and background tasks start with it and stop with it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from aiohttp import web

from attestation.errors import AttestationError
from cube._tasks import cancel_and_wait
from proxy.directory import AuditRecord, Caller, Directory, DomainLimits, TokenSigner
from proxy.gateway.agents import Agent, AgentFailure, AgentPool
from proxy.gateway.attest import AttestationGate, LoadedPolicy, load_policy_bytes
from proxy.gateway.cache import DirectoryCache
from proxy.gateway.errors import GatewayError
from proxy.gateway.metering import AuditWriter
from proxy.gateway.metrics import GatewayMetrics
from proxy.gateway.ratelimit import (
    LimitsUnavailable,
    RateLimiter,
    RemoteBuckets,
    ReplicaRateLimiter,
    SharedBuckets,
)
from proxy.gateway.settings import GatewaySettings
from proxy.gateway.upstream import CertificateMismatch, UpstreamError, UpstreamPool

__all__ = ["GATEWAY", "Gateway"]

log = logging.getLogger("cube.proxy.gateway")

_HEALTH_TIMEOUT = 3.0
_HEALTH_BODY_LIMIT = 64 * 1024


class Gateway:
    def __init__(
        self,
        directory: Directory,
        settings: GatewaySettings | None = None,
        *,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        replica_buckets: Callable[[], RemoteBuckets | None] | None = None,
    ) -> None:
        """``replica_buckets``, called at start, gives the buckets that proxy replicas share
        (None: the limits are kept on this host, by :attr:`limiter`)."""
        self.directory = directory
        self.settings = (settings or GatewaySettings()).validate()
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._clock = clock
        self.cache = DirectoryCache(
            directory,
            ttl=self.settings.directory_cache_seconds,
            auth_ttl=self.settings.auth_cache_seconds,
            clock=clock,
        )
        self.pool = AgentPool(clock=clock)
        self.writer = AuditWriter(
            directory,
            self.metrics,
            flush_interval=self.settings.audit_flush_interval,
            max_queue=self.settings.audit_queue_size,
        )
        self.gate = AttestationGate(
            self.settings, self.metrics, on_failure=self._attestation_failed, clock=clock
        )
        # The shared file stays mapped for the life of the process (a request finishing
        # during shutdown still charges its tokens).
        shared = self.settings.shared_limits_file
        self.limiter = RateLimiter(
            clock=clock, store=SharedBuckets(shared) if shared is not None else None
        )
        self._replica_buckets = replica_buckets
        self.replica_limiter: ReplicaRateLimiter | None = None
        self._policies: dict[bytes, LoadedPolicy] = {}
        self._tokens: dict[tuple[Caller, str | None], tuple[float, str]] = {}
        self.upstream = UpstreamPool(
            connect_timeout=self.settings.agent_connect_timeout,
            keepalive=self.settings.agent_keepalive,
        )
        self._health_task: asyncio.Task[None] | None = None
        #: Shutdown has begun: answers still in progress are being drained, then cut (their
        #: audit rows say so rather than blaming the client).
        self.stopping = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.gate.start()
        self.writer.start()
        store = self._replica_buckets() if self._replica_buckets is not None else None
        if store is not None:
            self.replica_limiter = ReplicaRateLimiter(
                store, flush_interval=self.settings.audit_flush_interval
            )
            self.replica_limiter.start()
        self._health_task = asyncio.get_running_loop().create_task(
            self._health_loop(), name="agent-health"
        )

    async def close(self) -> None:
        await cancel_and_wait(self._health_task)
        self._health_task = None
        for agent in self.pool.all():
            if agent.verifying is not None:
                agent.verifying.cancel()
        await self.writer.close()
        if self.replica_limiter is not None:
            await self.replica_limiter.close()
        await self.gate.close()
        await self.upstream.close()

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        async def stopping(app: web.Application) -> None:
            del app
            self.stopping = True

        # (EdgeSite.stop sets it earlier still, before draining its connections.)
        app.on_shutdown.append(stopping)
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # -- rate limits --------------------------------------------------------------------------

    async def admit(self, caller: Caller, limits: DomainLimits) -> None:
        """Raise :class:`LimitExceeded` when a limit refuses the request, or 503 when the
        buckets the replicas share cannot be reached (fail closed)."""
        if self.replica_limiter is None:
            self.limiter.admit(caller, limits)
            return
        try:
            await self.replica_limiter.admit(caller, limits)
        except LimitsUnavailable as exc:
            log.warning("rate limits unavailable: %s", exc)
            raise GatewayError(
                503,
                "the rate limits shared by the proxy replicas cannot be checked; retry later",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    def charge(self, caller: Caller, limits: DomainLimits, tokens: int) -> None:
        if self.replica_limiter is None:
            self.limiter.charge(caller, limits, tokens)
        else:
            self.replica_limiter.charge(caller, limits, tokens)

    # -- directory-backed lookups -------------------------------------------------------------

    async def load_policy(self, domain_id: str) -> LoadedPolicy:
        data = await self.cache.policy(domain_id)
        if data is None:
            raise GatewayError(
                503,
                "this domain has no attestation policy: nothing can be verified, so nothing is "
                "forwarded (a domain admin sets one)",
                code="no_policy",
            )
        digest = hashlib.sha256(data).digest()
        loaded = self._policies.get(digest)
        if loaded is None:
            try:
                loaded = load_policy_bytes(data)
            except AttestationError as exc:
                raise GatewayError(
                    503, f"this domain's attestation policy is invalid: {exc}", code="bad_policy"
                ) from None
            if len(self._policies) > 1000:
                self._policies.clear()
            self._policies[digest] = loaded
        return loaded

    async def agents(self, domain_id: str) -> list[Agent]:
        return self.pool.agents(domain_id, await self.cache.backends(domain_id))

    def backend_status(self, domain_id: str, backend_id: str) -> dict[str, object] | None:
        """This process's view of one backend (see :meth:`Agent.status`); None when it has
        not met it yet (no request, no discovery)."""
        for agent in self.pool.all():
            if agent.domain_id == domain_id and agent.id == backend_id:
                return agent.status(self._clock(), datetime.now(UTC))
        return None

    def now(self) -> float:
        """The gateway's clock (monotonic seconds): what agents' retry and expiry times use."""
        return self._clock()

    def signer(self) -> TokenSigner:
        return self.directory.issuer()

    def forward_token(self, caller: Caller, model: str | None) -> str:
        """The JWT forwarded to the agent for ``caller`` (and ``model``), reused for a while."""
        key = (caller, model)
        now = self._clock()
        cached = self._tokens.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        token = self.signer().sign_forward(
            caller,
            models=(model,) if model is not None else None,
            ttl_seconds=self.settings.forward_token_ttl,
        )
        if len(self._tokens) > 10_000:
            self._tokens = {k: v for k, v in self._tokens.items() if v[0] > now}
        self._tokens[key] = (now + self.settings.forward_token_reuse, token)
        return token

    # -- events ---------------------------------------------------------------------------

    def _attestation_failed(self, agent: Agent, failure: AgentFailure) -> None:
        self.writer.audit(
            AuditRecord(
                domain_id=agent.domain_id,
                user_id=None,
                route="attestation",
                status=503,
                when=datetime.now(UTC),
                backend_id=agent.id,
                event="attestation_failed",
                detail=failure.message[:1000],
                extra={"code": failure.code},
            )
        )

    # -- health -------------------------------------------------------------------------------

    async def check_agent(self, agent: Agent) -> None:
        """One health check: a verified agent's /health over its pinned connection; an agent
        refused earlier is re-verified once its retry time has come; evidence about to
        expire is refreshed."""
        now = self._clock()
        trust = agent.trust
        if trust is None or now >= trust.expires_at:
            # Never verified, expired, or refused and due for a retry: verify (not before).
            if (agent.failure is None or now >= agent.retry_at) and agent.verifying is None:
                await self._reverify(agent)
            return
        if now >= trust.refresh_at and agent.verifying is None:
            await self._reverify(agent)
            return
        response = None
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                response = await self.upstream.request(
                    agent.base_url, trust.cert_sha256, method="GET", target="/health"
                )
                await response.read(_HEALTH_BODY_LIMIT)
                healthy = response.status == 200
        except CertificateMismatch:
            self.gate.certificate_changed(agent, trust)
            await self._reverify(agent)
            return
        except (UpstreamError, TimeoutError) as exc:
            agent.mark_down(
                f"health check failed ({type(exc).__name__})", self.settings.down_seconds
            )
            self.metrics.agent_errors.labels(kind="health").inc()
            return
        finally:
            if response is not None:
                if response.done:
                    response.release()
                else:
                    response.close()
        if healthy:
            agent.mark_up()
        else:
            agent.mark_down("health check answered an error", self.settings.down_seconds)

    async def _reverify(self, agent: Agent) -> None:
        try:
            policy = await self.load_policy(agent.domain_id)
            agent.retry_at = 0.0  # due: let the gate try again
            await self.gate.trust(agent, policy)
        except (AgentFailure, GatewayError):
            pass  # recorded on the agent (and audited) by the gate
        except Exception:
            log.exception(
                "health re-verification failed", extra={"fields": {"backend_id": agent.id}}
            )

    async def discover(self) -> None:
        """Verify, in parallel, every enabled agent of every domain that has not been tried
        yet (see ``GatewaySettings.discover_agents``); failures are recorded on the agent and
        audited by the gate, as for a request."""
        fresh: list[Agent] = []
        for domain_id in await self.directory.backend_domains():
            for agent in await self.agents(domain_id):
                if (
                    agent.spec.enabled
                    and agent.trust is None
                    and agent.failure is None
                    and agent.verifying is None
                ):
                    fresh.append(agent)
        if fresh:
            await asyncio.gather(*(self._reverify(a) for a in fresh))

    async def _discover_safely(self) -> None:
        if not self.settings.discover_agents:
            return
        try:
            await self.discover()
        except Exception as exc:  # the directory is unreachable: requests will tell
            log.warning("agent discovery failed: %s", type(exc).__name__)

    async def _health_loop(self) -> None:
        await self._discover_safely()
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self._discover_safely()
            self.upstream.prune()
            # Read every known domain's backends again, so that deleted ones leave the pool,
            # and check only enabled ones: a backend taken out is not contacted, nor audited.
            for domain_id in self.pool.domain_ids():
                try:
                    await self.agents(domain_id)
                except Exception as exc:  # the directory is unreachable: keep what is known
                    log.warning("reading backends failed: %s", type(exc).__name__)
                    break
            agents = [a for a in self.pool.all() if a.spec.enabled]
            now = self._clock()
            states: dict[str, int] = {"verified": 0, "unverified": 0, "down": 0, "refused": 0}
            for agent in agents:
                states[agent.state(now)] += 1
            for state, count in states.items():
                self.metrics.agents.labels(state=state).set(count)
            if agents:
                results = await asyncio.gather(
                    *(self.check_agent(a) for a in agents), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, Exception):
                        log.error(
                            "health check error", extra={"fields": {"error": type(result).__name__}}
                        )


GATEWAY = web.AppKey("gateway", Gateway)
