# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""How long the gateway relies on what it verified: trust ends when the evidence is too old
(an agent that stops producing evidence is not forwarded to), never outlives the attested
certificate, every verification asks with a fresh random nonce, and the JWT forwarded to an
agent is reused only within its reuse window."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from aiohttp import web

from agent.identity import AgentIdentity
from proxy.directory import Caller
from proxy.gateway import Gateway
from proxy.gateway.agents import Agent
from tests.agent.backends import BackgroundLoop
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    ProxyFactory,
    ProxyServer,
    directory,
    proxy,
    sim_policy,
)
from tests.proxy.stubs import StubAgent


@dataclass
class EvidenceStub(StubAgent):
    """A :class:`StubAgent` that records the nonces it is asked for and, while
    ``evidence_status`` is not 200, answers the evidence request with that status."""

    evidence_status: int = 200
    nonces: list[bytes] = field(default_factory=list)

    async def _attestation(self, request: web.Request) -> web.Response:
        self.nonces.append(bytes.fromhex(request.query["nonce"]))
        if self.evidence_status != 200:
            self.evidence_requests += 1
            return web.Response(status=self.evidence_status)
        return await super()._attestation(request)


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    yield background
    background.close()


def _stub(loop: BackgroundLoop, identity: AgentIdentity | None = None) -> EvidenceStub:
    stub = EvidenceStub(loop)
    if identity is not None:
        stub.identity = identity  # before start: the server presents this certificate
    stub.start()
    return stub


def _domain(directory: FakeDirectory, stub: StubAgent, policy: bytes) -> str:
    directory.add_domain("acme", policy=policy)
    directory.add_member("acme", "u")
    directory.add_backend("acme", stub.url, backend_id="stub", models=("cube-tiny",))
    return directory.session_token("u")


def _the_agent(server: ProxyServer) -> Agent:
    (agent,) = server.gateway.pool.all()
    return agent


def _forwarded(stub: StubAgent) -> int:
    return len([s for s in stub.seen if s.path.startswith("/v1/chat/completions")])


def test_trust_expires_when_an_agent_stops_producing_evidence(
    directory: FakeDirectory, proxy: ProxyFactory, loop: BackgroundLoop
) -> None:
    """Verified once, then every evidence request answered 503: past the policy's
    ``max_evidence_age_seconds`` nothing more is forwarded on the old verification."""
    stub = _stub(loop)
    try:
        bearer = _domain(directory, stub, sim_policy(max_evidence_age_seconds=3))
        server = proxy()
        assert server.chat("acme", bearer).status == 200
        assert _forwarded(stub) == 1
        trust = _the_agent(server).trust
        assert trust is not None and trust.expires_at - trust.verified_at <= 3.0
        stub.evidence_status = 503
        time.sleep(max(0.0, trust.expires_at - time.monotonic()) + 0.2)
        reply = server.chat("acme", bearer)
        assert reply.status == 503, reply.body
        assert reply.json()["error"]["code"] == "agent_busy"
        assert _forwarded(stub) == 1  # nothing reached the agent on the expired trust
        assert stub.evidence_requests >= 2  # it was asked again, and failed
        again = server.chat("acme", bearer)
        assert again.status == 503
        assert _forwarded(stub) == 1
    finally:
        stub.stop()


def test_every_verification_uses_a_fresh_random_32_byte_nonce(
    directory: FakeDirectory, proxy: ProxyFactory, loop: BackgroundLoop
) -> None:
    stub = _stub(loop)
    try:
        bearer = _domain(directory, stub, sim_policy())
        server = proxy()
        assert server.chat("acme", bearer).status == 200
        directory.set_policy("acme", sim_policy(description="changed"))  # verified again
        assert server.chat("acme", bearer).status == 200
        directory.set_policy("acme", sim_policy(description="changed again"))
        assert server.chat("acme", bearer).status == 200
        assert _the_agent(server).verifications == 3
        nonces = stub.nonces
        assert len(nonces) == 3
        assert all(len(n) == 32 for n in nonces)
        assert len(set(nonces)) == 3  # never reused: a replayed document would not match
        assert bytes(32) not in nonces
    finally:
        stub.stop()


def test_trust_never_outlives_the_attested_certificate(
    directory: FakeDirectory, proxy: ProxyFactory, loop: BackgroundLoop
) -> None:
    """A certificate valid for two more minutes under a policy accepting evidence for five:
    the pin is relied on only until the certificate's not_after."""
    identity = AgentIdentity.generate(validity=timedelta(seconds=120))
    stub = _stub(loop, identity)
    try:
        bearer = _domain(directory, stub, sim_policy(max_evidence_age_seconds=300))
        server = proxy()
        assert server.chat("acme", bearer).status == 200
        trust = _the_agent(server).trust
        assert trust is not None
        lifetime = trust.expires_at - trust.verified_at
        assert 60 < lifetime <= 120
        assert trust.refresh_at <= trust.expires_at
    finally:
        stub.stop()


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_forwarded_token_is_reused_only_within_its_reuse_window() -> None:
    directory = FakeDirectory()
    clock = Clock()
    gateway = Gateway(directory, TEST_SETTINGS, clock=clock)
    reuse = gateway.settings.forward_token_reuse
    caller = Caller(
        user_id="u",
        domain_id="d",
        domain_alias="acme",
        actions=frozenset({"inference"}),
        token_kind="pat",
        token_id="t",
        models=None,
    )
    first = gateway.forward_token(caller, "cube-tiny")
    assert directory.signer.signed == 1
    clock.now += reuse - 1
    assert gateway.forward_token(caller, "cube-tiny") == first
    assert directory.signer.signed == 1
    clock.now += 2  # past the reuse window: a new token is minted
    fresh = gateway.forward_token(caller, "cube-tiny")
    assert directory.signer.signed == 2
    assert fresh != first
    assert gateway.forward_token(caller, "cube-tiny") == fresh
    assert directory.signer.signed == 2
