"""The gateway's tunables (the ``cube-proxy`` command line fills them from flags, environment
and the configuration file; see :mod:`proxy.config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["GatewaySettings"]


@dataclass(frozen=True)
class GatewaySettings:
    """Defaults suit production; tests shorten the intervals."""

    #: Largest request body accepted from a client (bytes).
    max_body_bytes: int = 64 * 1024 * 1024
    #: Seconds to open a TCP+TLS connection to an agent.
    agent_connect_timeout: float = 5.0
    #: Seconds for a whole evidence fetch (connect, request, body).
    attestation_timeout: float = 15.0
    #: Evidence is re-verified in the background once this fraction of the policy's
    #: ``max_evidence_age_seconds`` has passed, so requests rarely wait on a verification.
    refresh_fraction: float = 0.8
    #: An agent that failed verification stays out of rotation this long before it is tried
    #: again (by the health checker, or a request when no other agent is left).
    failure_retry_seconds: float = 15.0
    #: An agent that refused connections stays out of rotation this long (or until a health
    #: check succeeds).
    down_seconds: float = 5.0
    #: Seconds between health checks of the agents the gateway knows.
    health_interval: float = 10.0
    #: At start and every ``health_interval``, verify in the background every enabled backend
    #: of every domain that no request has used yet: a first request finds its agent verified,
    #: a refused agent is audited and counted before anyone calls it, and the health checks
    #: and ``cube_proxy_agents`` cover every agent.
    discover_agents: bool = True
    #: How long the directory's answers (backends, policy, limits) are reused here. 0 (the
    #: default): not at all, the directory caches (and invalidates on change) itself.
    directory_cache_seconds: float = 0.0
    #: How long a successful authentication is reused here (keyed by the credential's hash):
    #: a revoked token would keep working this long. 0 (the default): the directory decides.
    auth_cache_seconds: float = 0.0
    #: Lifetime of the JWT the proxy signs for an agent, and how long one is reused.
    forward_token_ttl: int = 60
    forward_token_reuse: float = 30.0
    #: Seconds an idle kept-alive connection to an agent stays open (the agent keeps 75).
    agent_keepalive: float = 30.0
    #: Audit rows and usage are written in batches at most this often.
    audit_flush_interval: float = 0.05
    #: Hold each response until its audit row is committed (closes the crash-loss window of
    #: batched audit writes; see :mod:`proxy.gateway.metering`).
    durable_audit: bool = False
    #: Audit/usage rows waiting to be written; beyond this they are dropped (and counted).
    audit_queue_size: int = 100_000
    #: Largest evidence document accepted from an agent.
    max_evidence_bytes: int = 4 * 1024 * 1024
    #: Largest non-streamed answer read from an agent (held whole to meter and relay it; a
    #: larger one is a 502). Streams pass through under flow control, whatever their length.
    max_answer_bytes: int = 256 * 1024 * 1024
    #: Log one JSON line per request.
    access_log: bool = True
    #: The rate-limit file the workers of ``cube-proxy --workers N`` share (set by the
    #: supervisor, not an option of its own): None keeps the buckets in this process.
    shared_limits_file: str | None = None
    #: The directory in which the workers of ``cube-proxy --workers N`` share the gate's
    #: outcomes (set by the supervisor; see :mod:`proxy.gateway.sharedtrust`): None keeps
    #: them in this process.
    shared_trust_dir: str | None = None

    def validate(self) -> GatewaySettings:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes is too small")
        if self.max_answer_bytes < 1024:
            raise ValueError("max_answer_bytes is too small")
        for name in (
            "agent_connect_timeout",
            "attestation_timeout",
            "health_interval",
            "audit_flush_interval",
            "agent_keepalive",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in (
            "failure_retry_seconds",
            "down_seconds",
            "directory_cache_seconds",
            "auth_cache_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 < self.refresh_fraction <= 1:
            raise ValueError("refresh_fraction must be in (0, 1]")
        if self.forward_token_ttl < 10:
            raise ValueError("forward_token_ttl must be at least 10 seconds")
        if not 0 <= self.forward_token_reuse < self.forward_token_ttl:
            raise ValueError("forward_token_reuse must be below forward_token_ttl")
        if self.audit_queue_size < 1:
            raise ValueError("audit_queue_size must be >= 1")
        return self
