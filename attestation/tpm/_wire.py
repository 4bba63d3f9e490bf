"""TPM 2.0 wire basics: algorithm identifiers and a bounds-checked reader (no crypto, no I/O)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes

from attestation.errors import MalformedError

__all__ = [
    "ALG_ECC",
    "ALG_ECDSA",
    "ALG_NULL",
    "ALG_RSA",
    "ALG_RSAPSS",
    "ALG_RSASSA",
    "HASHES",
    "HashAlgorithm",
    "Reader",
    "alg_name",
    "hash_by_id",
    "hash_by_name",
]

# TPM_ALG_ID values (TPM 2.0 Part 2, table 9).
ALG_RSA: Final = 0x0001
ALG_SHA1: Final = 0x0004
ALG_HMAC: Final = 0x0005
ALG_AES: Final = 0x0006
ALG_MGF1: Final = 0x0007
ALG_KEYEDHASH: Final = 0x0008
ALG_XOR: Final = 0x000A
ALG_SHA256: Final = 0x000B
ALG_SHA384: Final = 0x000C
ALG_SHA512: Final = 0x000D
ALG_NULL: Final = 0x0010
ALG_SM3_256: Final = 0x0012
ALG_SM4: Final = 0x0013
ALG_RSASSA: Final = 0x0014
ALG_RSAES: Final = 0x0015
ALG_RSAPSS: Final = 0x0016
ALG_OAEP: Final = 0x0017
ALG_ECDSA: Final = 0x0018
ALG_ECDH: Final = 0x0019
ALG_ECDAA: Final = 0x001A
ALG_SM2: Final = 0x001B
ALG_ECSCHNORR: Final = 0x001C
ALG_ECMQV: Final = 0x001D
ALG_KDF1_SP800_56A: Final = 0x0020
ALG_KDF2: Final = 0x0021
ALG_KDF1_SP800_108: Final = 0x0022
ALG_ECC: Final = 0x0023
ALG_SYMCIPHER: Final = 0x0025
ALG_CAMELLIA: Final = 0x0026
ALG_SHA3_256: Final = 0x0027
ALG_SHA3_384: Final = 0x0028
ALG_SHA3_512: Final = 0x0029
ALG_CTR: Final = 0x0040
ALG_OFB: Final = 0x0041
ALG_CBC: Final = 0x0042
ALG_CFB: Final = 0x0043
ALG_ECB: Final = 0x0044

_ALG_NAMES: Final[dict[int, str]] = {
    ALG_RSA: "rsa",
    ALG_SHA1: "sha1",
    ALG_HMAC: "hmac",
    ALG_AES: "aes",
    ALG_MGF1: "mgf1",
    ALG_KEYEDHASH: "keyedhash",
    ALG_XOR: "xor",
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
    ALG_NULL: "null",
    ALG_SM3_256: "sm3_256",
    ALG_SM4: "sm4",
    ALG_RSASSA: "rsassa",
    ALG_RSAES: "rsaes",
    ALG_RSAPSS: "rsapss",
    ALG_OAEP: "oaep",
    ALG_ECDSA: "ecdsa",
    ALG_ECDH: "ecdh",
    ALG_ECDAA: "ecdaa",
    ALG_SM2: "sm2",
    ALG_ECSCHNORR: "ecschnorr",
    ALG_ECMQV: "ecmqv",
    ALG_KDF1_SP800_56A: "kdf1_sp800_56a",
    ALG_KDF2: "kdf2",
    ALG_KDF1_SP800_108: "kdf1_sp800_108",
    ALG_ECC: "ecc",
    ALG_SYMCIPHER: "symcipher",
    ALG_CAMELLIA: "camellia",
    ALG_SHA3_256: "sha3_256",
    ALG_SHA3_384: "sha3_384",
    ALG_SHA3_512: "sha3_512",
    ALG_CTR: "ctr",
    ALG_OFB: "ofb",
    ALG_CBC: "cbc",
    ALG_CFB: "cfb",
    ALG_ECB: "ecb",
}


def alg_name(alg: int) -> str:
    """The lowercase TPM name of an algorithm id, or ``0x....`` when unknown."""
    return _ALG_NAMES.get(alg, f"0x{alg:04x}")


@dataclass(frozen=True)
class HashAlgorithm:
    """A TPM hash algorithm: its TPM_ALG_ID, name (PCR bank name) and digest size."""

    alg: int
    name: str
    size: int
    #: hashlib name, or None where this Python cannot compute it (SM3).
    hashlib_name: str | None

    @property
    def computable(self) -> bool:
        return self.hashlib_name is not None

    def digest(self, data: bytes) -> bytes:
        if self.hashlib_name is None:
            raise MalformedError(f"hash algorithm {self.name} is not supported here")
        return hashlib.new(self.hashlib_name, data).digest()

    def crypto_hash(self) -> hashes.HashAlgorithm:
        """The ``cryptography`` hash object, for signature verification."""
        table: dict[str, hashes.HashAlgorithm] = {
            "sha1": hashes.SHA1(),  # noqa: S303 - PCR banks and old quotes use SHA-1
            "sha256": hashes.SHA256(),
            "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512(),
            "sha3_256": hashes.SHA3_256(),
            "sha3_384": hashes.SHA3_384(),
            "sha3_512": hashes.SHA3_512(),
        }
        if self.name not in table:
            raise MalformedError(f"hash algorithm {self.name} is not supported for signatures")
        return table[self.name]


HASHES: Final[tuple[HashAlgorithm, ...]] = (
    HashAlgorithm(ALG_SHA1, "sha1", 20, "sha1"),
    HashAlgorithm(ALG_SHA256, "sha256", 32, "sha256"),
    HashAlgorithm(ALG_SHA384, "sha384", 48, "sha384"),
    HashAlgorithm(ALG_SHA512, "sha512", 64, "sha512"),
    HashAlgorithm(ALG_SM3_256, "sm3_256", 32, None),
    HashAlgorithm(ALG_SHA3_256, "sha3_256", 32, "sha3_256"),
    HashAlgorithm(ALG_SHA3_384, "sha3_384", 48, "sha3_384"),
    HashAlgorithm(ALG_SHA3_512, "sha3_512", 64, "sha3_512"),
)
_BY_ID: Final = {h.alg: h for h in HASHES}
_BY_NAME: Final = {h.name: h for h in HASHES}
#: Largest digest any supported hash produces (sizeof(TPMU_HA)).
MAX_DIGEST: Final = 64


def hash_by_id(alg: int, what: str) -> HashAlgorithm:
    try:
        return _BY_ID[alg]
    except KeyError:
        raise MalformedError(f"{what}: 0x{alg:04x} is not a TPM hash algorithm") from None


def hash_by_name(name: str, what: str) -> HashAlgorithm:
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise MalformedError(f"{what}: unknown hash {name!r} (known: {known})") from None


class Reader:
    """Sequential reader over one structure; every overrun is a MalformedError naming the field.

    TPM structures are big-endian; the TCG event log is little-endian (``little=True``).
    """

    def __init__(self, data: bytes, what: str, *, little: bool = False) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedError(f"{what}: expected bytes, got {type(data).__name__}")
        self.data = bytes(data)
        self.what = what
        self.offset = 0
        self._order = "<" if little else ">"

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or size > self.remaining:
            raise MalformedError(
                f"{self.what}: truncated at offset {self.offset} reading {field} "
                f"(need {size} bytes, {self.remaining} left)"
            )
        out = self.data[self.offset : self.offset + size]
        self.offset += size
        return out

    def _unpack(self, fmt: str, size: int, field: str) -> int:
        value: int = struct.unpack(self._order + fmt, self.take(size, field))[0]
        return value

    def u8(self, field: str) -> int:
        return self._unpack("B", 1, field)

    def u16(self, field: str) -> int:
        return self._unpack("H", 2, field)

    def u32(self, field: str) -> int:
        return self._unpack("I", 4, field)

    def u64(self, field: str) -> int:
        return self._unpack("Q", 8, field)

    def sized(self, field: str, max_size: int) -> bytes:
        """A TPM2B: a 16-bit size, then that many bytes (at most ``max_size``)."""
        size = self.u16(f"{field}.size")
        if size > max_size:
            raise MalformedError(
                f"{self.what}: {field} is {size} bytes, more than the {max_size} allowed"
            )
        return self.take(size, field)

    def finish(self) -> None:
        if self.remaining:
            raise MalformedError(
                f"{self.what}: {self.remaining} trailing bytes after offset {self.offset}"
            )
