"""Build TPM structures for tests: synthetic AKs, quotes and signatures (RSA and ECC).

A tiny marshaller, independent of the parser under test, so that schemes the real vectors lack
(RSA-PSS, ECDSA, SHA-384 signatures) are covered.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HASH_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
HASH_OBJ: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
SCHEMES = {"rsassa": 0x0014, "rsapss": 0x0016, "ecdsa": 0x0018, "null": 0x0010}
CURVES = {"secp256r1": (0x0003, 32), "secp384r1": (0x0004, 48), "secp521r1": (0x0005, 66)}
AK_ATTRIBUTES = 0x00050072  # fixedTPM fixedParent sensitiveDataOrigin userWithAuth restricted sign


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def public_rsa(
    key: rsa.RSAPublicKey,
    *,
    scheme: str = "rsassa",
    hash_alg: str = "sha256",
    attributes: int = AK_ATTRIBUTES,
    exponent_zero: bool = True,
) -> bytes:
    numbers = key.public_numbers()
    scheme_part = struct.pack(">H", SCHEMES[scheme])
    if scheme != "null":
        scheme_part += struct.pack(">H", HASH_IDS[hash_alg])
    exponent = 0 if exponent_zero and numbers.e == 65537 else numbers.e
    return (
        struct.pack(">HHI", 0x0001, HASH_IDS["sha256"], attributes)
        + tpm2b(b"")
        + struct.pack(">H", 0x0010)  # symmetric NULL
        + scheme_part
        + struct.pack(">HI", key.key_size, exponent)
        + tpm2b(numbers.n.to_bytes(key.key_size // 8, "big"))
    )


def public_ecc(
    key: ec.EllipticCurvePublicKey,
    *,
    scheme: str = "ecdsa",
    hash_alg: str = "sha256",
    attributes: int = AK_ATTRIBUTES,
) -> bytes:
    curve_id, size = CURVES[key.curve.name]
    numbers = key.public_numbers()
    scheme_part = struct.pack(">H", SCHEMES[scheme])
    if scheme != "null":
        scheme_part += struct.pack(">H", HASH_IDS[hash_alg])
    return (
        struct.pack(">HHI", 0x0023, HASH_IDS["sha256"], attributes)
        + tpm2b(b"")
        + struct.pack(">H", 0x0010)
        + scheme_part
        + struct.pack(">HH", curve_id, 0x0010)  # curve, kdf NULL
        + tpm2b(numbers.x.to_bytes(size, "big"))
        + tpm2b(numbers.y.to_bytes(size, "big"))
    )


def selection(banks: Mapping[str, Sequence[int]]) -> bytes:
    out = struct.pack(">I", len(banks))
    for bank, pcrs in banks.items():
        bitmap = bytearray(3)
        for i in pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += struct.pack(">HB", HASH_IDS[bank], 3) + bytes(bitmap)
    return out


def pcr_values(
    banks: Mapping[str, Sequence[int]], seed: bytes = b""
) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for bank, pcrs in banks.items():
        out[bank] = {i: hashlib.new(bank, seed + bank.encode() + bytes([i])).digest() for i in pcrs}
    return out


def attest(
    *,
    extra_data: bytes,
    banks: Mapping[str, Sequence[int]],
    values: Mapping[str, Mapping[int, bytes]],
    digest_hash: str = "sha256",
    signer: bytes = b"\x00\x0b" + bytes(32),
    clock: int = 1234567,
    firmware: int = 0x2019102300163636,
) -> bytes:
    concat = b"".join(values[b][i] for b, pcrs in banks.items() for i in sorted(pcrs))
    digest = hashlib.new(digest_hash, concat).digest()
    return (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + tpm2b(signer)
        + tpm2b(extra_data)
        + struct.pack(">QIIB", clock, 7, 0, 1)
        + struct.pack(">Q", firmware)
        + selection(banks)
        + tpm2b(digest)
    )


def sign(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    data: bytes,
    *,
    scheme: str,
    hash_alg: str = "sha256",
    salt_length: int | None = None,
) -> bytes:
    """A marshalled TPMT_SIGNATURE."""
    h = HASH_OBJ[hash_alg]
    head = struct.pack(">HH", SCHEMES[scheme], HASH_IDS[hash_alg])
    if isinstance(key, rsa.RSAPrivateKey):
        if scheme == "rsassa":
            sig = key.sign(data, padding.PKCS1v15(), h)
        else:
            salt = h.digest_size if salt_length is None else salt_length
            sig = key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=salt), h)
        return head + tpm2b(sig)
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
    size = CURVES[key.curve.name][1]
    return head + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))
