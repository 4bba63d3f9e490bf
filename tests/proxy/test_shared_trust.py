# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""The gate's outcomes shared by the workers of one proxy (proxy.gateway.sharedtrust): two
gateways over one shared directory stand for two workers (tests/proxy/test_workers.py does
the same with real ``cube-proxy --workers 2`` processes)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.directory import BackendSpec
from proxy.gateway.agents import Agent, AgentFailure, Trust
from proxy.gateway.sharedtrust import SharedTrust
from tests.agent.backends import FakeOpenAI
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    Agents,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
    sim_policy,
)
from tests.proxy.test_attestation_gate import burst, evidence_served, the_agent


def outcomes(server: ProxyServer, outcome: str) -> float:
    return float(server.gateway.metrics.verifications.labels(outcome=outcome)._value.get())


def two_workers(proxy: ProxyFactory, shared: Path) -> tuple[ProxyServer, ProxyServer]:
    SharedTrust.create(shared)
    settings = replace(TEST_SETTINGS, shared_trust_dir=str(shared))
    return proxy(settings), proxy(settings)


def test_two_workers_fetch_evidence_once(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> None:
    dom = one_domain(directory, agents)
    first, second = two_workers(proxy, tmp_path / "trust")
    before = evidence_served(dom.agent)

    async def both() -> list[int]:
        # At the same moment: the second waits for the first's turn, then adopts its outcome.
        a, b = await asyncio.gather(burst(first, dom, 8), burst(second, dom, 8))
        return a + b

    assert asyncio.run(both()) == [200] * 16
    assert evidence_served(dom.agent) - before == 1
    assert sorted([outcomes(first, "verified"), outcomes(second, "verified")]) == [0, 1]
    assert outcomes(first, "shared") + outcomes(second, "shared") == 1
    one, other = the_agent(first).trust, the_agent(second).trust
    assert one is not None and other is not None
    assert (one.cert_sha256, one.evidence_digest, one.expires_at) == (
        other.cert_sha256,
        other.evidence_digest,
        other.expires_at,
    )
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 16


def test_a_refusal_is_audited_once_and_shared(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    dom = one_domain(directory, agents)
    directory.set_policy(dom.alias, sim_policy(config_digests=["sha256:" + "00" * 32]))
    first, second = two_workers(proxy, tmp_path / "trust")
    refused = first.chat(dom.alias, dom.member_token)
    assert refused.status == 503 and refused.json()["error"]["code"] == "attestation_failed"
    served = evidence_served(dom.agent)
    again = second.chat(dom.alias, dom.member_token)
    assert again.status == 503 and again.json()["error"] == refused.json()["error"]
    assert evidence_served(dom.agent) == served  # the second worker did not ask again
    assert the_agent(second).state(time.monotonic()) == "refused"
    first.flush()
    second.flush()
    assert len([r for r in directory.audits if r.event == "attestation_failed"]) == 1


def test_a_changed_certificate_is_never_adopted_from_another_worker(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    dom = one_domain(directory, agents)
    first, second = two_workers(proxy, tmp_path / "trust")
    assert first.chat(dom.alias, dom.member_token).status == 200
    assert second.chat(dom.alias, dom.member_token).status == 200
    old = the_agent(second).trust
    assert old is not None and outcomes(second, "shared") == 1
    # New process, new key: both workers' pins are refused; one verification serves both, and
    # its new certificate is pinned only because new evidence names it.
    restarted = agents.restart(dom.agent)
    served = evidence_served(restarted)
    assert first.chat(dom.alias, dom.member_token).status == 200
    assert second.chat(dom.alias, dom.member_token).status == 200
    new = the_agent(second).trust
    assert new is not None
    assert new.cert_sha256 == restarted.prepared.identity.cert_sha256 != old.cert_sha256
    assert the_agent(first).verifications == 2 and the_agent(second).verifications == 0
    assert evidence_served(restarted) - served == 1


# -- the records themselves ----------------------------------------------------------------------


def _agent(url: str = "https://127.0.0.1:9443") -> Agent:
    return Agent(
        BackendSpec(id="b1", domain_id="d1", url=url, kind="vllm", models=(), enabled=True)
    )


def _trust(clock: float, cert: bytes = b"\x01" * 32, policy: bytes = b"\x02" * 32) -> Trust:
    return Trust(
        cert_sha256=cert,
        fingerprint=aiohttp.Fingerprint(cert),
        evidence_digest="sha256:" + "ab" * 32,
        policy_sha256=policy,
        platform="sev-snp",
        model="cube-tiny",
        verified_at=clock,
        refresh_at=clock + 80,
        expires_at=clock + 100,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> tuple[SharedTrust, Clock]:
    clock = Clock()
    SharedTrust.create(tmp_path / "trust")
    return SharedTrust(tmp_path / "trust", lock_timeout=0.2, clock=clock), clock


def test_a_record_counts_under_its_policy_until_its_refresh(
    store: tuple[SharedTrust, Clock],
) -> None:
    shared, clock = store
    agent, trust = _agent(), _trust(clock.now)
    shared.record_trust(agent, trust)
    outcome = shared.read(agent, trust.policy_sha256, refused_pin=None)
    assert outcome is not None and outcome.trust is not None
    assert outcome.trust.cert_sha256 == trust.cert_sha256
    assert shared.read(agent, b"\x03" * 32, refused_pin=None) is None  # another policy
    assert (
        shared.read(_agent("https://127.0.0.1:9444"), trust.policy_sha256, refused_pin=None) is None
    )
    assert shared.read(agent, trust.policy_sha256, refused_pin=trust.cert_sha256) is None
    clock.now = trust.refresh_at
    assert shared.read(agent, trust.policy_sha256, refused_pin=None) is None  # due: verify


def test_refusals_and_outages_last_until_their_retry(store: tuple[SharedTrust, Clock]) -> None:
    shared, clock = store
    agent, policy = _agent(), b"\x02" * 32
    refusal = AgentFailure("no", code="attestation_failed", attestation=True)
    shared.record_failure(agent, refusal, policy, clock.now + 15)
    outcome = shared.read(agent, policy, refused_pin=None)
    assert outcome is not None and outcome.failure is not None
    assert outcome.failure.attestation and outcome.failure.code == "attestation_failed"
    assert outcome.failure.policy_sha256 == policy and outcome.until == clock.now + 15
    outage = AgentFailure("busy", code="agent_busy", attestation=False)
    shared.record_failure(agent, outage, policy, clock.now + 5)
    outcome = shared.read(agent, policy, refused_pin=None)
    assert outcome is not None and outcome.failure is not None
    assert not outcome.failure.attestation
    clock.now += 5
    assert shared.read(agent, policy, refused_pin=None) is None


def test_discard_removes_only_the_refused_pin(store: tuple[SharedTrust, Clock]) -> None:
    shared, clock = store
    agent, trust = _agent(), _trust(clock.now)
    shared.record_trust(agent, trust)
    shared.discard(agent, b"\x09" * 32)
    assert shared.read(agent, trust.policy_sha256, refused_pin=None) is not None
    shared.discard(agent, trust.cert_sha256)
    assert shared.read(agent, trust.policy_sha256, refused_pin=None) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        json.dumps({"format": 2, "state": "verified"}).encode(),
        json.dumps({"format": 1, "policy_sha256": "02" * 32, "state": "verified"}).encode(),
        json.dumps({"format": 1, "policy_sha256": "02" * 32, "state": "trusted"}).encode(),
        json.dumps(
            {"format": 1, "policy_sha256": "02" * 32, "state": "refused", "until": "later"}
        ).encode(),
    ],
)
def test_an_unreadable_record_is_ignored(store: tuple[SharedTrust, Clock], content: bytes) -> None:
    shared, _ = store
    agent = _agent()
    shared.record_trust(agent, _trust(1000.0))
    (record,) = [p for p in shared.directory.iterdir() if p.suffix == ".json"]
    record.write_bytes(content)
    assert shared.read(agent, b"\x02" * 32, refused_pin=None) is None


def test_a_worker_stuck_in_its_turn_does_not_stop_the_others(
    store: tuple[SharedTrust, Clock],
) -> None:
    shared, _ = store
    shared._clock = time.monotonic  # real time: the lock is polled
    agent = _agent()

    async def take() -> list[bool]:
        got = []
        async with shared.turn(agent) as held:
            got.append(held)
            # Another worker's attempt meanwhile (a second descriptor: flock is per open file).
            async with shared.turn(agent) as other:
                got.append(other)
        async with shared.turn(agent) as after:
            got.append(after)
        return got

    assert asyncio.run(take()) == [True, False, True]
    # The lock files exist, the records are the supervisor's alone.
    (lock,) = [p for p in shared.directory.iterdir() if p.suffix == ".lock"]
    assert os.stat(lock).st_mode & 0o777 == 0o600
    assert os.stat(shared.directory).st_mode & 0o777 == 0o700
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the turn ended
    finally:
        os.close(fd)


def test_a_refused_pin_is_trusted_again_once_verified_again(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A certificate refused once (say, an interceptor was in the path for a while) is adopted
    from other workers again after this worker itself verified it anew."""
    dom = one_domain(directory, agents)
    first, second = two_workers(proxy, tmp_path / "trust")
    assert first.chat(dom.alias, dom.member_token).status == 200
    agent = the_agent(first)
    assert agent.trust is not None
    pin = agent.trust.cert_sha256
    first.call(_refuse(first, agent))  # as a refused connection does
    assert agent.refused_pin == pin and agent.trust is None
    assert first.chat(dom.alias, dom.member_token).status == 200  # verified again itself
    assert agent.verifications == 2 and agent.refused_pin is None
    assert second.chat(dom.alias, dom.member_token).status == 200
    assert the_agent(second).verifications == 0  # adopted the new record


async def _refuse(server: ProxyServer, agent: Agent) -> None:
    assert agent.trust is not None
    server.gateway.gate.certificate_changed(agent, agent.trust)


def test_without_the_shared_directory_a_worker_verifies_on_its_own(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    dom = one_domain(directory, agents)
    first, _ = two_workers(proxy, tmp_path / "trust")
    (tmp_path / "trust").rmdir()  # e.g. removed by a temporary-files cleaner
    assert first.chat(dom.alias, dom.member_token).status == 200
    assert outcomes(first, "verified") == 1
