"""Azure evidence inside cube-evidence/1: the SNP report comes in an HCL report whose runtime
data names the vTPM AK, and the binding rides on the vTPM quote made with that AK.

Built from the real Azure vector (genoa-v3-azure-trustee): its vTPM quote answers trustee's
nonce, not ours, so verification must get through the SNP report, the HCL binding and the AK
binding, and stop at the quote's qualifying data."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation import evidence
from attestation._checks import Checks
from attestation.azure import parse_hcl_report
from attestation.errors import AttestationError, BindingError, MalformedError
from attestation.policy import Policy
from tests import vectors
from tests.evidence import _util as e
from tests.tpm import _build as build

V = vectors.vector("snp-genoa-v3-azure-trustee")
NOW = vectors.time_inside(V)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def azure_document(*, ak_public: bytes | None = None, with_tpm: bool = True) -> bytes:
    hcl = vectors.file_of(V, "hcl")
    ak = parse_hcl_report(hcl).ak_public
    assert isinstance(ak, rsa.RSAPublicKey)
    quote = json.loads(vectors.file_of(V, "evidence_json"))["quote"]
    signature = bytes(quote["signature"])
    doc: dict[str, Any] = {
        "format": "cube-evidence/1",
        "platform": "sev-snp",
        "nonce": e.NONCE.hex(),
        "claims": _b64(e.claims_bytes(issued_at=NOW.isoformat())),
        "tee": {
            "hcl_report": _b64(hcl),
            "vcek": _b64(vectors.file_of(V, "vcek")),
            "cert_chain": _b64(vectors.file_of(V, "chain")),
        },
    }
    if with_tpm:
        doc["tpm"] = {
            "quote": _b64(bytes(quote["message"])),
            # TPMT_SIGNATURE: RSASSA, SHA-256, TPM2B signature
            "signature": _b64(struct.pack(">HHH", 0x0014, 0x000B, len(signature)) + signature),
            "ak_public": _b64(ak_public if ak_public is not None else build.public_rsa(ak)),
            "pcrs": {"sha256": {str(i): bytes(v).hex() for i, v in enumerate(quote["pcrs"])}},
        }
    return json.dumps(doc).encode()


def _refuse(document: bytes) -> tuple[AttestationError, Checks]:
    checks = Checks()
    with pytest.raises(AttestationError) as info:
        evidence.verify_evidence(document, nonce=e.NONCE, policy=Policy(), now=NOW, checks=checks)
    return info.value, checks


def test_azure_path_reaches_the_vtpm_binding() -> None:
    error, checks = _refuse(azure_document())
    passed = {c.name for c in checks if c.passed}
    # The SNP report verified, it commits to the HCL runtime data, and the vTPM AK in the
    # document is the one that runtime data names ...
    assert {"snp.report.signature", "hcl.runtime_data_binding"} <= passed
    assert "evidence.tpm.ak_bound_to_tee" in passed
    assert "evidence.binding.report_data" not in {c.name for c in checks}
    # ... but the quote answers another nonce and other claims.
    assert isinstance(error, BindingError)


def test_azure_with_another_ak() -> None:
    other = build.public_ecc(ec.generate_private_key(ec.SECP256R1()).public_key())
    error, _ = _refuse(azure_document(ak_public=other))
    assert isinstance(error, BindingError)
    assert error.check == "evidence.tpm.ak_bound_to_tee"


def test_azure_without_a_vtpm_quote() -> None:
    error, _ = _refuse(azure_document(with_tpm=False))
    assert isinstance(error, BindingError)
    assert error.check == "evidence.tpm.present"


def test_azure_hcl_claiming_the_wrong_platform() -> None:
    doc = json.loads(azure_document())
    doc["platform"] = "tdx"
    doc["tee"] = {"hcl_report": doc["tee"]["hcl_report"], "quote": _b64(b"\0" * 16)}
    error, _ = _refuse(json.dumps(doc).encode())
    assert isinstance(error, BindingError)
    assert error.check == "evidence.hcl.platform"


def test_snp_report_next_to_an_hcl_report_is_malformed() -> None:
    """The HCL report carries the SNP report; a second ``report`` beside it would be ignored."""
    doc = json.loads(azure_document())
    doc["tee"]["report"] = _b64(b"garbage, not an SNP report")
    error, _ = _refuse(json.dumps(doc).encode())
    assert isinstance(error, MalformedError), repr(error)
    assert "not both" in error.message
