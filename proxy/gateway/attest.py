"""The attestation gate: no request reaches an agent whose evidence the gateway has not just
verified against the domain's policy, over TLS pinned to the certificate that evidence names.

An agent is (re)verified:

- before its first request;
- when its evidence is older than the policy's ``max_evidence_age_seconds`` (requests then
  wait), and in the background from ``refresh_fraction`` of that age on (requests go on with
  the still-valid pin meanwhile);
- when the domain's policy changes;
- when its TLS certificate changes (a pinned connection was refused: the forwarding code calls
  :meth:`AttestationGate.certificate_changed`).

Verification: fetch ``/attestation?nonce=`` with a fresh random 32-byte nonce, read the
certificate that connection presented, verify the document with
:func:`attestation.evidence.verify_evidence` (in a worker thread: it is CPU work), and require
the claims' ``tls_cert_sha256`` to be exactly that certificate's SHA-256. All requests for one
agent wait on one verification in flight (a shared task; a waiter that is cancelled does not
cancel it). A refusal takes the agent out of rotation for ``failure_retry_seconds``, is logged
and audited, and answers every waiting request with the reason.

With ``cube-proxy --workers N`` the workers take turns per agent and adopt each other's
outcomes (:mod:`proxy.gateway.sharedtrust`): one evidence request per agent, not one per worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import aiohttp

from attestation.errors import AttestationError
from attestation.evidence import VerifiedEvidence, certificate_window, verify_evidence
from attestation.policy import Policy
from cube._http import BodyTooLarge, read_at_most
from proxy.gateway.agents import Agent, AgentFailure, Trust
from proxy.gateway.metrics import GatewayMetrics
from proxy.gateway.settings import GatewaySettings
from proxy.gateway.sharedtrust import SharedTrust
from proxy.gateway.tls import CertificateCapture, sha256

__all__ = ["AttestationGate", "LoadedPolicy", "load_policy_bytes"]

log = logging.getLogger("cube.proxy.attestation")

_TRANSIENT_STATUSES = (429, 502, 503, 504)


@dataclass(frozen=True)
class LoadedPolicy:
    """A domain's policy, parsed once per distinct document."""

    policy: Policy
    sha256: bytes


def load_policy_bytes(data: bytes) -> LoadedPolicy:
    """Parse a ``cube-policy/1`` document (raises :class:`attestation.errors.AttestationError`)."""
    from attestation.policy import load_policy

    return LoadedPolicy(load_policy(data), hashlib.sha256(data).digest())


FailureHook = Callable[[Agent, AgentFailure], None]


class AttestationGate:
    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        on_failure: FailureHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_failure = on_failure
        self._clock = clock
        self._wall_clock = wall_clock
        self._session: aiohttp.ClientSession | None = None
        #: The outcomes this worker shares with the other workers (``--workers N``), if any.
        self.shared: SharedTrust | None = (
            SharedTrust(
                settings.shared_trust_dir,
                # Longer than a verification may take: a worker that held the lock longer
                # is stuck, and the others go on without it.
                lock_timeout=settings.attestation_timeout + 5.0,
                clock=clock,
            )
            if settings.shared_trust_dir is not None
            else None
        )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # A fresh connection per fetch: its certificate is the one checked.
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(
                total=self.settings.attestation_timeout,
                sock_connect=self.settings.agent_connect_timeout,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the gate ---------------------------------------------------------------------------

    async def trust(self, agent: Agent, policy: LoadedPolicy) -> Trust:
        """The agent's current trust under ``policy``, verifying first when needed.

        Raises :class:`AgentFailure`.
        """
        now = self._clock()
        trust = agent.trust
        if trust is not None and trust.policy_sha256 == policy.sha256 and now < trust.expires_at:
            if now >= trust.refresh_at and agent.verifying is None:
                self._start(agent, policy, background=True)
            return trust
        failure = agent.failure
        if failure is not None and now < agent.retry_at and failure.policy_sha256 == policy.sha256:
            raise failure
        for _ in range(2):
            task = agent.verifying or self._start(agent, policy, background=False)
            try:
                trust = await asyncio.shield(task)
            except AgentFailure as refused:
                if refused.policy_sha256 in (None, policy.sha256):
                    raise
                continue  # refused under the policy before this one: judge under this one
            if trust.policy_sha256 == policy.sha256:
                return trust
        raise AgentFailure(
            "the domain's policy changed during verification; retry",
            code="policy_changed",
            attestation=False,
        )

    def certificate_changed(self, agent: Agent, trust: Trust) -> None:
        """A pinned connection was refused: forget that pin (the next use re-verifies)."""
        self.metrics.certificate_changes.inc()
        agent.refused_pin = trust.cert_sha256
        if agent.trust is trust:
            agent.trust = None
            log.warning(
                "agent certificate changed; re-verifying before any further request",
                extra={"fields": {"backend_id": agent.id, "pinned": trust.cert_sha256.hex()}},
            )

    def _start(
        self, agent: Agent, policy: LoadedPolicy, *, background: bool
    ) -> asyncio.Task[Trust]:
        task = asyncio.get_running_loop().create_task(
            self._run(agent, policy), name=f"attest-{agent.id}"
        )
        agent.verifying = task
        if background:
            task.add_done_callback(_consume)
        return task

    async def _run(self, agent: Agent, policy: LoadedPolicy) -> Trust:
        try:
            if self.shared is None:
                return await self._verify_and_record(agent, policy)
            async with self.shared.turn(agent):
                return await self._run_shared(agent, policy, self.shared)
        finally:
            if agent.verifying is asyncio.current_task():
                agent.verifying = None

    async def _run_shared(self, agent: Agent, policy: LoadedPolicy, shared: SharedTrust) -> Trust:
        """Adopt what another worker found, or verify and tell the others (the caller holds
        the agent's turn when it could get it)."""
        refused_pin = agent.refused_pin
        if refused_pin is not None:
            await asyncio.to_thread(shared.discard, agent, refused_pin)
        outcome = await asyncio.to_thread(
            shared.read, agent, policy.sha256, refused_pin=refused_pin
        )
        if outcome is not None and outcome.trust is not None:
            return self._adopted(agent, outcome.trust)
        if outcome is not None and outcome.failure is not None:
            self._adopt_failure(agent, outcome.failure, outcome.until)
            raise outcome.failure
        try:
            trust = await self._verify_and_record(agent, policy)
        except AgentFailure as failure:
            until = agent.retry_at if failure.attestation else agent.down_until
            await asyncio.to_thread(shared.record_failure, agent, failure, policy.sha256, until)
            raise
        await asyncio.to_thread(shared.record_trust, agent, trust)
        return trust

    def _adopted(self, agent: Agent, trust: Trust) -> Trust:
        trust = replace(trust, fingerprint=_fingerprint(agent, trust.cert_sha256))
        agent.trust = trust
        agent.failure = None
        agent.mark_up()
        self.metrics.verifications.labels(outcome="shared").inc()
        return trust

    def _adopt_failure(self, agent: Agent, failure: AgentFailure, until: float) -> None:
        # Logged, counted and audited once, by the worker that saw it.
        if failure.attestation:
            agent.trust = None
            agent.failure = failure
            agent.retry_at = until
        else:
            agent.mark_down(failure.message, max(0.0, until - self._clock()))

    async def _verify_and_record(self, agent: Agent, policy: LoadedPolicy) -> Trust:
        """Verify the agent and record the outcome on it (raises the failure)."""
        try:
            trust = await self._verify(agent, policy)
        except AgentFailure as failure:
            if failure.attestation:
                agent.trust = None
                agent.failure = failure
                agent.retry_at = self._clock() + self.settings.failure_retry_seconds
                self.metrics.verifications.labels(outcome="refused").inc()
                log.warning(
                    "agent refused by attestation",
                    extra={"fields": {"backend_id": agent.id, "reason": failure.message}},
                )
                if self.on_failure is not None:
                    self.on_failure(agent, failure)
            else:
                self.metrics.verifications.labels(outcome="unavailable").inc()
                agent.mark_down(failure.message, self.settings.down_seconds)
            raise
        agent.trust = trust
        agent.failure = None
        if agent.refused_pin == trust.cert_sha256:
            agent.refused_pin = None  # presented again, with evidence naming it: trusted again
        agent.mark_up()
        self.metrics.verifications.labels(outcome="verified").inc()
        log.info(
            "agent verified",
            extra={
                "fields": {
                    "backend_id": agent.id,
                    "platform": trust.platform,
                    "tls_cert_sha256": trust.cert_sha256.hex(),
                    "evidence_digest": trust.evidence_digest,
                }
            },
        )
        return trust

    async def _fetch(self, agent: Agent, nonce: bytes) -> tuple[bytes, bytes]:
        """The evidence document and the DER certificate of the connection that carried it."""
        assert self._session is not None, "the gate is not started"
        url = agent.base_url.with_path("/attestation").with_query({"nonce": nonce.hex()})
        limit = self.settings.max_evidence_bytes
        capture = CertificateCapture()
        try:
            async with self._session.get(
                url, ssl=capture, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if response.status in _TRANSIENT_STATUSES:
                    raise AgentFailure(
                        f"agent {agent.id} is busy (HTTP {response.status} to the evidence "
                        "request)",
                        code="agent_busy",
                        attestation=False,
                    )
                if response.status != 200:
                    raise AgentFailure(
                        f"agent {agent.id} did not serve evidence (HTTP {response.status})",
                        code="evidence_unavailable",
                        attestation=True,
                    )
                try:
                    body = await read_at_most(response, limit)
                except BodyTooLarge:
                    raise AgentFailure(
                        f"agent {agent.id} sent an oversized evidence document",
                        code="evidence_unavailable",
                        attestation=True,
                    ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentFailure(
                f"agent {agent.id} is unreachable ({type(exc).__name__})",
                code="agent_unreachable",
                attestation=False,
            ) from None
        der = capture.der
        if der is None:
            raise AgentFailure(
                f"agent {agent.id} presented no TLS certificate",
                code="certificate_mismatch",
                attestation=True,
            )
        return body, der

    async def _verify(self, agent: Agent, policy: LoadedPolicy) -> Trust:
        agent.verifications += 1
        started = self._clock()
        nonce = secrets.token_bytes(32)
        document, der = await self._fetch(agent, nonce)

        def failure(message: str, code: str) -> AgentFailure:
            return AgentFailure(
                f"agent {agent.id} failed attestation: {message}",
                code=code,
                attestation=True,
                policy_sha256=policy.sha256,
            )

        try:
            verified: VerifiedEvidence = await asyncio.to_thread(
                verify_evidence,
                document,
                nonce=nonce,
                policy=policy.policy,
                now=self._wall_clock(),
            )
        except AttestationError as exc:
            raise failure(str(exc), "attestation_failed") from None
        except Exception as exc:
            # A verifier bug on hostile input must still refuse the agent (fail closed, and
            # out of rotation until its retry), not answer 500 to every request that tries it.
            log.exception("evidence verification failed unexpectedly (agent %s)", agent.id)
            raise failure(
                f"its evidence could not be processed ({type(exc).__name__})", "attestation_failed"
            ) from None
        presented = sha256(der)
        if not hmac.compare_digest(presented, verified.claims.tls_cert_sha256):
            raise failure(
                "the TLS certificate this connection presented "
                f"(sha256 {presented.hex()}) is not the one its evidence names "
                f"(sha256 {verified.claims.tls_cert_sha256.hex()}): refusing a possible "
                "interception",
                "certificate_mismatch",
            )
        # The key behind the pin is relied on only while its certificate is valid (agents
        # rotate theirs; a leaked key stops working when its certificate expires).
        wall = self._wall_clock()
        try:
            not_before, not_after = certificate_window(der)
        except AttestationError as exc:
            raise failure(str(exc), "certificate_invalid") from None
        if not not_before <= wall < not_after:
            raise failure(
                f"its attested TLS certificate is valid from {not_before.isoformat()} to "
                f"{not_after.isoformat()}, not now ({wall.isoformat()})",
                "certificate_expired",
            )
        fingerprint = _fingerprint(agent, presented)
        # The evidence's age counts from when it was asked for (its claims' issue time is
        # after that); the policy bounds how long it is relied on.
        max_age = min(
            float(policy.policy.max_evidence_age_seconds),
            (not_after - wall).total_seconds(),
        )
        return Trust(
            cert_sha256=presented,
            fingerprint=fingerprint,
            evidence_digest=verified.digest,
            policy_sha256=policy.sha256,
            platform=verified.platform,
            model=verified.claims.model_name,
            verified_at=started,
            refresh_at=started + max_age * self.settings.refresh_fraction,
            expires_at=started + max_age,
        )


def _fingerprint(agent: Agent, cert_sha256: bytes) -> aiohttp.Fingerprint:
    """The pin for ``cert_sha256``: the agent's current one when unchanged (its pooled
    connections stay in use), else a new one (new pooled connections)."""
    previous = agent.trust
    if previous is not None and previous.cert_sha256 == cert_sha256:
        return previous.fingerprint
    return aiohttp.Fingerprint(cert_sha256)


def _consume(task: asyncio.Task[Trust]) -> None:
    # A background refresh's failure is recorded on the agent; nobody awaits the task.
    if not task.cancelled():
        task.exception()
