"""``GET /attestation?nonce=``: nonces, concurrency, rate limiting, busy devices, errors."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.evidence_endpoint import EvidenceService, TokenBucket
from agent.identity import AgentIdentity
from agent.metrics import METRICS, AgentMetrics
from attestation.errors import CollectionError
from attestation.evidence import Claims, EvidenceCollector, verify_evidence
from attestation.guest import ConfigfsTsm
from attestation.policy import Policy
from attestation.sim import EmulatedConfigfsTsm
from tests.agent.conftest import RunningAgent, StartAgent

ALLOW_SIMULATED = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})


def evidence_count(agent: RunningAgent, outcome: str) -> float:
    value = agent.app[METRICS].registry.get_sample_value(
        "cube_agent_evidence_total", {"outcome": outcome}
    )
    return value or 0.0


def verify(agent: RunningAgent, body: bytes, nonce: bytes) -> Claims:
    verified = verify_evidence(body, nonce=nonce, policy=ALLOW_SIMULATED, now=datetime.now(UTC))
    assert verified.claims.tls_cert_sha256 == agent.prepared.identity.cert_sha256
    return verified.claims


@pytest.fixture
def agent(start_agent: StartAgent) -> RunningAgent:
    return start_agent()


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?nonce=",
        "?nonce=" + "00" * 31,  # too short
        "?nonce=" + "00" * 65,  # too long
        "?nonce=" + "00" * 32 + "0",  # odd length
        "?nonce=" + "zz" * 32,  # not hex
        "?nonce=" + "00" * 16 + "%20" + "00" * 16,  # a space (fromhex would take it)
        "?nonce=0x" + "00" * 32,
        "?nonce=" + "00" * 32 + "&nonce=" + "11" * 32,  # two nonces
        "?nonce=" + "0" * 4000,  # long (within the HTTP line limit)
    ],
)
def test_bad_nonces_are_400_json(agent: RunningAgent, query: str) -> None:
    before = evidence_count(agent, "bad_nonce")
    reply = agent.get("/attestation" + query)
    assert reply.status == 400, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_nonce"
    assert evidence_count(agent, "bad_nonce") == before + 1


@pytest.mark.parametrize("size", [32, 48, 64])
def test_evidence_verifies_against_the_nonce_sent(agent: RunningAgent, size: int) -> None:
    nonce = secrets.token_bytes(size)
    reply = agent.get("/attestation?nonce=" + nonce.hex().upper())
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Cache-Control"] == "no-store"
    doc = reply.json()
    assert doc["format"] == "cube-evidence/1" and doc["platform"] == "sim-sev-snp"
    claims = verify(agent, reply.body, nonce)
    config = agent.config
    assert claims.model_name == config.model_name
    assert claims.model_digest == config.model_digest
    assert claims.config_digest == config.digest()
    assert claims.hpke_public_key == agent.prepared.identity.hpke_public_key
    assert abs(datetime.now(UTC) - claims.issued_at) < timedelta(seconds=30)


def test_other_nonce_does_not_verify(agent: RunningAgent) -> None:
    nonce = secrets.token_bytes(32)
    reply = agent.get("/attestation?nonce=" + nonce.hex())
    with pytest.raises(Exception, match="nonce"):
        verify(agent, reply.body, secrets.token_bytes(32))


def test_concurrent_requests_each_verify_against_their_own_nonce(agent: RunningAgent) -> None:
    nonces = [secrets.token_bytes(32) for _ in range(8)]
    ok_before = evidence_count(agent, "ok")

    def fetch(nonce: bytes) -> tuple[bytes, int, bytes]:
        reply = agent.get("/attestation?nonce=" + nonce.hex())
        return nonce, reply.status, reply.body

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, nonces))
    for nonce, status, body in results:
        assert status == 200, body
        verify(agent, body, nonce)
    reports = {json.loads(body)["tee"]["report"] for _, _, body in results}
    assert len(reports) == 8
    assert evidence_count(agent, "ok") == ok_before + 8


def test_rate_limit_answers_429_with_retry_after(start_agent: StartAgent) -> None:
    agent = start_agent({"evidence_rate_per_second": 0.1, "evidence_burst": 2})
    statuses = [agent.get("/attestation?nonce=" + "ab" * 32) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    limited = statuses[2]
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["Retry-After"]) <= 10
    assert evidence_count(agent, "rate_limited") == 1
    # Bad nonces are refused before the bucket and do not drain it for others.
    assert agent.get("/attestation?nonce=00").status == 400


def test_busy_tee_is_503_with_retry_after(start_agent: StartAgent) -> None:
    emulation = EmulatedConfigfsTsm.snp()
    device = ConfigfsTsm(emulation.root, fs=emulation, attempts=3, backoff=0.001)
    agent = start_agent(collector=EvidenceCollector(tee=device))
    emulation.busy = 1  # one EBUSY: retried inside ConfigfsTsm, the client never notices
    assert agent.get("/attestation?nonce=" + "01" * 32).status == 200
    emulation.busy = 1000  # stays busy beyond the retries
    reply = agent.get("/attestation?nonce=" + "02" * 32)
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "1"
    assert reply.json()["error"]["code"] == "tee_busy"
    assert evidence_count(agent, "busy") == 1
    emulation.busy = 0
    assert agent.get("/attestation?nonce=" + "03" * 32).status == 200


class FailingAfterStart:
    """A TEE that works for the start-up trial, then fails (a driver error)."""

    def __init__(self) -> None:
        emulation = EmulatedConfigfsTsm.tdx()
        self.inner = ConfigfsTsm(emulation.root, fs=emulation)
        self.fail = False

    @property
    def platform(self) -> Any:
        return self.inner.platform

    def get_evidence(self, report_data: bytes) -> Any:
        if self.fail:
            raise CollectionError("configfs-tsm: cannot read outblob: EIO (secret-free detail)")
        return self.inner.get_evidence(report_data)

    async def aget_evidence(self, report_data: bytes) -> Any:
        return await asyncio.to_thread(self.get_evidence, report_data)


def test_collection_errors_are_500_json_without_details(start_agent: StartAgent) -> None:
    tee = FailingAfterStart()
    agent = start_agent({"tee": "sim-tdx"}, collector=EvidenceCollector(tee=tee))
    nonce = secrets.token_bytes(32)
    ok = agent.get("/attestation?nonce=" + nonce.hex())
    assert ok.status == 200 and ok.json()["platform"] == "sim-tdx"
    verify(agent, ok.body, nonce)
    tee.fail = True
    reply = agent.get("/attestation?nonce=" + nonce.hex())
    assert reply.status == 500
    assert reply.json() == {
        "error": {
            "message": "evidence collection failed",
            "type": "server_error",
            "code": "evidence_failed",
        }
    }
    assert evidence_count(agent, "error") == 1


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    now[0] = 100.0  # refills to the burst, not beyond
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_claims_are_rebuilt_for_every_request(tmp_path: Any) -> None:
    """issued_at comes from the clock at each collection (a fake wall clock here)."""
    from tests.agent.test_identity import config

    emulation = EmulatedConfigfsTsm.snp()
    times = iter([datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, 0, 0, 7, tzinfo=UTC)])
    service = EvidenceService(
        config=config(),
        identity=AgentIdentity.generate(),
        collector=EvidenceCollector(tee=ConfigfsTsm(emulation.root, fs=emulation)),
        metrics=AgentMetrics(),
        wall_clock=lambda: next(times),
    )

    async def main() -> list[bytes]:
        return [await service.collect(bytes(32)), await service.collect(bytes(32))]

    first, second = asyncio.run(main())
    claims = [Claims.parse(base64.b64decode(json.loads(d)["claims"])) for d in (first, second)]
    assert claims[1].issued_at - claims[0].issued_at == timedelta(seconds=7)
    assert service.recently_ok()
