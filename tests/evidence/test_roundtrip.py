"""Simulated evidence through the production collectors (ConfigfsTsm on the emulated
configfs-tsm, SevGuestDevice on simulated ioctls) and back through verify_evidence."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from attestation import evidence, snp, tdx
from attestation.errors import CollectionError, MalformedError
from attestation.guest import SevGuestDevice, TdxGuestDevice
from attestation.sim import SimulatedSevGuestIo, SimulatedTdx, SimulatedTdxGuestIo
from tests.cli import _util as u
from tests.evidence import _util as e

DEVICES = sorted(e.DEVICES)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip(device: str) -> None:
    claims = e.claims_bytes()
    document = e.collect(device, claims=claims)
    doc = json.loads(document)
    assert doc["format"] == "cube-evidence/1"
    assert doc["platform"] == e.PLATFORM_OF[device]
    assert set(doc) == {"format", "platform", "nonce", "claims", "tee"}

    verified = evidence.verify_evidence(
        document, nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    assert verified.platform == e.PLATFORM_OF[device]
    assert verified.simulated
    assert verified.nonce == e.NONCE
    assert verified.tpm is None
    assert verified.claims.raw == claims
    assert verified.claims.model_digest == e.MODEL_DIGEST
    assert verified.claims.config_digest == e.CONFIG_DIGEST
    assert verified.claims.issued_at == e.NOW
    assert verified.claims.tpm_ak_sha256 is None
    assert all(c.passed for c in verified.checks)
    fields = verified.fields()
    assert fields["claims"] == verified.claims.to_json()
    if doc["platform"] == "sim-sev-snp":
        assert isinstance(verified.tee, snp.VerifiedSnpReport)
        assert set(doc["tee"]) >= {"report", "vcek", "cert_chain"}
        assert fields["measurement"] == e.SIM_MEASUREMENT.hex()
    else:
        assert isinstance(verified.tee, tdx.VerifiedTdxQuote)
        assert set(doc["tee"]) == {"quote"}
        assert verified.tee.tcb_status == "UpToDate"  # against the simulator's collateral
    assert fields["report_data"] == evidence.report_data_for(e.NONCE, claims).hex()


def test_verification_order() -> None:
    """Shape, platform, nonce, claims, platform evidence, binding, then the policy."""
    verified = evidence.verify_evidence(
        e.collect(), nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    names = [c.name for c in verified.checks]

    def at(name: str) -> int:
        return names.index(name)

    first_snp = min(i for i, n in enumerate(names) if n.startswith("snp."))
    assert at("evidence.format") < at("policy.platform") < at("evidence.nonce")
    assert at("evidence.nonce") < at("evidence.claims") < first_snp
    assert at("snp.report.signature") < at("evidence.binding.report_data")
    assert at("evidence.binding.report_data") < at("policy.evidence_age")
    assert at("policy.evidence_age") < at("snp.policy.debug")
    assert names[-1] == "policy.platform"


def test_round_trip_through_the_cli(tmp_path: Path) -> None:
    """The same document verifies with ``cube attest verify --evidence``."""
    doc = tmp_path / "evidence.json"
    doc.write_bytes(e.collect())
    args: list[str | Path] = [
        "--evidence",
        doc,
        "--nonce",
        e.NONCE.hex(),
        "--at",
        e.NOW.isoformat(),
        "--json",
    ]
    refused = u.verify(*args)
    assert refused.exit_code == 5
    assert refused.json()["error"]["type"] == "SimulatedEvidenceError"
    run = u.verify(*args, "--allow-simulated")
    assert run.exit_code == 0, run.stdout
    out = run.json()
    assert out["platform"] == "sim-sev-snp" and out["verdict"] == "accept"
    assert out["fields"]["claims"]["model"]["digest"] == e.MODEL_DIGEST
    wrong = u.verify(*args[:3], e.OTHER_NONCE.hex(), *args[4:], "--allow-simulated")
    assert wrong.exit_code == 4
    assert wrong.json()["error"]["check"] == "evidence.nonce"
    shown = u.show("--evidence", doc, "--json")
    assert shown.exit_code == 0
    assert shown.json()["fields"]["nonce"] == e.NONCE.hex()
    assert "verdict" not in shown.json()
    human = u.verify(*args[:-1], "--allow-simulated")
    assert "SIMULATED" in human.stdout


def test_a_rejected_document_still_shows_its_fields(tmp_path: Path) -> None:
    """``--json`` on reject carries what the document says, as raw mode does."""
    doc = tmp_path / "evidence.json"
    doc.write_bytes(e.collect())
    args: list[str | Path] = [
        "--evidence",
        doc,
        "--nonce",
        e.NONCE.hex(),
        "--at",
        e.NOW.isoformat(),
    ]
    refused = u.verify(*args, "--json")  # simulated evidence, no --allow-simulated
    assert refused.exit_code == 5
    out = refused.json()
    assert out["verdict"] == "reject"
    assert out["fields"]["nonce"] == e.NONCE.hex()
    assert out["fields"]["measurement"] == e.SIM_MEASUREMENT.hex()
    assert out["fields"]["claims"]["model"]["digest"] == e.MODEL_DIGEST
    # A part that does not parse is left out; verification says why.
    bad_claims = tmp_path / "bad-claims.json"
    bad_claims.write_bytes(e.set_claims(e.collect(), b"not json"))
    refused = u.verify("--evidence", bad_claims, *args[2:], "--allow-simulated", "--json")
    assert refused.exit_code == 3
    out = refused.json()
    assert "claims" not in out["fields"] and "measurement" in out["fields"]


def test_collector_needs_a_source() -> None:
    with pytest.raises(CollectionError):
        evidence.EvidenceCollector(tee=None)


@pytest.mark.parametrize("nonce_len", [0, 16, 31, 65])
def test_collector_refuses_bad_nonce_lengths(nonce_len: int) -> None:
    collector = evidence.EvidenceCollector(tee=e.DEVICES["configfs-snp"]())
    with pytest.raises(MalformedError):
        collector.collect(bytes(nonce_len), e.claims_bytes())


def test_collector_refuses_snp_without_vcek() -> None:
    device = SevGuestDevice(io=SimulatedSevGuestIo(certificates=False))
    with pytest.raises(CollectionError, match="VCEK"):
        evidence.EvidenceCollector(tee=device).collect(e.NONCE, e.claims_bytes())


def test_collector_refuses_a_bare_tdreport() -> None:
    device = TdxGuestDevice(io=SimulatedTdxGuestIo())
    with pytest.raises(CollectionError):
        evidence.EvidenceCollector(tee=device).collect(e.NONCE, e.claims_bytes())


def test_tdx_collateral_travels_with_the_quote() -> None:
    collateral = SimulatedTdx().collateral_json()
    device = e.DEVICES["configfs-tdx"]()
    collector = evidence.EvidenceCollector(tee=device, tdx_collateral=collateral)
    document = collector.collect(e.NONCE, e.claims_bytes())
    assert base64.b64decode(json.loads(document)["tee"]["collateral"]) == collateral
    verified = evidence.verify_evidence(
        document, nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    assert isinstance(verified.tee, tdx.VerifiedTdxQuote)
    assert verified.tee.tcb_status == "UpToDate"
