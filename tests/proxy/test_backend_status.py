"""What the admin API reports of a backend's attestation state (``Agent.status``); the API
itself is exercised with real processes in tests/proxy/test_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp

from proxy.directory import BackendSpec
from proxy.gateway.agents import Agent, AgentFailure, Trust

WALL = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


class Clock:
    now = 500.0

    def __call__(self) -> float:
        return self.now


def agent(clock: Clock) -> Agent:
    spec = BackendSpec(
        id="b1", domain_id="d1", url="https://127.0.0.1:9443", kind="vllm", models=(), enabled=True
    )
    return Agent(spec, clock=clock)


def test_an_agent_not_yet_verified_reports_only_that() -> None:
    clock = Clock()
    assert agent(clock).status(clock.now, WALL) == {"state": "unverified"}


def test_a_verified_agent_reports_the_evidence_it_relies_on_in_utc() -> None:
    clock = Clock()
    a = agent(clock)
    cert = bytes(range(32))
    a.trust = Trust(
        cert_sha256=cert,
        fingerprint=aiohttp.Fingerprint(cert),
        evidence_digest="sha256:" + "ab" * 32,
        policy_sha256=b"\x02" * 32,
        platform="tdx",
        model="cube-tiny",
        verified_at=clock.now - 30,
        refresh_at=clock.now + 200,
        expires_at=clock.now + 270,
    )
    assert a.status(clock.now, WALL) == {
        "state": "verified",
        "evidence": {
            "platform": "tdx",
            "model": "cube-tiny",
            "digest": "sha256:" + "ab" * 32,
            "tls_cert_sha256": cert.hex(),
            "verified_at": "2026-11-27T11:59:30+00:00",
            "expires_at": "2026-11-27T12:04:30+00:00",
        },
    }
    # Once expired it is no longer relied on, and no longer reported as such.
    clock.now += 271
    assert a.status(clock.now, WALL) == {"state": "unverified"}


def test_a_refused_agent_reports_why_and_until_when() -> None:
    clock = Clock()
    a = agent(clock)
    a.failure = AgentFailure(
        "agent b1 failed attestation: config_digest not allowed",
        code="attestation_failed",
        attestation=True,
    )
    a.retry_at = clock.now + 15
    assert a.status(clock.now, WALL) == {
        "state": "refused",
        "reason": {
            "code": "attestation_failed",
            "message": "agent b1 failed attestation: config_digest not allowed",
        },
        "retry_at": "2026-11-27T12:00:15+00:00",
    }


def test_an_agent_marked_down_reports_the_outage() -> None:
    clock = Clock()
    a = agent(clock)
    a.mark_down("health check failed (ConnectFailed)", 5)
    assert a.status(clock.now, WALL) == {
        "state": "down",
        "reason": {"code": "agent_down", "message": "health check failed (ConnectFailed)"},
        "retry_at": "2026-11-27T12:00:05+00:00",
    }
