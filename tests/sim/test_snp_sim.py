"""The SEV-SNP simulator round-trips through the production verifier, and only through it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from attestation import Checks, snp
from attestation._x509 import load_certificate, load_certificates
from attestation.errors import (
    CertificateChainError,
    MalformedError,
    PolicyError,
    RevokedError,
    SignatureError,
    VerificationError,
)
from attestation.guest import parse_certificate_table
from attestation.sim import DEFAULT_SEED, SNP_PRODUCTS, SimulatedSnp, SnpTcb

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = hashlib.sha512(b"nonce").digest()
MEASUREMENT = hashlib.sha384(b"my image").digest()


def verify(sim: SimulatedSnp, report: bytes, **kwargs: object) -> snp.VerifiedSnpReport:
    return snp.verify_report(
        report,
        vcek=sim.vcek_der(),
        now=NOW,
        roots=sim.trust_roots(),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("product", SNP_PRODUCTS)
@pytest.mark.parametrize("version", [3, 5])
def test_round_trip_through_verify_report(product: str, version: int) -> None:
    sim = SimulatedSnp(product=product)
    host_data = bytes(range(32))
    report = sim.report(
        NONCE,
        version=version,
        measurement=MEASUREMENT,
        policy=0x30000,
        vmpl=1,
        host_data=host_data,
        guest_svn=7,
    )
    assert len(report) == snp.REPORT_SIZE
    checks = Checks()
    verified = verify(sim, report, cert_chain=sim.cert_chain_pem(), checks=checks)
    parsed = verified.report
    assert verified.simulated
    assert verified.product == product
    assert verified.signing_key == "vcek"
    assert (parsed.version, parsed.vmpl, parsed.guest_svn) == (version, 1, 7)
    assert parsed.report_data == NONCE
    assert parsed.measurement == MEASUREMENT
    assert parsed.host_data == host_data
    assert parsed.chip_id == sim.chip_id
    assert parsed.reported_tcb_raw == sim.tcb.raw(product)
    assert verified.chip_id_checked
    assert all(check.passed for check in checks)
    assert any(c.name == "snp.report.signature" for c in checks)


def test_real_amd_roots_refuse_a_simulated_report() -> None:
    sim = SimulatedSnp()
    report = sim.report(NONCE)
    with pytest.raises(CertificateChainError):
        snp.verify_report(report, vcek=sim.vcek_der(), now=NOW)
    with pytest.raises(CertificateChainError):
        snp.verify_report(report, vcek=sim.vcek_der(), cert_chain=sim.cert_chain_pem(), now=NOW)


def test_simulated_roots_refuse_real_evidence_chains() -> None:
    # A real ARK supplied as the chain does not match the simulator's pinned ARK.
    sim = SimulatedSnp()
    real_chain = snp.DEFAULT_TRUST_ROOTS.for_product("Milan")
    assert real_chain.ask is not None
    bundle = real_chain.ask.der + real_chain.ark.der
    with pytest.raises((CertificateChainError, MalformedError)):
        verify(sim, sim.report(NONCE), cert_chain=bundle)


def test_another_seed_is_another_pki() -> None:
    other = SimulatedSnp(b"another seed")
    default = SimulatedSnp()
    assert other.ark_der() != default.ark_der()
    # Same names, other keys: the chain fails on a signature.
    with pytest.raises(VerificationError):
        snp.verify_report(
            other.report(NONCE), vcek=other.vcek_der(), now=NOW, roots=default.trust_roots()
        )


def test_derivation_is_deterministic() -> None:
    a, b = SimulatedSnp(DEFAULT_SEED), SimulatedSnp(DEFAULT_SEED)
    assert a.ark_der() == b.ark_der() and a.ask_der() == b.ask_der()
    assert a.vcek_der() == b.vcek_der()
    assert a.report(NONCE) == b.report(NONCE)  # RFC 6979 signatures
    assert SimulatedSnp().trust_roots() is SimulatedSnp().trust_roots()


def test_certificates_look_like_amds_and_say_simulated() -> None:
    sim = SimulatedSnp()
    ark, ask = load_certificate(sim.ark_der()), load_certificate(sim.ask_der())
    vcek = load_certificate(sim.vcek_der())
    assert ark.subject.get("CN") == "SIM-ARK-Milan" and ark.issuer.der == ark.subject.der
    assert ask.subject.get("CN") == "SIM-SEV-Milan"
    for cert in (ark, ask, vcek):
        assert cert.subject.get("O") == "Cube Simulator"
        assert "SIMULATED" in (cert.subject.get("OU") or "")
        assert cert.signature_algorithm.scheme == "rsa-pss"
        assert (cert.signature_algorithm.hash_name, cert.signature_algorithm.salt_length) == (
            "sha384",
            48,
        )
    assert ark.public_key().key_size == 4096  # type: ignore[union-attr]
    assert ask.public_key().key_size == 4096  # type: ignore[union-attr]
    assert vcek.serial == 0
    assert ark.is_ca() and ask.is_ca() and vcek.is_ca() is None
    chain = load_certificates(sim.cert_chain_pem())
    assert [c.der for c in chain] == [sim.ask_der(), sim.ark_der()]


@pytest.mark.parametrize("product", SNP_PRODUCTS)
def test_vcek_extensions(product: str) -> None:
    sim = SimulatedSnp(product=product)
    ext = snp.parse_vcek_extensions(load_certificate(sim.vcek_der()))
    assert ext.product == product
    assert ext.hwid_encoding == "raw"
    assert ext.hwid == sim.hwid and len(ext.hwid) == (8 if product == "Turin" else 64)
    assert (ext.bl_spl, ext.tee_spl, ext.snp_spl, ext.ucode_spl) == (
        sim.tcb.bootloader,
        sim.tcb.tee,
        sim.tcb.snp,
        sim.tcb.microcode,
    )
    assert ext.tcb_raw(snp.report.tcb_layout_for(product)) == sim.tcb.raw(product)
    if product == "Turin":
        assert ext.fmc_spl == sim.tcb.fmc and ext.struct_version == 1
        assert sim.chip_id == sim.hwid + bytes(56)


def test_vlek_signed_report() -> None:
    sim = SimulatedSnp(signing_key="vlek")
    verified = verify(sim, sim.report(NONCE))
    assert verified.signing_key == "vlek"
    assert not verified.chip_id_checked
    assert verified.extensions.csp_id == "cube-simulator.invalid"
    table = parse_certificate_table(sim.certificate_table())
    assert set(table) == {"vlek", "ask", "ark"} and table["ask"] == sim.asvk_der()


def test_chosen_tcb_and_chip() -> None:
    tcb = SnpTcb(bootloader=3, tee=1, snp=20, microcode=200)
    sim = SimulatedSnp(tcb=tcb, chip_id=bytes([7]) * 64)
    verified = verify(sim, sim.report(NONCE))
    assert verified.report.chip_id == bytes([7]) * 64
    assert verified.vcek_tcb.snp == 20 and verified.report.current_tcb.bootloader == 3


def test_reported_tcb_must_match_the_vcek() -> None:
    sim = SimulatedSnp()
    newer = SnpTcb(bootloader=9, tee=0, snp=30, microcode=219)
    with pytest.raises(CertificateChainError, match="TCB"):
        verify(sim, sim.report(NONCE, reported_tcb=newer))


def test_chip_id_must_match_the_vcek() -> None:
    sim = SimulatedSnp()
    with pytest.raises(CertificateChainError, match="CHIP_ID"):
        verify(sim, sim.report(NONCE, chip_id=bytes(64)))


@pytest.mark.parametrize("position", [*range(0, 0x2A0, 37), 0x2A0, 0x2E8 + 5])
def test_tampering_is_detected(position: int) -> None:
    sim = SimulatedSnp()
    report = bytearray(sim.report(NONCE))
    report[position] ^= 0x01
    with pytest.raises((SignatureError, CertificateChainError, MalformedError)):
        verify(sim, bytes(report))


def test_resigning_a_modified_report() -> None:
    sim = SimulatedSnp()
    report = bytearray(sim.report(NONCE))
    report[0x90:0xC0] = MEASUREMENT  # a different measurement, then re-signed
    verified = verify(sim, sim.sign(bytes(report)))
    assert verified.report.measurement == MEASUREMENT


def test_crl_from_the_simulated_ark() -> None:
    sim = SimulatedSnp()
    report = sim.report(NONCE)
    verified = verify(sim, report, crl=sim.crl_der())
    assert verified.crl_checked
    ask_serial = load_certificate(sim.ask_der()).serial
    with pytest.raises(RevokedError):
        verify(sim, report, crl=sim.crl_der(revoked=(ask_serial,)))


def test_policy_validation_of_simulated_reports() -> None:
    sim = SimulatedSnp()
    policy = snp.SnpPolicy.from_json({"measurements": [MEASUREMENT.hex()]})
    snp.validate_report(verify(sim, sim.report(NONCE, measurement=MEASUREMENT)), policy)
    with pytest.raises(PolicyError):
        snp.validate_report(verify(sim, sim.report(NONCE)), policy)  # other measurement
    debug = verify(sim, sim.report(NONCE, measurement=MEASUREMENT, policy=0x30000 | 1 << 19))
    with pytest.raises(PolicyError):
        snp.validate_report(debug, policy)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="product"):
        SimulatedSnp(product="Naples")
    sim = SimulatedSnp()
    with pytest.raises(ValueError, match="report_data"):
        sim.report(bytes(10))
    with pytest.raises(ValueError, match="version"):
        sim.report(NONCE, version=2)
    with pytest.raises(ValueError, match="measurement"):
        sim.report(NONCE, measurement=bytes(47))
