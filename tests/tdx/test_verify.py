"""Verifying TDX quotes: manifest verdicts, tampering, collateral, validity windows, revocation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from datetime import datetime, timedelta
from typing import Any

import pytest

from attestation import Checks, tdx
from attestation.azure import parse_hcl_report, verify_hcl_binding
from attestation.errors import (
    AttestationError,
    BindingError,
    CertificateChainError,
    CollateralError,
    MalformedError,
    RevokedError,
    SignatureError,
    ValidityError,
)
from tests import vectors
from tests.tdx._util import (
    EXPECTED_STATUS,
    TDX_VECTORS,
    VECTOR_IDS,
    WITH_COLLATERAL,
    collateral_for,
    pcs_qe_identity_body,
    quote_bytes,
    verify,
)

PHALA = vectors.vector("tdx-v4-phala-uptodate")
V5 = vectors.vector("tdx-v5-go-tdx-guest")
TRUSTEE4 = vectors.vector("tdx-v4-trustee-4")
TRUSTEE6 = vectors.vector("tdx-v4-trustee-6-module3")
GCP = vectors.vector("tdx-v4-gcp-cos-go-tdx-guest")
AZURE = vectors.vector("tdx-v4-azure-trustee")


@pytest.fixture(params=TDX_VECTORS, ids=VECTOR_IDS)
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    v: dict[str, Any] = request.param
    return v


# ---------------------------------------------------------------------------------------------
# Manifest verdicts
# ---------------------------------------------------------------------------------------------


def test_expected_status_table_matches_manifest(vector: dict[str, Any]) -> None:
    expected = EXPECTED_STATUS[vector["id"]]
    verdict = vector["expected_verdict"]
    if expected is None:
        assert "no collateral" in verdict
    else:
        assert expected in verdict


def test_vector_verifies_with_expected_tcb_status(vector: dict[str, Any]) -> None:
    checks = Checks()
    quote = tdx.parse_quote(quote_bytes(vector))
    verified = tdx.verify_quote(
        quote, collateral=collateral_for(vector), now=vectors.time_inside(vector), checks=checks
    )
    assert verified.tcb_status == EXPECTED_STATUS[vector["id"]]
    assert all(c.passed for c in checks)
    names = [c.name for c in checks]
    for required in (
        "tdx.pck_chain.root",
        "tdx.pck_chain.0.signature",
        "tdx.qe_report.signature",
        "tdx.qe_report.attestation_key",
        "tdx.quote.signature",
        "tdx.tcb.status",
    ):
        assert required in names
    assert vector["signature_verified"] and vector["chain_verified"]


def test_tcb_evaluation_matches_manifest(vector: dict[str, Any]) -> None:
    verified = verify(vector)
    if "collateral" not in vector:
        assert verified.tcb is None and verified.collateral is None
        assert verified.revocation_checked is False
        return
    assert verified.tcb is not None
    got: dict[str, Any] = verified.tcb.fields()
    coll = vector["collateral"]
    for key, expected in coll["tcb_status"].items():
        assert got["tcb_status"][key] == expected, key
    for key, expected in coll["qe_identity_status"].items():
        assert got["qe_identity_status"][key] == expected, key
    if "expected_overall_status" in coll:
        assert verified.tcb_status == coll["expected_overall_status"]
    assert verified.collateral is not None
    tcb_info = verified.collateral.tcb_info.fields()
    for key, expected in coll["tcb_info"].items():
        if key == "fmspc":
            assert tcb_info[key] == expected.lower()
        else:
            assert tcb_info[key] == expected, key
    assert verified.revocation_checked is ("pck_crl" in coll and "root_ca_crl" in coll)


def test_crl_details_match_manifest(vector: dict[str, Any]) -> None:
    coll = vector.get("collateral", {})
    collateral = collateral_for(vector)
    for key, crl in (("pck_crl", "pck_crl"), ("root_ca_crl", "root_crl")):
        if key not in coll:
            continue
        assert collateral is not None
        parsed = getattr(collateral, crl)
        assert parsed is not None
        assert parsed.this_update.isoformat() == coll[key]["this_update"]
        assert parsed.next_update.isoformat() == coll[key]["next_update"]


def test_pck_chain_summary_matches_manifest(vector: dict[str, Any]) -> None:
    fields: dict[str, Any] = verify(vector, collateral=None).fields()
    assert fields["pck_chain"] == vector["pck_chain"]
    # The manifest lists the mandatory SGX extensions; ours adds the optional platform ones.
    for key, expected in vector["pck_extensions"].items():
        assert fields["pck_extensions"][key] == expected, key


def test_advisory_ids_are_reported() -> None:
    # v5 quote, module TDX_01 at ISVSVN 4 would be OutOfDate with two advisories; the real quote
    # is at 11 (UpToDate) so there are none.
    verified = verify(V5)
    assert verified.advisory_ids == ()
    assert verified.tcb is not None
    assert verified.tcb.module_identity == "TDX_01"
    assert verified.tcb.module_status == "UpToDate"


def test_fields_are_json_serialisable(vector: dict[str, Any]) -> None:
    json.dumps(verify(vector).fields())


def test_report_data_property() -> None:
    verified = verify(GCP)
    assert verified.report_data == vectors.file_of(GCP, "nonce")


def test_azure_quote_binds_hcl_runtime_data() -> None:
    verified = verify(AZURE)
    hcl = parse_hcl_report(vectors.file_of(AZURE, "hcl"))
    assert hcl.report_type == "tdx"
    verify_hcl_binding(hcl, verified.quote.report_data)
    with pytest.raises(BindingError):
        verify_hcl_binding(hcl, verify(GCP).quote.report_data)


def test_now_must_be_timezone_aware() -> None:
    quote = tdx.parse_quote(quote_bytes(GCP))
    with pytest.raises(MalformedError):
        tdx.verify_quote(quote, collateral=None, now=datetime(2026, 1, 1))


# ---------------------------------------------------------------------------------------------
# Tampering with the quote
# ---------------------------------------------------------------------------------------------


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _expect_rejected(v: dict[str, Any], data: bytes, allowed: tuple[type[Exception], ...]) -> None:
    with pytest.raises(allowed):
        verify(v, data=data)


@pytest.mark.parametrize("v", [PHALA, V5], ids=["v4", "v5"])
def test_flipping_signed_bytes(v: dict[str, Any]) -> None:
    data = quote_bytes(v)
    quote = tdx.parse_quote(data)
    signed = len(quote.signed_data)
    # Version / key type / TEE type / v5 body descriptor are checked while parsing.
    structural = set(range(8)) | (set(range(48, 54)) if quote.version == 5 else set())
    for offset in [*range(0, signed, 7), signed - 1]:
        tampered = _flip(data, offset)
        if offset in structural:
            _expect_rejected(v, tampered, (MalformedError,))
        else:
            with pytest.raises(SignatureError):
                verify(v, data=tampered)


@pytest.mark.parametrize("v", [PHALA, V5], ids=["v4", "v5"])
def test_flipping_signature_data(v: dict[str, Any]) -> None:
    data = quote_bytes(v)
    start = len(tdx.parse_quote(data).signed_data) + 4
    quote_sig = range(start, start + 64)
    attest_key = range(start + 64, start + 128)
    qe_report = range(start + 134, start + 134 + 384)
    qe_sig = range(start + 518, start + 582)
    qe_auth = range(start + 584, start + 584 + 32)
    reserved = {*range(20, 32), *range(96, 128), *range(160, 192), *range(262, 304)}
    for region in (quote_sig, attest_key, qe_report, qe_sig, qe_auth):
        for offset in [*region[::5], region[-1]]:
            tampered = _flip(data, offset)
            if region is qe_report and (offset - region[0]) in reserved:
                _expect_rejected(v, tampered, (MalformedError,))
            else:
                with pytest.raises(SignatureError):
                    verify(v, data=tampered)


def test_flipping_trailing_bytes_is_harmless() -> None:
    data = quote_bytes(PHALA)
    assert verify(PHALA, data=_flip(data, len(data) - 1)).tcb_status == "UpToDate"
    assert verify(PHALA, data=data + b"more").quote.trailing.endswith(b"more")


def test_swapped_attestation_key_and_signature_from_another_quote() -> None:
    a = quote_bytes(PHALA)
    b = quote_bytes(TRUSTEE6)
    sa = len(tdx.parse_quote(a).signed_data) + 4
    sb = len(tdx.parse_quote(b).signed_data) + 4
    # Quote signature + attestation key of b on the body of a: QE report no longer binds it.
    mixed = a[:sa] + b[sb : sb + 128] + a[sa + 128 :]
    with pytest.raises(SignatureError, match="attestation key"):
        verify(PHALA, data=mixed)


def test_pck_chain_from_another_platform() -> None:
    a = quote_bytes(PHALA)
    b = quote_bytes(TRUSTEE6)
    qa, qb = tdx.parse_quote(a), tdx.parse_quote(b)
    pem_a = qa.signature_data.certification.pck_chain_pem
    pem_b = qb.signature_data.certification.pck_chain_pem
    assert len(pem_a) == len(pem_b)
    mixed = a.replace(pem_a, pem_b)
    with pytest.raises(SignatureError, match="QE report signature"):
        verify(PHALA, data=mixed, collateral=None)


def test_chain_to_another_root_is_rejected() -> None:
    quote = tdx.parse_quote(quote_bytes(PHALA))
    tcb_signer = tdx.embedded_tcb_signing_chain()[0]
    with pytest.raises(CertificateChainError):
        tdx.verify_quote(quote, collateral=None, now=vectors.time_inside(PHALA), root=tcb_signer)


def test_pck_certificate_outside_validity() -> None:
    for v in (GCP, AZURE):
        with pytest.raises(ValidityError):
            verify(v, now=vectors.time_after(v))
        with pytest.raises(ValidityError):
            verify(v, now=vectors.time_before(v))


def test_without_collateral_the_qe_must_be_intels() -> None:
    quote = tdx.parse_quote(quote_bytes(GCP))
    checks = Checks()
    tdx.verify_quote(quote, collateral=None, now=vectors.time_inside(GCP), checks=checks)
    assert "tdx.qe_report.mrsigner" in [c.name for c in checks]


# ---------------------------------------------------------------------------------------------
# Collateral: tampering, mismatches, validity windows
# ---------------------------------------------------------------------------------------------


def _phala_doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vectors.read(PHALA["files"]["collateral_phala"]["path"]))
    return data


def _verify_phala_with(doc: dict[str, Any], *, now: datetime | None = None) -> tdx.VerifiedTdxQuote:
    collateral = tdx.Collateral.from_json(json.dumps(doc).encode())
    return verify(PHALA, collateral=collateral, now=now)


def test_reencoded_json_document_still_verifies() -> None:
    # The outer document is re-serialised; the signed strings inside are unchanged.
    assert _verify_phala_with(_phala_doc()).tcb_status == "UpToDate"


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [
        ("tcb_info", '"tcbStatus":"UpToDate"', '"tcbStatus":"OutOfDate"'),
        ("tcb_info", '"pcesvn":11', '"pcesvn":10'),
        ("tcb_info", '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18'),
        ("qe_identity", '"isvsvn":4', '"isvsvn":3'),
        ("qe_identity", '"nextUpdate":"2025-07-19', '"nextUpdate":"2035-07-19'),
    ],
)
def test_tampered_signed_collateral(key: str, old: str, new: str) -> None:
    doc = _phala_doc()
    assert old in doc[key]
    doc[key] = doc[key].replace(old, new, 1)
    with pytest.raises(SignatureError):
        _verify_phala_with(doc)


def test_whitespace_inside_signed_json_breaks_the_signature() -> None:
    doc = _phala_doc()
    doc["tcb_info"] = doc["tcb_info"].replace(",", ", ", 1)
    with pytest.raises(SignatureError):
        _verify_phala_with(doc)


@pytest.mark.parametrize("key", ["tcb_info_signature", "qe_identity_signature"])
def test_tampered_collateral_signature(key: str) -> None:
    doc = _phala_doc()
    sig = bytearray.fromhex(doc[key])
    sig[10] ^= 0x40
    doc[key] = sig.hex()
    with pytest.raises(SignatureError):
        _verify_phala_with(doc)


@pytest.mark.parametrize("key", ["pck_crl", "root_ca_crl"])
def test_tampered_crl(key: str) -> None:
    doc = _phala_doc()
    der = bytearray.fromhex(doc[key])
    der[-80] ^= 0x01  # inside the signature value or the tbs, never the DER framing
    doc[key] = der.hex()
    with pytest.raises((SignatureError, MalformedError)):
        _verify_phala_with(doc)


def test_crl_from_the_wrong_issuer() -> None:
    doc = _phala_doc()
    doc["root_ca_crl"], doc["pck_crl"] = doc["pck_crl"], doc["root_ca_crl"]
    with pytest.raises(CollateralError):
        _verify_phala_with(doc)


def test_tcb_info_of_another_platform() -> None:
    # Genuine, currently valid collateral for FMSPC 00A06D080000; the quote's PCK is B0C06F000000.
    collateral = collateral_for(TRUSTEE6)
    with pytest.raises(CollateralError, match="FMSPC"):
        verify(PHALA, collateral=collateral, now=vectors.time_inside(TRUSTEE6))


def test_tcb_info_of_another_platform_in_json_form() -> None:
    doc = _phala_doc()
    other = json.loads(
        vectors.read(
            vectors.vector("tdx-v5-phala-tcb-not-supported")["files"]["collateral_phala"]["path"]
        )
    )
    for key in ("tcb_info", "tcb_info_signature", "tcb_info_issuer_chain"):
        doc[key] = other[key]
    # Validly signed, but for 2026 and another FMSPC: rejected either way.
    with pytest.raises((CollateralError, ValidityError)):
        _verify_phala_with(doc)


def test_tcb_info_signed_by_a_non_tcb_signing_chain() -> None:
    doc = _phala_doc()
    doc["tcb_info_issuer_chain"] = doc["pck_crl_issuer_chain"]
    with pytest.raises(CollateralError, match="TCB Signing"):
        _verify_phala_with(doc)


def test_tcb_signing_chain_to_a_foreign_root() -> None:
    quote = tdx.parse_quote(quote_bytes(PHALA))
    collateral = collateral_for(PHALA)
    assert collateral is not None
    pck_ca = quote.pck_chain[1]
    with pytest.raises(CertificateChainError):
        tdx.verify_quote(quote, collateral=collateral, now=vectors.time_inside(PHALA), root=pck_ca)


@pytest.mark.parametrize("v", WITH_COLLATERAL, ids=[v["id"] for v in WITH_COLLATERAL])
def test_collateral_expired_or_not_yet_valid(v: dict[str, Any]) -> None:
    with pytest.raises(ValidityError):
        verify(v, now=vectors.time_after(v))
    with pytest.raises(ValidityError):
        verify(v, now=vectors.time_before(v))


def test_collateral_window_edges() -> None:
    window = PHALA["collateral"]["validity_window"]
    start = datetime.fromisoformat(window["not_before"])
    end = datetime.fromisoformat(window["not_after"])
    assert verify(PHALA, now=start).tcb_status == "UpToDate"
    assert verify(PHALA, now=end).tcb_status == "UpToDate"
    with pytest.raises(ValidityError):
        verify(PHALA, now=start - timedelta(seconds=1))
    with pytest.raises(ValidityError):
        verify(PHALA, now=end + timedelta(seconds=1))


def test_revoked_pck_certificate() -> None:
    collateral = collateral_for(PHALA)
    assert collateral is not None and collateral.pck_crl is not None
    leaf = tdx.parse_quote(quote_bytes(PHALA)).pck_chain[0]
    listed = dataclasses.replace(
        collateral.pck_crl, revoked_serials=collateral.pck_crl.revoked_serials | {leaf.serial}
    )
    with pytest.raises(RevokedError):
        verify(PHALA, collateral=dataclasses.replace(collateral, pck_crl=listed))


def test_revoked_pck_platform_ca() -> None:
    collateral = collateral_for(PHALA)
    assert collateral is not None and collateral.root_crl is not None
    platform_ca = tdx.parse_quote(quote_bytes(PHALA)).pck_chain[1]
    listed = dataclasses.replace(
        collateral.root_crl, revoked_serials=frozenset({platform_ca.serial})
    )
    with pytest.raises(RevokedError):
        verify(PHALA, collateral=dataclasses.replace(collateral, root_crl=listed))


def test_revoked_tcb_signing_certificate() -> None:
    collateral = collateral_for(PHALA)
    assert collateral is not None and collateral.root_crl is not None
    signer = collateral.tcb_info_signed.issuer_chain[0]
    listed = dataclasses.replace(collateral.root_crl, revoked_serials=frozenset({signer.serial}))
    with pytest.raises(RevokedError):
        verify(PHALA, collateral=dataclasses.replace(collateral, root_crl=listed))


def test_crls_are_optional_but_recorded() -> None:
    collateral = collateral_for(PHALA)
    assert collateral is not None
    bare = dataclasses.replace(collateral, pck_crl=None, root_crl=None)
    checks = Checks()
    quote = tdx.parse_quote(quote_bytes(PHALA))
    verified = tdx.verify_quote(
        quote, collateral=bare, now=vectors.time_inside(PHALA), checks=checks
    )
    assert verified.revocation_checked is False
    details = {c.name: c.detail for c in checks}
    assert "not checked" in details["tdx.collateral.pck_crl"]
    assert "not checked" in details["tdx.collateral.root_ca_crl"]


def test_pcs_collateral_with_explicit_issuer_chain() -> None:
    """An explicit chain is checked for validity: the 2025 TCB Signing cert is not valid in 2023."""
    pcs = TRUSTEE4["files"]["collateral_pcs"]
    chain = vectors.read("roots/intel/intel-sgx-tcb-signing-chain.pem")
    explicit = tdx.Collateral.from_pcs(
        vectors.read(pcs["tcb_info"]["path"]),
        vectors.read(pcs["qe_identity"]["path"]),
        issuer_chain=chain,
    )
    with pytest.raises(ValidityError):
        verify(TRUSTEE4, collateral=explicit)
    embedded = tdx.Collateral.from_pcs(
        vectors.read(pcs["tcb_info"]["path"]), vectors.read(pcs["qe_identity"]["path"])
    )
    assert verify(TRUSTEE4, collateral=embedded).tcb_status == "UpToDate"


def test_pcs_body_whitespace_outside_the_signed_value() -> None:
    pcs = TRUSTEE6["files"]["collateral_pcs"]
    body = vectors.read(pcs["tcb_info"]["path"]).strip()
    prefix, marker = b'{"tcbInfo":', b',"signature":'
    assert body.startswith(prefix) and body.count(marker) == 1
    value, signature = body[len(prefix) : -1].split(marker)
    spaced = b'\n{ "tcbInfo" :\t' + value + b' ,\n  "signature" : ' + signature + b" }\n"
    collateral = tdx.Collateral.from_pcs(spaced, vectors.read(pcs["qe_identity"]["path"]))
    assert collateral.tcb_info_signed.body == value
    assert verify(TRUSTEE6, collateral=collateral).tcb_status == "OutOfDate"


def test_qe_identity_of_another_enclave() -> None:
    collateral = collateral_for(PHALA)
    assert collateral is not None
    wrong = dataclasses.replace(collateral.qe_identity, mrsigner=bytes(32))
    with pytest.raises(CollateralError, match="MRSIGNER"):
        verify(PHALA, collateral=dataclasses.replace(collateral, qe_identity=wrong))
    wrong = dataclasses.replace(collateral.qe_identity, isvprodid=1)
    with pytest.raises(CollateralError, match="ISVPRODID"):
        verify(PHALA, collateral=dataclasses.replace(collateral, qe_identity=wrong))


def test_mixed_collateral_v5() -> None:
    collateral = collateral_for(V5)
    assert collateral is not None and collateral.source == "mixed"
    assert collateral.tcb_info.fmspc.hex() == "90c06f000000"
    assert verify(V5, collateral=collateral).tcb_status == "UpToDate"


def test_qe_identity_body_round_trip() -> None:
    donor = collateral_for(vectors.vector("tdx-v5-phala-tcb-not-supported"))
    assert donor is not None
    body = pcs_qe_identity_body(donor.qe_identity_signed)
    again = tdx.Collateral.from_pcs(
        vectors.read(V5["files"]["collateral_pcs"]["tcb_info"]["path"]), body
    )
    assert again.qe_identity_signed.body == donor.qe_identity_signed.body


def test_every_failure_is_an_attestation_error() -> None:
    data = quote_bytes(PHALA)
    for offset in range(0, len(data), 97):
        with contextlib.suppress(AttestationError):
            verify(PHALA, data=_flip(data, offset))


def test_length_field_tamper_is_malformed() -> None:
    data = quote_bytes(PHALA)
    at = len(tdx.parse_quote(data).signed_data)
    with pytest.raises(MalformedError):
        verify(PHALA, data=data[:at] + struct.pack("<I", 1) + data[at + 4 :])
