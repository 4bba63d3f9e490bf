"""Simulated evidence through the whole path: ConfigfsTsm on the emulation, the evidence
collector, verify_evidence; refused unless the policy allows simulated evidence."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from attestation import evidence
from attestation.errors import SimulatedEvidenceError
from attestation.guest import ConfigfsTsm, SevGuestDevice
from attestation.policy import Policy
from attestation.sim import EmulatedConfigfsTsm, SimulatedSevGuestIo

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = bytes(range(32))
CLAIMS = evidence.encode_claims(
    {
        "tls_cert_sha256": "00" * 32,
        "model": {"name": "tiny", "digest": "sha256:" + "11" * 32},
        "config_digest": "sha256:" + "22" * 32,
        "agent_version": "0.1.0",
        "issued_at": "2030-01-01T00:00:00Z",
    }
)
ALLOW_SIMULATED = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})
STRICT = Policy.from_json({"format": "cube-policy/1"})


@pytest.mark.parametrize(
    ("device", "platform"),
    [
        (lambda: ConfigfsTsm(fs=EmulatedConfigfsTsm.snp()), "sim-sev-snp"),
        (lambda: ConfigfsTsm(fs=EmulatedConfigfsTsm.tdx()), "sim-tdx"),
        (lambda: SevGuestDevice(io=SimulatedSevGuestIo()), "sim-sev-snp"),
    ],
)
def test_simulated_evidence_end_to_end(device: object, platform: str) -> None:
    assert callable(device)
    document = evidence.EvidenceCollector(tee=device()).collect(NONCE, CLAIMS)
    verified = evidence.verify_evidence(document, nonce=NONCE, policy=ALLOW_SIMULATED, now=NOW)
    assert verified.platform == platform and verified.simulated
    with pytest.raises(SimulatedEvidenceError):
        evidence.verify_evidence(document, nonce=NONCE, policy=STRICT, now=NOW)
