"""vTPM-only evidence has no hardware root: the claims name the AK, and the claims are bound only
by a quote that AK signed. Anyone can therefore forge it with a software key, which is why the
default policy does not accept the "vtpm" platform (a policy must list it on purpose)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import evidence
from attestation.errors import BindingError, PolicyError
from attestation.policy import DEFAULT_PLATFORMS, Policy
from tests.evidence import _util as e
from tests.tpm import _build as build

BANKS = {"sha256": [0, 7]}


def forged_vtpm_document(*, nonce: bytes = e.NONCE, claims_ak: bytes | None = None) -> bytes:
    """A vTPM evidence document made without any TPM: a fresh P-256 key plays the AK."""
    key = ec.generate_private_key(ec.SECP256R1())
    ak_public = build.public_ecc(key.public_key())
    named = hashlib.sha256(ak_public).digest() if claims_ak is None else claims_ak
    claims = e.claims_bytes(tpm_ak_sha256=named.hex())
    values = build.pcr_values(BANKS)
    attest = build.attest(
        extra_data=evidence.tpm_qualifying_data_for(nonce, claims), banks=BANKS, values=values
    )
    document = {
        "format": "cube-evidence/1",
        "platform": "vtpm",
        "nonce": nonce.hex(),
        "claims": base64.b64encode(claims).decode(),
        "tpm": {
            "quote": base64.b64encode(attest).decode(),
            "signature": base64.b64encode(build.sign(key, attest, scheme="ecdsa")).decode(),
            "ak_public": base64.b64encode(ak_public).decode(),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in values["sha256"].items()}},
        },
    }
    return json.dumps(document).encode()


def test_default_policy_does_not_accept_vtpm_only_evidence() -> None:
    assert "vtpm" not in DEFAULT_PLATFORMS
    assert Policy().platforms == frozenset(DEFAULT_PLATFORMS)
    with pytest.raises(PolicyError) as info:
        evidence.verify_evidence(forged_vtpm_document(), nonce=e.NONCE, policy=Policy(), now=e.NOW)
    assert info.value.check == "policy.platform"


def test_the_forgery_is_cryptographically_sound() -> None:
    # What the default refuses is not malformed: a policy that opts into "vtpm" accepts it,
    # which is exactly why opting in must be deliberate.
    opted_in = Policy.from_json({"format": "cube-policy/1", "platforms": ["vtpm"]})
    verified = evidence.verify_evidence(
        forged_vtpm_document(), nonce=e.NONCE, policy=opted_in, now=e.NOW
    )
    assert verified.platform == "vtpm" and verified.tpm is not None


def test_forgery_must_still_name_its_own_ak() -> None:
    opted_in = Policy.from_json({"format": "cube-policy/1", "platforms": ["vtpm"]})
    document = forged_vtpm_document(claims_ak=bytes(32))
    with pytest.raises(BindingError):
        evidence.verify_evidence(document, nonce=e.NONCE, policy=opted_in, now=e.NOW)
