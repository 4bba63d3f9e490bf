"""Parse TPM 2.0 structures a vTPM quote is made of: TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE.

Bytes in, frozen dataclasses out; every size and reserved field is checked, the whole input must
be consumed, and nothing here verifies a signature (see :mod:`attestation.tpm.verify`).
Layouts follow TPM 2.0 Library Part 2 (Structures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation.errors import MalformedError
from attestation.tpm import _wire as w

__all__ = [
    "ATTEST_QUOTE",
    "TPM_GENERATED_VALUE",
    "EccParameters",
    "EccPoint",
    "EccSignature",
    "PcrSelection",
    "RsaParameters",
    "RsaSignature",
    "SymmetricDefinition",
    "TpmsAttest",
    "TpmtPublic",
    "TpmtSignature",
    "parse_attest",
    "parse_pcr_selection",
    "parse_public",
    "parse_signature",
    "signature_from_raw",
]

#: TPMS_ATTEST.magic: the TPM made this structure (a restricted key never signs data starting so).
TPM_GENERATED_VALUE: Final = 0xFF544347
#: TPMI_ST_ATTEST for TPM2_Quote.
ATTEST_QUOTE: Final = 0x8018

_MAX_NAME = 2 + w.MAX_DIGEST  # sizeof(TPMU_NAME) with SHA-512
_MAX_DATA = 2 + w.MAX_DIGEST  # sizeof(TPMT_HA)
_MAX_RSA_BYTES = 512  # MAX_RSA_KEY_BYTES (4096-bit keys)
_MAX_ECC_BYTES = 80  # MAX_ECC_KEY_BYTES (BN P-638)
_MAX_BANKS = 16  # HASH_COUNT bound for TPML_PCR_SELECTION
#: At most 32 PCRs (sizeofSelect <= 4); PC Client TPMs have 24.
MAX_PCR_SELECT = 4

# TPMA_OBJECT bits (Part 2, table 31).
FIXED_TPM: Final = 1 << 1
ST_CLEAR: Final = 1 << 2
FIXED_PARENT: Final = 1 << 4
SENSITIVE_DATA_ORIGIN: Final = 1 << 5
USER_WITH_AUTH: Final = 1 << 6
ADMIN_WITH_POLICY: Final = 1 << 7
NO_DA: Final = 1 << 10
ENCRYPTED_DUPLICATION: Final = 1 << 11
RESTRICTED: Final = 1 << 16
DECRYPT: Final = 1 << 17
SIGN_ENCRYPT: Final = 1 << 18
X509_SIGN: Final = 1 << 19
_ATTRIBUTE_NAMES: Final = (
    (FIXED_TPM, "fixedTPM"),
    (ST_CLEAR, "stClear"),
    (FIXED_PARENT, "fixedParent"),
    (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (USER_WITH_AUTH, "userWithAuth"),
    (ADMIN_WITH_POLICY, "adminWithPolicy"),
    (NO_DA, "noDA"),
    (ENCRYPTED_DUPLICATION, "encryptedDuplication"),
    (RESTRICTED, "restricted"),
    (DECRYPT, "decrypt"),
    (SIGN_ENCRYPT, "sign"),
    (X509_SIGN, "x509sign"),
)
_RESERVED_ATTRIBUTES: Final = 0xFFF0F309

# TPM_ECC_CURVE: (name, coordinate bytes, cryptography curve if supported)
_CURVES: Final[dict[int, tuple[str, int, ec.EllipticCurve | None]]] = {
    0x0001: ("nist_p192", 24, ec.SECP192R1()),
    0x0002: ("nist_p224", 28, ec.SECP224R1()),
    0x0003: ("nist_p256", 32, ec.SECP256R1()),
    0x0004: ("nist_p384", 48, ec.SECP384R1()),
    0x0005: ("nist_p521", 66, ec.SECP521R1()),
    0x0010: ("bn_p256", 32, None),
    0x0011: ("bn_p638", 80, None),
    0x0020: ("sm2_p256", 32, None),
}
_SYMMETRIC: Final = (w.ALG_AES, w.ALG_SM4, w.ALG_CAMELLIA)
_RSA_SCHEMES_WITH_HASH: Final = (w.ALG_RSASSA, w.ALG_RSAPSS, w.ALG_OAEP)
_ECC_SCHEMES_WITH_HASH: Final = (w.ALG_ECDSA, w.ALG_ECDH, w.ALG_SM2, w.ALG_ECSCHNORR, w.ALG_ECMQV)
_KDFS: Final = (w.ALG_MGF1, w.ALG_KDF1_SP800_56A, w.ALG_KDF2, w.ALG_KDF1_SP800_108)


def _hash_field(r: w.Reader, field: str) -> int:
    alg = r.u16(field)
    w.hash_by_id(alg, f"{r.what}: {field}")
    return alg


# --------------------------------------------------------------------------------------------
# TPMS_ATTEST


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCRs selected in it (ascending)."""

    hash_alg: int
    size_of_select: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        """The bank's hash name ("sha256"), as used for PCR value mappings and policies."""
        return w.alg_name(self.hash_alg)

    @property
    def digest_size(self) -> int:
        return w.hash_by_id(self.hash_alg, "PCR bank").size

    def fields(self) -> dict[str, object]:
        return {"hash": self.bank, "hash_alg": self.hash_alg, "pcrs": list(self.pcrs)}


def _parse_pcr_selections(r: w.Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("pcrSelect.count")
    if count > _MAX_BANKS:
        raise MalformedError(f"{r.what}: {count} PCR selections (at most {_MAX_BANKS})")
    out: list[PcrSelection] = []
    seen: set[int] = set()
    for index in range(count):
        field = f"pcrSelect[{index}]"
        alg = _hash_field(r, f"{field}.hash")
        if alg in seen:
            raise MalformedError(f"{r.what}: bank {w.alg_name(alg)} selected twice")
        seen.add(alg)
        size = r.u8(f"{field}.sizeofSelect")
        if size > MAX_PCR_SELECT:
            raise MalformedError(
                f"{r.what}: {field}.sizeofSelect is {size} (at most {MAX_PCR_SELECT})"
            )
        bitmap = r.take(size, f"{field}.pcrSelect")
        pcrs = tuple(i for i in range(size * 8) if bitmap[i // 8] & (1 << (i % 8)))
        out.append(PcrSelection(alg, size, pcrs))
    return tuple(out)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """Parse a marshalled TPML_PCR_SELECTION (exactly)."""
    r = w.Reader(data, "TPML_PCR_SELECTION")
    out = _parse_pcr_selections(r)
    r.finish()
    return out


def _check_name(name: bytes, what: str) -> None:
    # A TPM2B_NAME is empty, a 4-byte handle, or nameAlg || digest.
    if len(name) in (0, 4):
        return
    if len(name) < 2:
        raise MalformedError(f"{what}: {len(name)}-byte name")
    alg = w.hash_by_id(int.from_bytes(name[:2], "big"), f"{what} algorithm")
    if len(name) != 2 + alg.size:
        raise MalformedError(
            f"{what}: {alg.name} name must be {2 + alg.size} bytes, got {len(name)}"
        )


@dataclass(frozen=True)
class TpmsAttest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (what TPM2_Quote signs)."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes

    def selection(self) -> dict[str, tuple[int, ...]]:
        """The quoted PCRs per bank name, in selection order."""
        return {s.bank: s.pcrs for s in self.pcr_select}

    def fields(self) -> dict[str, object]:
        """Parsed fields in the test-vector manifest's representation."""
        return {
            "magic": f"0x{self.magic:08x}",
            "type": f"0x{self.type:04x}",
            "qualified_signer": self.qualified_signer.hex(),
            "extra_data": self.extra_data.hex(),
            "clock": self.clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": int(self.safe),
            "firmware_version": f"0x{self.firmware_version:016x}",
            "pcr_select": [s.fields() for s in self.pcr_select],
            "pcr_digest": self.pcr_digest.hex(),
            "trailing_bytes": 0,
        }


def parse_attest(data: bytes) -> TpmsAttest:
    """Parse a TPM2_Quote TPMS_ATTEST (the ``quoted`` output, without the TPM2B size)."""
    r = w.Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise MalformedError(
            f"TPMS_ATTEST: magic is 0x{magic:08x}, expected 0x{TPM_GENERATED_VALUE:08x} "
            "(TPM_GENERATED_VALUE)"
        )
    kind = r.u16("type")
    if kind != ATTEST_QUOTE:
        raise MalformedError(
            f"TPMS_ATTEST: type is 0x{kind:04x}, expected 0x{ATTEST_QUOTE:04x} (a quote)"
        )
    signer = r.sized("qualifiedSigner", _MAX_NAME)
    _check_name(signer, "TPMS_ATTEST: qualifiedSigner")
    extra = r.sized("extraData", _MAX_DATA)
    clock = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    if safe not in (0, 1):
        raise MalformedError(f"TPMS_ATTEST: clockInfo.safe is {safe}, expected 0 or 1")
    firmware = r.u64("firmwareVersion")
    selections = _parse_pcr_selections(r)
    digest = r.sized("pcrDigest", w.MAX_DIGEST)
    r.finish()
    return TpmsAttest(
        raw=bytes(data),
        magic=magic,
        type=kind,
        qualified_signer=signer,
        extra_data=extra,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware,
        pcr_select=selections,
        pcr_digest=digest,
    )


# --------------------------------------------------------------------------------------------
# TPMT_PUBLIC


@dataclass(frozen=True)
class SymmetricDefinition:
    """TPMT_SYM_DEF_OBJECT of a storage key (absent, i.e. TPM_ALG_NULL, for signing keys)."""

    algorithm: int
    key_bits: int
    mode: int


@dataclass(frozen=True)
class RsaParameters:
    symmetric: SymmetricDefinition | None
    scheme: int
    scheme_hash: int | None
    key_bits: int
    #: The public exponent (a marshalled 0 means the default 65537).
    exponent: int


@dataclass(frozen=True)
class EccParameters:
    symmetric: SymmetricDefinition | None
    scheme: int
    scheme_hash: int | None
    scheme_count: int | None
    curve: int
    kdf: int
    kdf_hash: int | None

    @property
    def curve_name(self) -> str:
        return _CURVES[self.curve][0]


@dataclass(frozen=True)
class EccPoint:
    x: bytes
    y: bytes


@dataclass(frozen=True)
class TpmtPublic:
    """A TPMT_PUBLIC of an RSA or ECC key. ``raw`` is the exact marshalled structure."""

    raw: bytes
    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParameters | EccParameters
    unique: bytes | EccPoint

    @property
    def is_restricted(self) -> bool:
        return bool(self.object_attributes & RESTRICTED)

    @property
    def is_signing(self) -> bool:
        return bool(self.object_attributes & SIGN_ENCRYPT)

    @property
    def is_fixed_tpm(self) -> bool:
        return bool(self.object_attributes & FIXED_TPM)

    def attribute_names(self) -> list[str]:
        return [n for bit, n in _ATTRIBUTE_NAMES if self.object_attributes & bit]

    @property
    def scheme(self) -> int:
        """The key's signing scheme (TPM_ALG_NULL when the key leaves it to the command)."""
        return self.parameters.scheme

    @property
    def scheme_hash(self) -> int | None:
        return self.parameters.scheme_hash

    def name(self) -> bytes:
        """The TPM Name: nameAlg (2 bytes) || H_nameAlg(TPMT_PUBLIC)."""
        alg = w.hash_by_id(self.name_alg, "TPMT_PUBLIC nameAlg")
        return self.name_alg.to_bytes(2, "big") + alg.digest(self.raw)

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` public key (MalformedError if it is not a valid key)."""
        if isinstance(self.parameters, RsaParameters):
            assert isinstance(self.unique, bytes)
            exponent = self.parameters.exponent or 65537
            try:
                return rsa.RSAPublicNumbers(
                    exponent, int.from_bytes(self.unique, "big")
                ).public_key()
            except ValueError as exc:
                raise MalformedError(f"TPMT_PUBLIC: not a valid RSA public key ({exc})") from exc
        assert isinstance(self.unique, EccPoint)
        name, _, curve = _CURVES[self.parameters.curve]
        if curve is None:
            raise MalformedError(f"TPMT_PUBLIC: curve {name} is not supported")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(self.unique.x, "big"), int.from_bytes(self.unique.y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise MalformedError(f"TPMT_PUBLIC: not a point on {name} ({exc})") from exc

    def fields(self) -> dict[str, object]:
        p = self.parameters
        out: dict[str, object] = {
            "type": w.alg_name(self.type),
            "name_alg": w.alg_name(self.name_alg),
            "object_attributes": f"0x{self.object_attributes:08x}",
            "attributes": self.attribute_names(),
            "auth_policy": self.auth_policy.hex(),
            "scheme": w.alg_name(p.scheme),
            "scheme_hash": None if p.scheme_hash is None else w.alg_name(p.scheme_hash),
        }
        if isinstance(p, RsaParameters):
            out["key_bits"] = p.key_bits
            out["exponent"] = p.exponent or 65537
        else:
            out["curve"] = p.curve_name
        out["name"] = self.name().hex()
        return out


def _parse_symmetric(r: w.Reader) -> SymmetricDefinition | None:
    alg = r.u16("parameters.symmetric.algorithm")
    if alg == w.ALG_NULL:
        return None
    if alg not in _SYMMETRIC:
        raise MalformedError(f"{r.what}: symmetric algorithm {w.alg_name(alg)} not allowed")
    bits = r.u16("parameters.symmetric.keyBits")
    mode = r.u16("parameters.symmetric.mode")
    if mode not in (w.ALG_CTR, w.ALG_OFB, w.ALG_CBC, w.ALG_CFB, w.ALG_ECB, w.ALG_NULL):
        raise MalformedError(f"{r.what}: symmetric mode {w.alg_name(mode)} not allowed")
    return SymmetricDefinition(alg, bits, mode)


def _parse_rsa(r: w.Reader) -> tuple[RsaParameters, bytes]:
    symmetric = _parse_symmetric(r)
    scheme = r.u16("parameters.scheme")
    scheme_hash: int | None = None
    if scheme in _RSA_SCHEMES_WITH_HASH:
        scheme_hash = _hash_field(r, "parameters.scheme.hashAlg")
    elif scheme not in (w.ALG_NULL, w.ALG_RSAES):
        raise MalformedError(f"{r.what}: {w.alg_name(scheme)} is not an RSA scheme")
    key_bits = r.u16("parameters.keyBits")
    if key_bits % 8 or not 1024 <= key_bits <= _MAX_RSA_BYTES * 8:
        raise MalformedError(f"{r.what}: RSA keyBits {key_bits} not supported")
    exponent = r.u32("parameters.exponent")
    modulus = r.sized("unique.rsa", _MAX_RSA_BYTES)
    if len(modulus) * 8 != key_bits:
        raise MalformedError(
            f"{r.what}: RSA modulus is {len(modulus)} bytes, keyBits says {key_bits // 8}"
        )
    return RsaParameters(symmetric, scheme, scheme_hash, key_bits, exponent), modulus


def _parse_ecc(r: w.Reader) -> tuple[EccParameters, EccPoint]:
    symmetric = _parse_symmetric(r)
    scheme = r.u16("parameters.scheme")
    scheme_hash: int | None = None
    count: int | None = None
    if scheme in _ECC_SCHEMES_WITH_HASH:
        scheme_hash = _hash_field(r, "parameters.scheme.hashAlg")
    elif scheme == w.ALG_ECDAA:
        scheme_hash = _hash_field(r, "parameters.scheme.hashAlg")
        count = r.u16("parameters.scheme.count")
    elif scheme != w.ALG_NULL:
        raise MalformedError(f"{r.what}: {w.alg_name(scheme)} is not an ECC scheme")
    curve = r.u16("parameters.curveID")
    if curve not in _CURVES:
        raise MalformedError(f"{r.what}: unknown ECC curve 0x{curve:04x}")
    kdf = r.u16("parameters.kdf.scheme")
    kdf_hash: int | None = None
    if kdf in _KDFS:
        kdf_hash = _hash_field(r, "parameters.kdf.hashAlg")
    elif kdf != w.ALG_NULL:
        raise MalformedError(f"{r.what}: {w.alg_name(kdf)} is not a KDF")
    size = _CURVES[curve][1]
    x = r.sized("unique.ecc.x", _MAX_ECC_BYTES)
    y = r.sized("unique.ecc.y", _MAX_ECC_BYTES)
    for label, coordinate in (("x", x), ("y", y)):
        if len(coordinate) != size:
            raise MalformedError(
                f"{r.what}: ECC {label} is {len(coordinate)} bytes, the curve needs {size}"
            )
    params = EccParameters(symmetric, scheme, scheme_hash, count, curve, kdf, kdf_hash)
    return params, EccPoint(x, y)


def parse_public(data: bytes) -> TpmtPublic:
    """Parse a TPMT_PUBLIC (no TPM2B size prefix) of an RSA or ECC key."""
    r = w.Reader(data, "TPMT_PUBLIC")
    kind = r.u16("type")
    if kind not in (w.ALG_RSA, w.ALG_ECC):
        raise MalformedError(f"TPMT_PUBLIC: type {w.alg_name(kind)} is not an RSA or ECC key")
    name_alg = _hash_field(r, "nameAlg")
    if not w.hash_by_id(name_alg, "nameAlg").computable:
        # The key's Name (nameAlg || H(TPMT_PUBLIC)) could not be computed, and the Name is
        # how a TPM object is known: refuse here, not when someone first asks for it.
        raise MalformedError(
            f"TPMT_PUBLIC: nameAlg {w.alg_name(name_alg)} is not supported here "
            "(the key's Name could not be computed)"
        )
    attributes = r.u32("objectAttributes")
    if attributes & _RESERVED_ATTRIBUTES:
        raise MalformedError(
            f"TPMT_PUBLIC: reserved objectAttributes bits set "
            f"(0x{attributes & _RESERVED_ATTRIBUTES:08x})"
        )
    policy = r.sized("authPolicy", w.MAX_DIGEST)
    if policy and len(policy) != w.hash_by_id(name_alg, "nameAlg").size:
        raise MalformedError(
            f"TPMT_PUBLIC: authPolicy is {len(policy)} bytes, not a {w.alg_name(name_alg)} digest"
        )
    parameters: RsaParameters | EccParameters
    unique: bytes | EccPoint
    if kind == w.ALG_RSA:
        parameters, unique = _parse_rsa(r)
    else:
        parameters, unique = _parse_ecc(r)
    r.finish()
    return TpmtPublic(bytes(data), kind, name_alg, attributes, policy, parameters, unique)


# --------------------------------------------------------------------------------------------
# TPMT_SIGNATURE


@dataclass(frozen=True)
class RsaSignature:
    signature: bytes


@dataclass(frozen=True)
class EccSignature:
    r: bytes
    s: bytes

    def der(self) -> bytes:
        """The signature as an X9.62 DER ECDSA-Sig-Value (what ``cryptography`` verifies)."""
        return encode_dss_signature(int.from_bytes(self.r, "big"), int.from_bytes(self.s, "big"))


_SIGNATURE_ALGS: Final = (w.ALG_RSASSA, w.ALG_RSAPSS, w.ALG_ECDSA)


@dataclass(frozen=True)
class TpmtSignature:
    """A TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA). ``raw`` is None when built from raw bytes."""

    sig_alg: int
    hash_alg: int
    value: RsaSignature | EccSignature
    raw: bytes | None = None

    @property
    def scheme(self) -> str:
        return w.alg_name(self.sig_alg)

    @property
    def hash(self) -> str:
        return w.alg_name(self.hash_alg)

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {"sig_alg": self.scheme, "sig_hash": self.hash}
        if isinstance(self.value, RsaSignature):
            out["signature"] = self.value.signature.hex()
        else:
            out["r"] = self.value.r.hex()
            out["s"] = self.value.s.hex()
        return out


def parse_signature(data: bytes) -> TpmtSignature:
    """Parse a marshalled TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA)."""
    r = w.Reader(data, "TPMT_SIGNATURE")
    sig_alg = r.u16("sigAlg")
    if sig_alg not in _SIGNATURE_ALGS:
        raise MalformedError(
            f"TPMT_SIGNATURE: signature algorithm {w.alg_name(sig_alg)} is not supported "
            "(rsassa, rsapss, ecdsa)"
        )
    hash_alg = _hash_field(r, "signature.hash")
    value: RsaSignature | EccSignature
    if sig_alg == w.ALG_ECDSA:
        sig_r = r.sized("signature.signatureR", _MAX_ECC_BYTES)
        sig_s = r.sized("signature.signatureS", _MAX_ECC_BYTES)
        if not sig_r or not sig_s:
            raise MalformedError("TPMT_SIGNATURE: empty ECDSA r or s")
        value = EccSignature(sig_r, sig_s)
    else:
        sig = r.sized("signature.sig", _MAX_RSA_BYTES)
        if not sig:
            raise MalformedError("TPMT_SIGNATURE: empty RSA signature")
        value = RsaSignature(sig)
    r.finish()
    return TpmtSignature(sig_alg, hash_alg, value, bytes(data))


def signature_from_raw(
    signature: bytes, *, sig_alg: str = "rsassa", hash_alg: str = "sha256"
) -> TpmtSignature:
    """Wrap a bare signature (as Azure's and trustee's JSON carry it) as a TpmtSignature.

    RSA schemes take the signature bytes as they are; ``ecdsa`` takes ``r || s`` (two halves of
    equal length).
    """
    if not isinstance(signature, bytes | bytearray) or not signature:
        raise MalformedError("raw TPM signature: expected non-empty bytes")
    algs = {"rsassa": w.ALG_RSASSA, "rsapss": w.ALG_RSAPSS, "ecdsa": w.ALG_ECDSA}
    if sig_alg not in algs:
        raise MalformedError(
            f"raw TPM signature: unknown scheme {sig_alg!r} (rsassa, rsapss, ecdsa)"
        )
    hash_id = w.hash_by_name(hash_alg, "raw TPM signature").alg
    value: RsaSignature | EccSignature
    if sig_alg == "ecdsa":
        if len(signature) % 2 or len(signature) > 2 * _MAX_ECC_BYTES:
            raise MalformedError(f"raw ECDSA signature: {len(signature)} bytes is not r || s")
        half = len(signature) // 2
        value = EccSignature(bytes(signature[:half]), bytes(signature[half:]))
    else:
        if len(signature) > _MAX_RSA_BYTES:
            raise MalformedError(f"raw RSA signature: {len(signature)} bytes is too long")
        value = RsaSignature(bytes(signature))
    return TpmtSignature(algs[sig_alg], hash_id, value, None)
