"""The binding formula, exactly as ARCHITECTURE.md fixes it, recomputed here independently:

report_data      = SHA-512(b"cube-evidence/1\\0" || nonce || SHA-256(claims bytes))
qualifying data  = SHA-256(the same input)
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from attestation import evidence, snp, tdx
from tests.evidence import _util as e

DOMAIN = b"cube-evidence/1\x00"


def expected_report_data(nonce: bytes, claims: bytes) -> bytes:
    return hashlib.sha512(DOMAIN + nonce + hashlib.sha256(claims).digest()).digest()


def expected_qualifying_data(nonce: bytes, claims: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + nonce + hashlib.sha256(claims).digest()).digest()


def test_known_answer() -> None:
    # Computed once by hand with hashlib; pins the domain string, its NUL and the order.
    nonce, claims = bytes(range(32)), b'{"a":1}'
    assert evidence.report_data_for(nonce, claims).hex() == (
        "4a5f39f75a5a06b0142bf1e00cd90fa42ecb8239856d497f63f499269f1879d4"
        "a1e1f6f38ed89b10f2703568cf2ba0d4e686f093bfd9b4e7b2878e47dbe7126b"
    )
    assert evidence.tpm_qualifying_data_for(nonce, claims).hex() == (
        "c3b3a7ba35d7a048471dad6f3510b3d91daf18f398d9f39c49b2227c9c16bd89"
    )


@pytest.mark.parametrize("nonce_len", [32, 48, 64])
@pytest.mark.parametrize("claims", [b"", b"{}", e.claims_bytes(), '{"é": 1}'.encode()])
def test_formula(nonce_len: int, claims: bytes) -> None:
    nonce = hashlib.sha512(bytes([nonce_len])).digest()[:nonce_len]
    assert evidence.binding_input(nonce, claims) == (
        DOMAIN + nonce + hashlib.sha256(claims).digest()
    )
    report_data = evidence.report_data_for(nonce, claims)
    assert len(report_data) == 64
    assert report_data == expected_report_data(nonce, claims)
    qualifying = evidence.tpm_qualifying_data_for(nonce, claims)
    assert len(qualifying) == 32
    assert qualifying == expected_qualifying_data(nonce, claims)


def test_every_input_matters() -> None:
    claims = e.claims_bytes()
    base = evidence.report_data_for(e.NONCE, claims)
    assert evidence.report_data_for(e.OTHER_NONCE, claims) != base
    assert evidence.report_data_for(e.NONCE, claims + b" ") != base
    assert evidence.report_data_for(e.NONCE + b"\0", claims) != base


def test_claims_are_canonical_json() -> None:
    claims = e.claims_dict()
    raw = evidence.encode_claims(claims)
    assert raw == json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in raw.replace(b"tiny", b"")


def test_simulated_snp_report_carries_the_binding() -> None:
    claims = e.claims_bytes()
    doc = json.loads(e.collect("configfs-snp", claims=claims))
    assert doc["nonce"] == e.NONCE.hex()
    assert base64.b64decode(doc["claims"]) == claims  # the exact bytes, not a re-encoding
    report = snp.parse_report(base64.b64decode(doc["tee"]["report"]))
    assert report.report_data == expected_report_data(e.NONCE, claims)


def test_simulated_tdx_quote_carries_the_binding() -> None:
    claims = e.claims_bytes(agent_version="9.9.9")
    doc = json.loads(e.collect("configfs-tdx", claims=claims, nonce=e.OTHER_NONCE))
    quote = tdx.parse_quote(base64.b64decode(doc["tee"]["quote"]))
    assert quote.report_data == expected_report_data(e.OTHER_NONCE, claims)


def test_verified_evidence_digest_covers_nonce_and_claims() -> None:
    claims = e.claims_bytes()
    verified = evidence.verify_evidence(
        e.collect(claims=claims), nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    digest = hashlib.sha256(DOMAIN + e.NONCE + hashlib.sha256(claims).digest()).hexdigest()
    assert verified.digest == "sha256:" + digest
    binding = [c for c in verified.checks if c.name == "evidence.binding.report_data"]
    assert len(binding) == 1 and binding[0].passed
    assert binding[0].expected == expected_report_data(e.NONCE, claims).hex()
