"""Verifying SEV-SNP reports: every vector, validity windows, tampering, chains and CRLs."""

from __future__ import annotations

import struct
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation._checks import Checks
from attestation._x509 import MAX_CRL_SIZE, load_certificate
from attestation.errors import (
    AttestationError,
    CertificateChainError,
    MalformedError,
    RevokedError,
    SignatureError,
    ValidityError,
)
from attestation.snp import (
    DEFAULT_TRUST_ROOTS,
    SnpTrustRoots,
    clear_caches,
    parse_report,
    parse_vcek_extensions,
    verify_report,
)
from attestation.snp.certs import product_of_name
from attestation.snp.verify import VerifiedSnpReport
from tests import vectors
from tests.snp._util import ids, report_bytes, signed_report, snp_vectors, vcek_and_chain
from tests.snp.fakepki import INSIDE, fake_amd, patch
from tests.tdx._util import synthetic_crl

SNP = snp_vectors()
GO_SEV = vectors.vector("snp-milan-v2-go-sev-guest")
GENOA = vectors.vector("snp-genoa-v5-oak")
TURIN = vectors.vector("snp-turin-v5-oak")
VLEK = vectors.vector("snp-milan-v3-vlek-aws-trustee")


def _verify(v: dict[str, Any], *, data: bytes | None = None, **kwargs: Any) -> VerifiedSnpReport:
    vcek, chain = vcek_and_chain(v)
    args: dict[str, Any] = {"vcek": vcek, "cert_chain": chain, "now": vectors.time_inside(v)}
    args.update(kwargs)
    return verify_report(parse_report(report_bytes(v) if data is None else data), **args)


@pytest.mark.parametrize("v", SNP, ids=ids(SNP))
def test_vector_verifies_with_expected_fields(v: dict[str, Any]) -> None:
    assert v["expected_verdict"] == "accept"
    checks = Checks()
    verified = _verify(v, checks=checks)
    fields = verified.fields()
    for key, value in v["parsed"].items():
        assert fields[key] == value, key
    assert verified.extensions.to_dict() == v["vcek_extensions"]
    assert verified.product == v["parsed"]["product"]
    assert verified.signing_key == ("vlek" if v["parsed"]["signing_key"] == 1 else "vcek")
    assert verified.simulated is False
    assert verified.vcek.sha256.hex() == v["vcek"]["sha256_der"]
    assert verified.chip_id_checked is v.get("chip_id_matches_vcek_hwid", False)
    assert all(c.passed for c in checks)
    names = {c.name for c in checks}
    assert {"snp.report.signature", "snp.vcek.tcb", "snp.chip_id", "snp.ark.self_signature"} <= (
        names
    )


@pytest.mark.parametrize("v", SNP, ids=ids(SNP))
def test_vector_verifies_without_supplied_chain(v: dict[str, Any]) -> None:
    vcek, _ = vcek_and_chain(v)
    verified = verify_report(report_bytes(v), vcek=vcek, now=vectors.time_inside(v))
    assert verified.product == v["parsed"]["product"]


@pytest.mark.parametrize("v", SNP, ids=ids(SNP))
def test_outside_validity_window(v: dict[str, Any]) -> None:
    for now in (vectors.time_after(v), vectors.time_before(v)):
        checks = Checks()
        with pytest.raises(ValidityError):
            _verify(v, now=now, checks=checks)
        failed = [c for c in checks if not c.passed]
        assert len(failed) == 1 and failed[0].name.endswith(".validity")


def test_window_edges_are_inclusive() -> None:
    vcek, _ = vcek_and_chain(GO_SEV)
    start = datetime.fromisoformat(GO_SEV["validity_window"]["not_before"])
    verify_report(report_bytes(GO_SEV), vcek=vcek, now=start)
    with pytest.raises(ValidityError):
        verify_report(report_bytes(GO_SEV), vcek=vcek, now=start - timedelta(seconds=1))


def test_naive_time_is_refused() -> None:
    with pytest.raises(MalformedError, match="timezone"):
        _verify(GO_SEV, now=vectors.time_inside(GO_SEV).replace(tzinfo=None))


def test_vlek_vector_records_why_chip_id_is_skipped() -> None:
    checks = Checks()
    verified = _verify(VLEK, checks=checks)
    assert verified.signing_key == "vlek"
    assert not verified.chip_id_checked
    chip = next(c for c in checks if c.name == "snp.chip_id")
    assert chip.passed and "VLEK" in chip.detail
    assert any(c.name.startswith("snp.asvk.") for c in checks)


@pytest.mark.parametrize("v", [GO_SEV, GENOA, TURIN], ids=["milan-v2", "genoa-v5", "turin-v5"])
def test_flipping_signed_bytes_is_rejected(v: dict[str, Any]) -> None:
    data = report_bytes(v)
    for pos in range(0, 0x2A0, 7):
        tampered = patch(data, pos, bytes([data[pos] ^ 0x01]))
        try:
            report = parse_report(tampered)
        except MalformedError:
            continue  # a reserved byte or a checked field: rejected at parse time
        expected: type[AttestationError] | tuple[type[AttestationError], ...] = SignatureError
        if 0x188 <= pos < 0x18B:
            expected = (SignatureError, CertificateChainError)  # CPUID names another product
        with pytest.raises(expected):
            _verify(v, data=report.raw)


@pytest.mark.parametrize("v", [GO_SEV, TURIN], ids=["milan-v2", "turin-v5"])
def test_flipping_signature_bytes_is_rejected(v: dict[str, Any]) -> None:
    data = report_bytes(v)
    for pos in [*range(0x2A0, 0x2A0 + 144, 5), 0x2A0, 0x2E7, 0x2E8, 0x32F]:
        tampered = patch(data, pos, bytes([data[pos] ^ 0x80]))
        with pytest.raises(SignatureError):
            _verify(v, data=tampered)
    for pos in (0x330, 0x400, 0x49F):
        with pytest.raises(MalformedError):
            parse_report(patch(data, pos, b"\x01"))


def test_zero_signature_is_rejected() -> None:
    data = report_bytes(GO_SEV)
    with pytest.raises(SignatureError):
        _verify(GO_SEV, data=patch(data, 0x2A0, bytes(144)))


def test_unsigned_report_is_rejected() -> None:
    data = patch(report_bytes(GO_SEV), 0x48, struct.pack("<I", 7 << 2))
    with pytest.raises(SignatureError, match="not signed"):
        _verify(GO_SEV, data=data)


def test_tampered_vcek_is_rejected() -> None:
    vcek, chain = vcek_and_chain(GO_SEV)
    assert vcek[:1] == b"\x30"  # DER
    outcomes: set[type[AttestationError]] = set()
    for pos in range(0, len(vcek), 11):
        tampered = patch(vcek, pos, bytes([vcek[pos] ^ 0x01]))
        with pytest.raises((MalformedError, SignatureError, CertificateChainError)) as info:
            verify_report(
                report_bytes(GO_SEV),
                vcek=tampered,
                cert_chain=chain,
                now=vectors.time_inside(GO_SEV),
            )
        outcomes.add(type(info.value))
    assert SignatureError in outcomes and MalformedError in outcomes


@pytest.mark.parametrize("data", [b"", b"\x30", b"garbage", b"-----BEGIN CERTIFICATE-----\n"])
def test_garbage_vcek_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedError):
        verify_report(report_bytes(GO_SEV), vcek=data, now=vectors.time_inside(GO_SEV))


def test_vcek_bundle_is_not_a_single_certificate() -> None:
    v = vectors.vector("snp-milan-v2-azure-trustee")
    with pytest.raises(MalformedError, match="one certificate"):
        verify_report(report_bytes(v), vcek=vectors.file_of(v, "vcek"), now=vectors.time_inside(v))


def test_wrong_product_chain() -> None:
    genoa_chain = vectors.read("roots/amd/ask_ark_genoa.pem")
    checks = Checks()
    with pytest.raises(CertificateChainError):
        _verify(GO_SEV, cert_chain=genoa_chain, checks=checks)
    assert [c.name for c in checks if not c.passed] == ["snp.chain.unexpected"]


def test_vcek_of_another_chip_or_product() -> None:
    genoa_vcek, _ = vcek_and_chain(GENOA)
    with pytest.raises(CertificateChainError, match="product"):
        _verify(vectors.vector("snp-milan-v3-oak"), vcek=genoa_vcek)
    other_milan_vcek, _ = vcek_and_chain(vectors.vector("snp-milan-v2-virtee"))
    with pytest.raises((SignatureError, CertificateChainError)):
        _verify(GO_SEV, vcek=other_milan_vcek)


def test_roots_without_the_product() -> None:
    only_genoa = SnpTrustRoots.of([DEFAULT_TRUST_ROOTS.for_product("Genoa")])
    with pytest.raises(CertificateChainError, match="Milan"):
        _verify(GO_SEV, roots=only_genoa, cert_chain=None)


def test_vlek_needs_the_asvk_and_a_vlek_certificate() -> None:
    vlek_cert, _ = vcek_and_chain(VLEK)
    milan = DEFAULT_TRUST_ROOTS.for_product("Milan")
    no_asvk = SnpTrustRoots.of([type(milan)(product="Milan", ark=milan.ark, ask=milan.ask)])
    with pytest.raises(CertificateChainError, match="ASVK"):
        _verify(VLEK, roots=no_asvk, cert_chain=None)
    # A VCEK presented for a VLEK-signed report (and the reverse) is refused.
    vcek, _ = vcek_and_chain(vectors.vector("snp-milan-v3-oak"))
    with pytest.raises(CertificateChainError, match="VLEK"):
        _verify(VLEK, vcek=vcek)
    with pytest.raises(CertificateChainError, match="VCEK"):
        _verify(vectors.vector("snp-milan-v3-oak"), vcek=vlek_cert)


def test_vlek_bundle_for_a_vcek_report_falls_back_to_the_pinned_ask() -> None:
    # The bundle's ASVK and ARK are AMD's own (pinned) certificates, but the ASVK does not
    # issue VCEKs: the pinned ASK is used, and the check record says which issuer verified.
    checks = Checks()
    _verify(GO_SEV, cert_chain=vectors.read("roots/amd/ask_ark_milan_vlek.pem"), checks=checks)
    link = next(c for c in checks if c.name == "snp.vcek.signature")
    assert "SEV-Milan" in link.detail


def test_foreign_ark_with_the_same_name_is_refused() -> None:
    fake = fake_amd("Milan")
    checks = Checks()
    with pytest.raises(CertificateChainError, match="pinned"):
        _verify(GO_SEV, cert_chain=fake.chain_pem(), checks=checks)
    assert [c.name for c in checks if not c.passed] == ["snp.chain.ark_pinned"]


def test_ask_not_signed_by_the_ark_is_refused() -> None:
    fake = fake_amd("Milan")
    real = DEFAULT_TRUST_ROOTS.for_product("Milan")
    # Fake ASK named like AMD's, presented with AMD's real ARK: its signature does not verify.
    chain = fake.ask.public_bytes(Encoding.PEM) + vectors.read("roots/amd/ark_milan.pem")
    assert fake.ask.subject.public_bytes() == real.ask.subject.der  # type: ignore[union-attr]
    with pytest.raises((SignatureError, CertificateChainError)):
        _verify(GO_SEV, cert_chain=chain)


# -- signed by the fake PKI: cases the vectors do not have -------------------------------------


def test_fake_pki_report_verifies_and_is_marked_simulated() -> None:
    s = signed_report()
    verified = verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)
    assert verified.simulated is True
    assert verified.chip_id_checked
    with pytest.raises((CertificateChainError, SignatureError)):
        verify_report(s.report, vcek=s.vcek, now=s.now)  # not under AMD's roots


def test_mask_chip_key_skips_chip_id_and_says_why() -> None:
    s = signed_report(mask_chip_key=True, omit_hwid=True)
    checks = Checks()
    verified = verify_report(
        s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots, checks=checks
    )
    assert not verified.chip_id_checked
    assert "MASK_CHIP_KEY" in verified.chip_id_note
    assert "MASK_CHIP_KEY" in next(c for c in checks if c.name == "snp.chip_id").detail


def test_chip_id_mismatch_and_missing_hwid() -> None:
    s = signed_report(hwid=bytes(range(64)))
    with pytest.raises(CertificateChainError, match="CHIP_ID"):
        verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)
    s = signed_report(omit_hwid=True)
    with pytest.raises(CertificateChainError, match="hwID"):
        verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)


def test_vcek_tcb_must_equal_reported_tcb() -> None:
    parsed = parse_report(vectors.file_of(vectors.vector("snp-milan-v3-oak"), "report"))
    tcb = parsed.reported_tcb.components()
    tcb["microcode"] += 1
    s = signed_report(leaf_tcb=tcb)
    with pytest.raises(CertificateChainError, match="REPORTED_TCB"):
        verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)


def test_expired_leaf_is_a_validity_error() -> None:
    s = signed_report(not_after=INSIDE - timedelta(days=1))
    with pytest.raises(ValidityError):
        verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)


def test_crl_current_and_not_listing_passes() -> None:
    s = signed_report()
    checks = Checks()
    verified = verify_report(
        s.report,
        vcek=s.vcek,
        cert_chain=s.chain,
        crl=fake_amd().crl(revoked_serials=(12345,)),
        now=s.now,
        roots=s.roots,
        checks=checks,
    )
    assert verified.crl_checked
    assert {"snp.crl.signature", "snp.crl.validity", "snp.crl.ask", "snp.crl.vcek"} <= {
        c.name for c in checks
    }


@pytest.mark.parametrize("serial", [0x10001, 1])
def test_crl_listing_the_ask_or_vcek_revokes(serial: int) -> None:
    s = signed_report()
    with pytest.raises(RevokedError):
        verify_report(
            s.report,
            vcek=s.vcek,
            cert_chain=s.chain,
            crl=fake_amd().crl(revoked_serials=(serial,)),
            now=s.now,
            roots=s.roots,
        )


def test_crl_outside_its_window_or_signed_by_another_key() -> None:
    s = signed_report()
    pki = fake_amd()
    stale = pki.crl(this_update=INSIDE - timedelta(days=60), next_update=INSIDE - timedelta(days=1))
    with pytest.raises(ValidityError):
        verify_report(s.report, vcek=s.vcek, crl=stale, now=s.now, roots=s.roots)
    forged = pki.crl(key=pki.ask_key)
    with pytest.raises(SignatureError):
        verify_report(s.report, vcek=s.vcek, crl=forged, now=s.now, roots=s.roots)
    with pytest.raises(MalformedError):
        verify_report(s.report, vcek=s.vcek, crl=b"not a crl", now=s.now, roots=s.roots)


def test_crl_from_another_issuer_is_refused() -> None:
    s = signed_report()
    genoa_crl = fake_amd("Genoa").crl()
    with pytest.raises(CertificateChainError, match="not issued"):
        verify_report(s.report, vcek=s.vcek, crl=genoa_crl, now=s.now, roots=s.roots)


def _crl_with_version(version: int) -> bytes:
    """A CRL whose TBSCertList version INTEGER (02 01 01, v2) says ``version`` instead."""
    crl = bytearray(fake_amd().crl())
    at = crl.index(b"\x02\x01\x01")
    crl[at + 2] = version
    return bytes(crl)


@pytest.mark.parametrize("version", [0x02, 0x40, 0x7F])
def test_crl_with_an_unknown_version_is_malformed(version: int) -> None:
    # cryptography raises x509.InvalidVersion for these, which is not a ValueError.
    s = signed_report()
    with pytest.raises(MalformedError, match=r"CRL does not parse.*InvalidVersion"):
        verify_report(
            s.report, vcek=s.vcek, crl=_crl_with_version(version), now=s.now, roots=s.roots
        )


def test_crl_larger_than_the_cap_is_refused_before_parsing() -> None:
    s = signed_report()
    large = synthetic_crl(MAX_CRL_SIZE // 20 + 100)  # well formed, ~52,000 entries
    assert len(large) > MAX_CRL_SIZE
    with pytest.raises(MalformedError, match="larger than"):
        verify_report(s.report, vcek=s.vcek, crl=large, now=s.now, roots=s.roots)


# -- caching ----------------------------------------------------------------------------------


def test_cache_never_keeps_a_report_verdict() -> None:
    clear_caches()
    first, second = Checks(), Checks()
    _verify(GO_SEV, checks=first)
    _verify(GO_SEV, checks=second)
    cached = [c.name for c in second if "(cached)" in c.detail]
    assert "snp.ark.self_signature" in cached and "snp.ask.signature" in cached
    assert not any("(cached)" in c.detail for c in first)
    report = next(c for c in second if c.name == "snp.report.signature")
    assert "(cached)" not in report.detail
    # A tampered report after a good one with the same VCEK still fails.
    data = report_bytes(GO_SEV)
    with pytest.raises(SignatureError):
        _verify(GO_SEV, data=patch(data, 0x50, bytes([data[0x50] ^ 1])))
    # And validity is evaluated on every call, cached links or not.
    with pytest.raises(ValidityError):
        _verify(GO_SEV, now=vectors.time_after(GO_SEV))


def test_extensions_of_every_vcek() -> None:
    for v in SNP:
        vcek, _ = vcek_and_chain(v)
        ext = parse_vcek_extensions(load_certificate(vcek))
        assert ext.to_dict() == v["vcek_extensions"]
        assert product_of_name(ext.product_name) == v["parsed"]["product"]
