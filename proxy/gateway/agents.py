"""The agents the gateway knows, per domain: their trust, health and load, and the choice of
which one serves a request.

An :class:`Agent` is one backend (agent URL) of one domain; a backend URL belongs to one
domain only (migration 5; a second registration is a 409), so pins and policies never mix.
Selection prefers agents in rotation (verified or not yet tried, not marked down) with the
fewest requests in flight, rotating among equals (round robin); agents out of rotation come
last, so a request still reaches one when nothing else is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
from yarl import URL

from cube._model_names import ollama_canonical
from proxy.directory import BackendSpec
from proxy.gateway.tls import agent_base_url

__all__ = ["Agent", "AgentFailure", "AgentPool", "Trust"]


@dataclass(frozen=True)
class Trust:
    """A verified agent: the pin its evidence named and how long that evidence counts."""

    cert_sha256: bytes
    fingerprint: aiohttp.Fingerprint
    evidence_digest: str
    policy_sha256: bytes
    platform: str
    model: str
    verified_at: float  # monotonic
    refresh_at: float  # monotonic: start a background re-verification
    expires_at: float  # monotonic: stop using it


class AgentFailure(Exception):
    """An agent cannot serve now. ``message`` is safe to show the domain's callers.

    ``attestation`` failures (evidence refused, certificate mismatch) take the agent out of
    rotation; the others (unreachable, busy) are transient.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        attestation: bool,
        policy_sha256: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.attestation = attestation
        self.policy_sha256 = policy_sha256


class Agent:
    """One agent of one domain, and everything the gateway tracks about it."""

    def __init__(self, spec: BackendSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.base_url: URL = agent_base_url(spec.url)
        self._clock = clock
        self.trust: Trust | None = None
        self.failure: AgentFailure | None = None
        self.retry_at = 0.0
        self.down_until = 0.0
        self.down_reason: str | None = None
        self.in_flight = 0
        self.verifications = 0
        self.verifying: asyncio.Task[Trust] | None = None
        #: The last pin a connection refused (the certificate changed): never trusted again
        #: from another worker's record (see :mod:`proxy.gateway.sharedtrust`).
        self.refused_pin: bytes | None = None
        self.last_used = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def domain_id(self) -> str:
        return self.spec.domain_id

    def in_rotation(self, now: float) -> bool:
        if now < self.down_until:
            return False
        return not (self.failure is not None and now < self.retry_at)

    def state(self, now: float) -> str:
        if self.failure is not None and now < self.retry_at:
            return "refused"
        if now < self.down_until:
            return "down"
        if self.trust is not None and now < self.trust.expires_at:
            return "verified"
        return "unverified"

    def status(self, now: float, wall: datetime) -> dict[str, object]:
        """What the gate knows of this agent, for its domain's administrators: the state, the
        evidence it relies on while verified, the reason while refused or down. ``now`` is
        this agent's clock, ``wall`` the same instant in UTC (times are reported in UTC)."""

        def utc(moment: float) -> str:
            return (wall + timedelta(seconds=moment - now)).isoformat(timespec="seconds")

        state = self.state(now)
        out: dict[str, object] = {"state": state}
        trust = self.trust
        if trust is not None and now < trust.expires_at:
            out["evidence"] = {
                "platform": trust.platform,
                "model": trust.model,
                "digest": trust.evidence_digest,
                "tls_cert_sha256": trust.cert_sha256.hex(),
                "verified_at": utc(trust.verified_at),
                "expires_at": utc(trust.expires_at),
            }
        if state == "refused" and self.failure is not None:
            out["reason"] = {"code": self.failure.code, "message": self.failure.message}
            out["retry_at"] = utc(self.retry_at)
        elif state == "down":
            out["reason"] = {"code": "agent_down", "message": self.down_reason or ""}
            out["retry_at"] = utc(self.down_until)
        return out

    def mark_down(self, reason: str, seconds: float) -> None:
        self.down_until = self._clock() + seconds
        self.down_reason = reason

    def mark_up(self) -> None:
        self.down_until = 0.0
        self.down_reason = None

    def serves(self, model: str | None, *, ollama: bool) -> bool:
        if not self.spec.enabled:
            return False
        if ollama and self.spec.kind != "ollama":
            return False
        if model is None or not self.spec.models or model in self.spec.models:
            return True
        if self.spec.kind != "ollama":
            return False
        # Ollama reads llama3.2, llama3.2:latest and library/llama3.2 as one model, and its
        # /api/tags lists the tagged form that clients then ask for.
        wanted = ollama_canonical(model)
        return any(ollama_canonical(name) == wanted for name in self.spec.models)

    def __repr__(self) -> str:
        return f"Agent(id={self.spec.id!r}, url={self.spec.url!r})"


class AgentPool:
    """Agents by domain, rebuilt from the directory's backend list as it changes."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._domains: dict[str, tuple[tuple[BackendSpec, ...], list[Agent]]] = {}
        self._agents: dict[tuple[str, str, str], Agent] = {}
        self._rotor = 0
        #: Backend specs refused as unusable (e.g. a plain http:// URL), by id, with why.
        self.invalid: dict[tuple[str, str], str] = {}

    def agents(self, domain_id: str, specs: Sequence[BackendSpec]) -> list[Agent]:
        """The domain's agents for this backend list (agent state survives list changes)."""
        key = tuple(specs)
        known = self._domains.get(domain_id)
        if known is not None and known[0] == key:
            return known[1]
        agents: list[Agent] = []
        for spec in specs:
            if spec.domain_id != domain_id:
                continue  # never serve one domain from another's backend
            agent_key = (domain_id, spec.id, spec.url)
            agent = self._agents.get(agent_key)
            if agent is None or agent.spec != spec:
                try:
                    fresh = Agent(spec, clock=self._clock)
                except ValueError as exc:
                    self.invalid[(domain_id, spec.id)] = str(exc)
                    continue
                if agent is not None:  # same URL, new attributes: keep what was verified
                    fresh.trust, fresh.failure, fresh.retry_at, fresh.refused_pin = (
                        agent.trust,
                        agent.failure,
                        agent.retry_at,
                        agent.refused_pin,
                    )
                agent = fresh
                self._agents[agent_key] = agent
            agents.append(agent)
        keep = {(domain_id, s.id, s.url) for s in specs}
        for agent_key in [k for k in self._agents if k[0] == domain_id and k not in keep]:
            del self._agents[agent_key]
        self._domains[domain_id] = (key, agents)
        return agents

    def all(self) -> list[Agent]:
        return list(self._agents.values())

    def domain_ids(self) -> set[str]:
        """The domains of the agents held now."""
        return {key[0] for key in self._agents}

    def order(self, candidates: Sequence[Agent]) -> list[Agent]:
        """Try order: in rotation first, least in flight, round robin among equals."""
        if len(candidates) <= 1:
            return list(candidates)
        now = self._clock()
        self._rotor += 1
        n = len(candidates)
        start = self._rotor % n
        rotated = [candidates[(start + i) % n] for i in range(n)]
        # sorted() is stable: ties keep the rotated order.
        return sorted(rotated, key=lambda a: (not a.in_rotation(now), a.in_flight))
