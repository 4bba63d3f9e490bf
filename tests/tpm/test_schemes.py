"""verify_quote across signature schemes, hashes and AK forms, with synthetic keys."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation import Checks
from attestation.errors import MalformedError, SignatureError, VerificationError
from attestation.tpm import (
    parse_public,
    pcr_digest,
    signature_from_raw,
    verify_quote,
)
from attestation.tpm.parse import RsaSignature, parse_attest
from tests.tpm import _build

NONCE = hashlib.sha256(b"cube-evidence/1\0nonce").digest()
BANKS: Mapping[str, Sequence[int]] = {"sha1": [0, 1, 7], "sha256": list(range(24)), "sha384": [4]}


@cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@cache
def ec_key(curve: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[curve])


def _quote(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    scheme: str,
    hash_alg: str,
    banks: Mapping[str, Sequence[int]] = BANKS,
    **sign_kw: object,
) -> tuple[bytes, bytes, bytes, dict[str, dict[int, bytes]]]:
    values = _build.pcr_values(banks, seed=scheme.encode())
    attest = _build.attest(extra_data=NONCE, banks=banks, values=values, digest_hash=hash_alg)
    signature = _build.sign(key, attest, scheme=scheme, hash_alg=hash_alg, **sign_kw)  # type: ignore[arg-type]
    if isinstance(key, rsa.RSAPrivateKey):
        public = _build.public_rsa(key.public_key(), scheme=scheme, hash_alg=hash_alg)
    else:
        public = _build.public_ecc(key.public_key(), scheme=scheme, hash_alg=hash_alg)
    return attest, signature, public, values


SCHEMES = [
    ("rsa2048", "rsassa", "sha256"),
    ("rsa2048", "rsassa", "sha384"),
    ("rsa2048", "rsassa", "sha1"),
    ("rsa3072", "rsapss", "sha256"),
    ("rsa2048", "rsapss", "sha512"),
    ("p256", "ecdsa", "sha256"),
    ("p256", "ecdsa", "sha384"),
    ("p384", "ecdsa", "sha384"),
]


def _key(name: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    return rsa_key(int(name[3:])) if name.startswith("rsa") else ec_key(name)


@pytest.mark.parametrize(("key_name", "scheme", "hash_alg"), SCHEMES)
def test_schemes_verify_and_use_the_signing_hash_for_the_pcr_digest(
    key_name: str, scheme: str, hash_alg: str
) -> None:
    attest, signature, public, values = _quote(_key(key_name), scheme, hash_alg)
    ak = parse_public(public)
    checks = Checks()
    verified = verify_quote(
        attest=attest, signature=signature, ak=ak, pcrs=values, qualifying_data=NONCE, checks=checks
    )
    assert (verified.signature.scheme, verified.signature.hash) == (scheme, hash_alg)
    # The digest covers SHA-1, SHA-256 and SHA-384 bank values but is taken with hash_alg.
    assert len(verified.attest.pcr_digest) == hashlib.new(hash_alg).digest_size
    assert pcr_digest(verified.attest, values, hash_alg) == verified.attest.pcr_digest
    assert set(verified.pcrs) == set(BANKS)
    assert [c.name for c in checks if c.name.startswith("tpm.pcr_selection")] == [
        "tpm.pcr_selection.banks",
        "tpm.pcr_selection.sha1",
        "tpm.pcr_selection.sha256",
        "tpm.pcr_selection.sha384",
    ]
    # Bare public key and raw signature bytes work the same way.
    sig = verified.signature
    value = sig.value
    raw = value.signature if isinstance(value, RsaSignature) else value.r + value.s
    again = verify_quote(
        attest=attest,
        signature=signature_from_raw(raw, sig_alg=scheme, hash_alg=hash_alg),
        ak=ak.public_key(),
        pcrs=values,
        qualifying_data=NONCE,
    )
    assert again.ak is None and again.attest == verified.attest


@pytest.mark.parametrize(("key_name", "scheme", "hash_alg"), SCHEMES)
def test_schemes_reject_a_tampered_attest(key_name: str, scheme: str, hash_alg: str) -> None:
    attest, signature, public, values = _quote(_key(key_name), scheme, hash_alg)
    for index in range(len(attest) - 1, 0, -9):
        bad = attest[:index] + bytes([attest[index] ^ 0x04]) + attest[index + 1 :]
        with pytest.raises((MalformedError, SignatureError)):
            verify_quote(
                attest=bad,
                signature=signature,
                ak=parse_public(public),
                pcrs=values,
                qualifying_data=NONCE,
            )


def test_pcr_digest_with_a_hash_other_than_the_signing_hash_is_rejected() -> None:
    key = rsa_key()
    banks = {"sha1": [0, 1]}
    values = _build.pcr_values(banks)
    # A (buggy) quote whose pcrDigest uses the bank hash (SHA-1) while signing with SHA-256.
    attest = _build.attest(extra_data=NONCE, banks=banks, values=values, digest_hash="sha1")
    signature = _build.sign(key, attest, scheme="rsassa")
    with pytest.raises(VerificationError) as info:
        verify_quote(
            attest=attest,
            signature=signature,
            ak=parse_public(_build.public_rsa(key.public_key())),
            pcrs=values,
            qualifying_data=NONCE,
        )
    assert info.value.check == "tpm.pcr_digest"


def test_rsapss_with_maximal_salt_verifies() -> None:
    key = rsa_key()
    attest, signature, public, values = _quote(key, "rsapss", "sha256", salt_length=222)
    verify_quote(
        attest=attest,
        signature=signature,
        ak=parse_public(public),
        pcrs=values,
        qualifying_data=NONCE,
    )


def test_unrestricted_ak_is_refused() -> None:
    key = ec_key("p256")
    attest, signature, _, values = _quote(key, "ecdsa", "sha256")
    for attributes in (0x00040072, 0x00010072, 0x00060072):  # no restricted / no sign / decrypt
        public = _build.public_ecc(key.public_key(), attributes=attributes)
        with pytest.raises(VerificationError) as info:
            verify_quote(
                attest=attest,
                signature=signature,
                ak=parse_public(public),
                pcrs=values,
                qualifying_data=NONCE,
            )
        if attributes != 0x00060072:
            assert info.value.check == "tpm.ak.attributes"


def test_null_scheme_ak_accepts_any_signature_scheme() -> None:
    key = rsa_key()
    attest, signature, _, values = _quote(key, "rsapss", "sha384")
    public = _build.public_rsa(key.public_key(), scheme="null")
    verify_quote(
        attest=attest,
        signature=signature,
        ak=parse_public(public),
        pcrs=values,
        qualifying_data=NONCE,
    )
    # ... but a key with a scheme insists on it.
    public = _build.public_rsa(key.public_key(), scheme="rsassa", hash_alg="sha384")
    with pytest.raises(SignatureError) as info:
        verify_quote(
            attest=attest,
            signature=signature,
            ak=parse_public(public),
            pcrs=values,
            qualifying_data=NONCE,
        )
    assert info.value.check == "tpm.ak.scheme"


def test_signature_type_must_match_key_type() -> None:
    attest, signature, _, values = _quote(ec_key("p256"), "ecdsa", "sha256")
    for ak in (rsa_key().public_key(), ec_key("p384").public_key()):
        with pytest.raises(SignatureError):
            verify_quote(
                attest=attest, signature=signature, ak=ak, pcrs=values, qualifying_data=NONCE
            )
    attest, signature, _, values = _quote(rsa_key(), "rsassa", "sha256")
    with pytest.raises(SignatureError, match="cannot come from an EC AK"):
        verify_quote(
            attest=attest,
            signature=signature,
            ak=ec_key("p256").public_key(),
            pcrs=values,
            qualifying_data=NONCE,
        )


def test_ak_of_wrong_type_is_malformed() -> None:
    attest, signature, _, values = _quote(ec_key("p256"), "ecdsa", "sha256")
    with pytest.raises(MalformedError):
        verify_quote(
            attest=attest,
            signature=signature,
            ak=b"not a key",  # type: ignore[arg-type]
            pcrs=values,
            qualifying_data=NONCE,
        )


def test_empty_selection_quote() -> None:
    key = ec_key("p256")
    attest, signature, public, _ = _quote(key, "ecdsa", "sha256", banks={})
    assert parse_attest(attest).pcr_select == ()
    verified = verify_quote(
        attest=attest,
        signature=signature,
        ak=parse_public(public),
        pcrs={},
        qualifying_data=NONCE,
    )
    assert dict(verified.pcrs) == {}
    with pytest.raises(VerificationError):
        verify_quote(
            attest=attest,
            signature=signature,
            ak=parse_public(public),
            pcrs={"sha256": {0: bytes(32)}},
            qualifying_data=NONCE,
        )
