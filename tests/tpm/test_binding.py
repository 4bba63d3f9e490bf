"""Who the AK is: bound to the TEE report (Azure HCL) or certified (GCE AK certificate)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation import Checks
from attestation.azure import parse_hcl_report
from attestation.errors import BindingError, CertificateChainError, ValidityError
from attestation.tpm import (
    TpmtPublic,
    parse_public,
    public_key_der,
    same_public_key,
    verify_ak_binding,
    verify_ak_certificate,
    verify_quote,
)
from tests import vectors
from tests.tpm import _build
from tests.tpm._cases import case
from tests.tpm._protobuf import parse_gotpm_attestation

HCL_FILES = {
    "genoa": "sev-snp/genoa-v3-azure-trustee/hcl-report.bin",
    "milan": "sev-snp/milan-v2-azure-trustee/hcl-report.bin",
    "tdx": "tdx/azure-trustee/hcl-report.bin",
}
QUOTES = {
    "genoa": "tpm-azure-snp-genoa-vtpm",
    "milan": "tpm-azure-snp-milan-vtpm",
    "tdx": "tdx-v4-azure-trustee/tpm",
}


def _hcl_ak(name: str) -> rsa.RSAPublicKey:
    return parse_hcl_report(vectors.read(HCL_FILES[name])).ak_public


@pytest.mark.parametrize("name", list(HCL_FILES))
def test_azure_quote_ak_is_the_hcl_ak(name: str) -> None:
    """The quote verifies with the HCL runtime-data AK, which the TEE report binds."""
    c = case(QUOTES[name])
    ak = _hcl_ak(name)
    assert c.expected["ak_source"] == "HCL runtime JSON keys[kid=HCLAkPub] (RSA-2048)"
    assert ak.key_size == 2048
    checks = Checks()
    verify_ak_binding(ak, c.ak, checks=checks)
    assert checks.items[-1].name == "tpm.ak_binding" and checks.items[-1].passed
    verify_quote(
        attest=c.attest,
        signature=c.signature,
        ak=ak,
        pcrs=c.pcrs,
        qualifying_data=c.qualifying_data,
    )


@pytest.mark.parametrize("name", list(HCL_FILES))
def test_another_vms_ak_is_a_binding_error(name: str) -> None:
    for other in HCL_FILES:
        if other == name:
            continue
        assert not same_public_key(_hcl_ak(name), _hcl_ak(other))
        checks = Checks()
        with pytest.raises(BindingError) as info:
            verify_ak_binding(_hcl_ak(name), _hcl_ak(other), checks=checks)
        assert info.value.check == "tpm.ak_binding"
        assert checks.items[-1].expected is not None and checks.items[-1].actual is not None


def test_ak_forms_compare_equal() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    tpmt = parse_public(_build.public_ecc(key))
    assert same_public_key(tpmt, key)
    assert public_key_der(tpmt) == public_key_der(key)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert not same_public_key(tpmt, rsa_key)
    assert same_public_key(parse_public(_build.public_rsa(rsa_key)), rsa_key)
    with pytest.raises(BindingError):
        verify_ak_binding(tpmt, rsa_key)


def _rfc4514(attributes: tuple[tuple[str, str], ...]) -> str:
    """The manifest's form of a name: most specific first, commas in values escaped."""
    return ",".join(f"{k}={v.replace(',', chr(92) + ',')}" for k, v in reversed(attributes))


def _gce(vid: str) -> tuple[dict[str, Any], TpmtPublic, bytes, list[bytes]]:
    v = vectors.vector(vid)
    att = parse_gotpm_attestation(vectors.file_of(v, "pb"))
    chain = [vectors.read(f["path"]) for f in v["files"]["ak_chain"]]
    return v, parse_public(att.ak_pub), att.ak_cert, chain


@pytest.mark.parametrize("vid", ["tpm-gce-cos85-nonce", "tpm-gce-cos85-no-nonce"])
def test_gce_ak_certificate_chains_to_google_root(vid: str) -> None:
    v, ak, cert, (intermediate, root) = _gce(vid)
    assert v["chain_verified"] is True and v["ak_cert_key_matches_ak_pub"] is True
    checks = Checks()
    leaf = verify_ak_certificate(
        ak,
        cert,
        intermediates=[intermediate],
        root=root,
        now=vectors.time_inside(v),
        checks=checks,
    )
    assert leaf.sha256.hex() == v["ak_cert"]["sha256_der"]
    assert leaf.not_before.isoformat() == v["ak_cert"]["not_before"]
    assert leaf.not_after.isoformat() == v["ak_cert"]["not_after"]
    assert format(leaf.serial, "x") == v["ak_cert"]["serial"]
    assert str(leaf.subject) == v["ak_cert"]["subject"] == ""
    assert _rfc4514(leaf.issuer.attributes) == v["ak_cert"]["issuer"]
    assert v["ak_cert"]["sig_alg"] == "sha256WithRSAEncryption"
    assert str(leaf.signature_algorithm) == "rsa-pkcs1v15/sha256"
    assert checks.items[-1].name == "tpm.ak_cert.key" and checks.items[-1].passed


def test_gce_ak_certificate_failures() -> None:
    v, ak, cert, (intermediate, root) = _gce("tpm-gce-cos85-nonce")
    now = vectors.time_inside(v)
    with pytest.raises(ValidityError):
        verify_ak_certificate(
            ak, cert, intermediates=[intermediate], root=root, now=vectors.time_before(v)
        )
    with pytest.raises(CertificateChainError):
        verify_ak_certificate(ak, cert, root=root, now=now)  # intermediate missing
    amd_ark = vectors.read("roots/amd/ark_milan.pem")
    with pytest.raises(CertificateChainError):
        verify_ak_certificate(ak, cert, intermediates=[intermediate], root=amd_ark, now=now)
    other = parse_public(_build.public_rsa(rsa.generate_private_key(65537, 2048).public_key()))
    with pytest.raises(BindingError) as info:
        verify_ak_certificate(other, cert, intermediates=[intermediate], root=root, now=now)
    assert info.value.check == "tpm.ak_cert.key"
