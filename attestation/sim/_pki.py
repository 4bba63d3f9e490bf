"""Certificates and CRLs of the simulator's test PKIs, with deterministic signatures."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from attestation.sim import _derw as d
from attestation.sim._keys import rsa_pss_sign

__all__ = [
    "EPOCH",
    "NOT_AFTER",
    "EcdsaSigner",
    "RsaPssSigner",
    "Signer",
    "authority_key_identifier",
    "basic_constraints",
    "build_certificate",
    "build_crl",
    "extension",
    "key_usage",
    "pem",
    "raw_ecdsa_signature",
    "spki_der",
    "subject_key_identifier",
]

#: Validity of every simulated certificate: fixed, so that certificates are reproducible.
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)

_SHA384 = "2.16.840.1.101.3.4.2.2"
_MGF1 = "1.2.840.113549.1.1.8"
_RSA_PSS = "1.2.840.113549.1.1.10"
_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
_ECDSA_SHA384 = "1.2.840.10045.4.3.3"


@dataclass(frozen=True)
class RsaPssSigner:
    """RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48: AMD's ARK/ASK signature algorithm."""

    key: rsa.RSAPrivateKey

    def algorithm(self) -> bytes:
        sha384 = d.sequence(d.oid(_SHA384), d.null())
        params = d.sequence(
            d.context(0, sha384),
            d.context(1, d.sequence(d.oid(_MGF1), sha384)),
            d.context(2, d.integer(48)),
        )
        return d.sequence(d.oid(_RSA_PSS), params)

    def sign(self, data: bytes) -> bytes:
        return rsa_pss_sign(self.key, data, hash_name="sha384", salt_length=48)

    def public_key(self) -> rsa.RSAPublicKey:
        return self.key.public_key()


@dataclass(frozen=True)
class EcdsaSigner:
    """Deterministic ECDSA (RFC 6979) with SHA-256 or SHA-384; DER signatures."""

    key: ec.EllipticCurvePrivateKey
    hash_name: str = "sha256"

    def _hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    def algorithm(self) -> bytes:
        return d.sequence(d.oid(_ECDSA_SHA384 if self.hash_name == "sha384" else _ECDSA_SHA256))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(self._hash(), deterministic_signing=True))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()


Signer = RsaPssSigner | EcdsaSigner


def raw_ecdsa_signature(der_signature: bytes, size: int) -> tuple[int, int]:
    """(r, s) of a DER ECDSA signature, checked to fit ``size`` bytes each."""
    r, s = decode_dss_signature(der_signature)
    if r.bit_length() > 8 * size or s.bit_length() > 8 * size:
        raise RuntimeError("ECDSA signature component too large")
    return r, s


def spki_der(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    # RFC 5280 method 1 would hash the BIT STRING contents; the SPKI hash is as good for tests.
    return hashlib.sha1(spki_der(public_key), usedforsecurity=False).digest()


def extension(oid: str, value: bytes, *, critical: bool = False) -> bytes:
    items = [d.oid(oid)]
    if critical:
        items.append(d.boolean(True))
    items.append(d.octet_string(value))
    return d.sequence(*items)


def basic_constraints(*, ca: bool, path_length: int | None = None) -> bytes:
    inner = []
    if ca:
        inner.append(d.boolean(True))
        if path_length is not None:
            inner.append(d.integer(path_length))
    return extension("2.5.29.19", d.sequence(*inner), critical=True)


def key_usage(*, cert_sign: bool, crl_sign: bool, digital_signature: bool = False) -> bytes:
    bits = (0x80 if digital_signature else 0) | (0x04 if cert_sign else 0)
    bits |= 0x02 if crl_sign else 0
    # DER: trailing zero bits are "unused" and counted in the first content byte.
    unused = (bits & -bits).bit_length() - 1 if bits else 0
    return extension("2.5.29.15", d.tlv(0x03, bytes([unused, bits])), critical=True)


def subject_key_identifier(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return extension("2.5.29.14", d.octet_string(_key_id(public_key)))


def authority_key_identifier(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return extension("2.5.29.35", d.sequence(d.context(0, _key_id(public_key), constructed=False)))


def build_certificate(
    *,
    serial: int,
    issuer: bytes,
    subject: bytes,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: Signer,
    extensions: Sequence[bytes],
    not_before: datetime = EPOCH,
    not_after: datetime = NOT_AFTER,
) -> bytes:
    """An X.509 v3 certificate (DER). ``issuer``/``subject`` are DER names."""
    algorithm = signer.algorithm()
    fields = [
        d.context(0, d.integer(2)),
        d.integer(serial),
        algorithm,
        issuer,
        d.sequence(d.time(not_before), d.time(not_after)),
        subject,
        spki_der(public_key),
    ]
    if extensions:
        fields.append(d.context(3, d.sequence(*extensions)))
    tbs = d.sequence(*fields)
    return d.sequence(tbs, algorithm, d.bit_string(signer.sign(tbs)))


def build_crl(
    *,
    issuer: bytes,
    issuer_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    signer: Signer,
    this_update: datetime,
    next_update: datetime,
    number: int,
    revoked: Sequence[tuple[int, datetime]] = (),
) -> bytes:
    """An X.509 v2 CRL (DER) with CRL number and authority key identifier extensions."""
    algorithm = signer.algorithm()
    fields = [
        d.integer(1),
        algorithm,
        issuer,
        d.time(this_update),
        d.time(next_update),
    ]
    if revoked:
        fields.append(d.sequence(*(d.sequence(d.integer(s), d.time(t)) for s, t in revoked)))
    crl_extensions = d.sequence(
        extension("2.5.29.20", d.integer(number)),
        authority_key_identifier(issuer_key),
    )
    fields.append(d.context(0, crl_extensions))
    tbs = d.sequence(*fields)
    return d.sequence(tbs, algorithm, d.bit_string(signer.sign(tbs)))


def pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"".join(
        [
            f"-----BEGIN {label}-----\n".encode(),
            *(line + b"\n" for line in lines),
            f"-----END {label}-----\n".encode(),
        ]
    )
