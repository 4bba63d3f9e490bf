"""SEV-SNP refusals of certificates AMD would not issue, signed by the fake AMD PKI.

Each test pins the one check (by the name it records) that refuses: a product whose TCB layout
is not the report's, an ASK/ASVK that is not a CA, a link not signed with RSASSA-PSS/SHA-384, a
VCEK/VLEK without a P-384 key. Everything else about these reports and chains is valid.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from attestation import Checks
from attestation.errors import CertificateChainError
from attestation.snp import VerifiedSnpReport, parse_report, verify_report
from tests import vectors
from tests.snp.fakepki import INSIDE, FakeAmd, fake_amd, patch, reissued, sign_report

MILAN_V3 = "snp-milan-v3-oak"  # v3: CPUID names the product
MILAN_V2 = "snp-milan-v2-go-sev-guest"  # v2: no CPUID, the product comes from the VCEK
_PSS_SHA256 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def _sign(
    pki: FakeAmd,
    *,
    template: str = MILAN_V3,
    vlek: bool = False,
    turin_hwid: bool = False,
    **leaf: Any,
) -> tuple[bytes, bytes, bytes]:
    """(report, leaf certificate, chain): the template report re-signed by a leaf of ``pki``."""
    body = vectors.file_of(vectors.vector(template), "report")
    body = patch(body, 0x48, struct.pack("<I", int(vlek) << 2))  # SIGNING_KEY, MASK_CHIP_KEY=0
    hwid: bytes | None = None
    if turin_hwid:
        hwid = bytes(range(1, 9))  # Turin: 8-byte hwID, CHIP_ID is it and 56 zero bytes
        body = patch(body, 0x1A0, hwid + bytes(56))
    elif vlek:
        body = patch(body, 0x1A0, bytes(64))
    else:
        hwid = parse_report(body).chip_id
    tcb = parse_report(body).reported_tcb.components()
    key, cert = pki.leaf(tcb={**tcb, **leaf.pop("tcb", {})}, hwid=hwid, vlek=vlek, **leaf)
    return sign_report(body, key), cert, pki.chain_pem(vlek=vlek)


def _verify(pki: FakeAmd, signed: tuple[bytes, bytes, bytes], checks: Checks) -> VerifiedSnpReport:
    report, leaf, chain = signed
    return verify_report(
        report, vcek=leaf, cert_chain=chain, now=INSIDE, roots=pki.roots(), checks=checks
    )


def _refused_by(check: str, pki: FakeAmd, signed: tuple[bytes, bytes, bytes]) -> None:
    checks = Checks()
    with pytest.raises(CertificateChainError) as info:
        _verify(pki, signed, checks)
    assert info.value.check == check, info.value
    assert [c.name for c in checks if not c.passed] == [check]


@pytest.mark.parametrize("vlek", [False, True], ids=["vcek", "vlek"])
def test_unspoiled_fake_chain_verifies(vlek: bool) -> None:
    """The baseline the refusals below differ from in one respect only."""
    pki = fake_amd("Milan")
    checks = Checks()
    assert _verify(pki, _sign(pki, vlek=vlek), checks).signing_key == ("vlek" if vlek else "vcek")
    assert all(c.passed for c in checks)


def test_turin_vcek_for_a_v2_report_is_refused() -> None:
    """A v2 report (pre-Turin firmware, no CPUID) cannot be signed by a Turin VCEK."""
    pki = fake_amd("Turin")
    signed = _sign(pki, template=MILAN_V2, turin_hwid=True, tcb={"fmc": 0})
    report = parse_report(signed[0])
    assert report.product is None and report.tcb_layout == "pre-turin"
    _refused_by("snp.tcb_layout", pki, signed)


@pytest.mark.parametrize(("role", "vlek"), [("ask", False), ("asvk", True)])
def test_intermediate_that_is_not_a_ca_is_refused(role: str, vlek: bool) -> None:
    pki = reissued(fake_amd("Milan"), role, ca=False)
    _refused_by(f"snp.{role}.ca", pki, _sign(pki, vlek=vlek))


@pytest.mark.parametrize(
    ("role", "spoil"),
    [
        ("ark", {"rsa_padding": padding.PKCS1v15()}),
        ("ask", {"rsa_padding": padding.PKCS1v15()}),
        ("ask", {"rsa_padding": _PSS_SHA256, "hash_algorithm": hashes.SHA256()}),
        ("vcek", {"rsa_padding": padding.PKCS1v15()}),
        ("vcek", {"rsa_padding": _PSS_SHA256, "hash_algorithm": hashes.SHA256()}),
    ],
    ids=["ark-pkcs1", "ask-pkcs1", "ask-pss-sha256", "vcek-pkcs1", "vcek-pss-sha256"],
)
def test_amd_certificates_must_be_signed_with_pss_sha384(role: str, spoil: dict[str, Any]) -> None:
    base = fake_amd("Milan")
    if role == "vcek":
        pki, signed = base, _sign(base, **spoil)
    else:
        pki = reissued(base, role, **spoil)
        signed = _sign(pki)
    _refused_by(f"snp.{role}.algorithm", pki, signed)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP521R1()], ids=lambda c: c.name)
@pytest.mark.parametrize("vlek", [False, True], ids=["vcek", "vlek"])
def test_leaf_key_must_be_p384(curve: ec.EllipticCurve, vlek: bool) -> None:
    # The report is validly signed (ECDSA/SHA-384) by the leaf's key, only on the wrong curve.
    pki = fake_amd("Milan")
    _refused_by("snp.vcek.key", pki, _sign(pki, vlek=vlek, curve=curve))
