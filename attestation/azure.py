"""Azure confidential VMs: the HCL (Host Compatibility Layer) attestation report.

On Azure SEV-SNP and TDX confidential VMs the guest does not see the hardware report directly:
the paravisor (HCL) requests it with ``REPORT_DATA[0:32] = SHA-256(runtime data)`` and stores the
result in vTPM NV index 0x01400001. The runtime data is a JSON document holding the vTPM
attestation key ("HCLAkPub"), so a verified hardware report vouches for the vTPM's AK.

Layout (little-endian), as written by OpenHCL (``IgvmAttestRequestBase``)::

    0x000  header (32 bytes): "HCLA", version, report_size, request_type, status, reserved[3]
    0x020  hardware report area (0x4A0 bytes): SNP report (1184) or TDX TDREPORT (1024 + zeros)
    0x4C0  request data (20 bytes): data_size, version, report_type, hash_type, variable_data_size
    0x4D4  variable data: the runtime JSON (variable_data_size bytes)
    ...    zero padding up to the end of the NV index

This module only parses and checks the binding; the hardware report itself is verified by
:mod:`attestation.snp` or :mod:`attestation.tdx`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import rsa

from attestation._checks import Checks
from attestation._json import loads_object
from attestation.errors import BindingError, MalformedError

__all__ = [
    "HCL_SIGNATURE",
    "HclReport",
    "parse_hcl_report",
    "verify_hcl_binding",
]

HCL_SIGNATURE = b"HCLA"
_HEADER = struct.Struct("<4s7I")  # signature, version, report_size, request_type, status, rsvd[3]
_HW_REPORT_OFFSET = 0x20
_HW_REPORT_AREA = 0x4A0
_REQUEST_DATA = struct.Struct("<5I")
_REQUEST_DATA_OFFSET = _HW_REPORT_OFFSET + _HW_REPORT_AREA  # 0x4C0
_VARIABLE_DATA_OFFSET = _REQUEST_DATA_OFFSET + _REQUEST_DATA.size  # 0x4D4
_HEADER_VERSIONS = (1, 2)
_REQUEST_DATA_VERSION = 1

SNP_REPORT_SIZE = 1184
TDX_REPORT_SIZE = 1024
_REPORT_TYPES: dict[int, tuple[Literal["snp", "tdx"], int]] = {
    2: ("snp", SNP_REPORT_SIZE),
    4: ("tdx", TDX_REPORT_SIZE),
}
_HASH_TYPES = {1: "sha256", 2: "sha384", 3: "sha512"}
AK_KEY_ID = "HCLAkPub"
EK_KEY_ID = "HCLEkPub"
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


@dataclass(frozen=True)
class HclReport:
    """A parsed Azure HCL report. Nothing in it is verified by parsing."""

    version: int
    request_type: int
    status: int
    report_type: Literal["snp", "tdx"]
    report_type_id: int
    hash_type: str  # "sha256" | "sha384" | "sha512": the hash bound into REPORT_DATA
    hash_type_id: int
    tee_report: bytes  # the SNP report (1184 bytes) or TDX TDREPORT (1024 bytes)
    runtime_data: bytes  # the exact runtime JSON bytes that were hashed
    runtime_claims: Mapping[str, object] = field(compare=False)
    ak_public: rsa.RSAPublicKey = field(compare=False)
    ek_public: rsa.RSAPublicKey | None = field(default=None, compare=False)
    user_data: bytes | None = None
    runtime_keys: tuple[str, ...] = ()

    @property
    def platform(self) -> Literal["sev-snp", "tdx"]:
        """The evidence platform name of the hardware report ("sev-snp" or "tdx")."""
        return "sev-snp" if self.report_type == "snp" else "tdx"

    def runtime_data_digest(self) -> bytes:
        """The digest of the runtime JSON with the report's hash type (what REPORT_DATA holds)."""
        return hashlib.new(self.hash_type, self.runtime_data).digest()

    def fields(self) -> dict[str, object]:
        """Flat summary in the test-vector manifest's representation."""
        vm_config = self.runtime_claims.get("vm-configuration")
        return {
            "signature": HCL_SIGNATURE.decode(),
            "version": self.version,
            "report_type": self.report_type_id,
            "report_kind": self.report_type,
            "hash_type": self.hash_type_id,
            "runtime_data_len": len(self.runtime_data),
            "runtime_data_sha256": hashlib.sha256(self.runtime_data).hexdigest(),
            "runtime_keys": list(self.runtime_keys),
            "vm_configuration": None if vm_config is None else _thaw(vm_config),
            "user_data": None if self.user_data is None else self.user_data.hex(),
            "ak_public_bits": self.ak_public.key_size,
        }


def _thaw(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze(value: object) -> object:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _b64url_int(value: object, what: str) -> int:
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise MalformedError(f"HCL runtime data: {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedError(f"HCL runtime data: {what} is not base64url") from exc
    if not raw:
        raise MalformedError(f"HCL runtime data: {what} is empty")
    return int.from_bytes(raw, "big")


def _rsa_jwk(jwk: Mapping[str, object], kid: str) -> rsa.RSAPublicKey:
    if jwk.get("kty") != "RSA":
        raise MalformedError(f"HCL runtime data: key {kid} is not an RSA JWK")
    n = _b64url_int(jwk.get("n"), f"{kid}.n")
    e = _b64url_int(jwk.get("e"), f"{kid}.e")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise MalformedError(f"HCL runtime data: key {kid} is not a usable RSA key") from exc


def _keys(claims: Mapping[str, object]) -> tuple[dict[str, Mapping[str, object]], tuple[str, ...]]:
    keys = claims.get("keys")
    if not isinstance(keys, list) or not keys:
        raise MalformedError("HCL runtime data: 'keys' must be a non-empty list")
    by_kid: dict[str, Mapping[str, object]] = {}
    order: list[str] = []
    for jwk in keys:
        if not isinstance(jwk, dict):
            raise MalformedError("HCL runtime data: every entry of 'keys' must be an object")
        kid = jwk.get("kid")
        if not isinstance(kid, str):
            raise MalformedError("HCL runtime data: a key has no string 'kid'")
        if kid in by_kid:
            raise MalformedError(f"HCL runtime data: key {kid} appears twice")
        by_kid[kid] = jwk
        order.append(kid)
    return by_kid, tuple(order)


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an Azure HCL report (the content of vTPM NV index 0x01400001).

    Strict: signature, versions, every size field, the hardware report's padding, the trailing
    padding and the runtime JSON are checked; anything off raises :class:`MalformedError`.
    """
    data = bytes(data)
    if len(data) < _VARIABLE_DATA_OFFSET:
        raise MalformedError(
            f"HCL report: {len(data)} bytes, shorter than the fixed part ({_VARIABLE_DATA_OFFSET})"
        )
    signature, version, report_size, request_type, status, *reserved = _HEADER.unpack_from(data)
    if signature != HCL_SIGNATURE:
        raise MalformedError(f"HCL report: signature {signature!r}, expected {HCL_SIGNATURE!r}")
    if version not in _HEADER_VERSIONS:
        raise MalformedError(f"HCL report: unsupported header version {version}")
    if any(reserved):
        raise MalformedError("HCL report: reserved header words are not zero")
    data_size, data_version, report_type_id, hash_type_id, variable_size = (
        _REQUEST_DATA.unpack_from(data, _REQUEST_DATA_OFFSET)
    )
    if data_version != _REQUEST_DATA_VERSION:
        raise MalformedError(f"HCL report: unsupported request data version {data_version}")
    if report_type_id not in _REPORT_TYPES:
        raise MalformedError(f"HCL report: unknown report type {report_type_id} (2=SNP, 4=TDX)")
    if hash_type_id not in _HASH_TYPES:
        raise MalformedError(f"HCL report: unknown report data hash type {hash_type_id}")
    if data_size != _REQUEST_DATA.size + variable_size:
        raise MalformedError(
            f"HCL report: request data size {data_size} != 20 + variable data size {variable_size}"
        )
    end = _VARIABLE_DATA_OFFSET + variable_size
    if report_size != end:
        raise MalformedError(f"HCL report: report_size {report_size}, expected {end}")
    if end > len(data):
        raise MalformedError(
            f"HCL report: runtime data runs past the end ({end} > {len(data)} bytes)"
        )
    if any(data[end:]):
        raise MalformedError("HCL report: padding after the runtime data is not zero")
    report_type, hw_size = _REPORT_TYPES[report_type_id]
    area = data[_HW_REPORT_OFFSET:_REQUEST_DATA_OFFSET]
    if any(area[hw_size:]):
        raise MalformedError(f"HCL report: {report_type} report padding is not zero")
    runtime_data = data[_VARIABLE_DATA_OFFSET:end]
    claims = loads_object(runtime_data, what="HCL runtime data")
    by_kid, order = _keys(claims)
    if AK_KEY_ID not in by_kid:
        raise MalformedError(f"HCL runtime data: no key with kid {AK_KEY_ID}")
    ak_public = _rsa_jwk(by_kid[AK_KEY_ID], AK_KEY_ID)
    ek_public = _rsa_jwk(by_kid[EK_KEY_ID], EK_KEY_ID) if EK_KEY_ID in by_kid else None
    user_data: bytes | None = None
    if "user-data" in claims:
        text = claims["user-data"]
        if not isinstance(text, str) or not _HEX.fullmatch(text):
            raise MalformedError("HCL runtime data: 'user-data' is not a hex string")
        user_data = bytes.fromhex(text)
    vm_config = claims.get("vm-configuration")
    if vm_config is not None and not isinstance(vm_config, dict):
        raise MalformedError("HCL runtime data: 'vm-configuration' must be an object")
    frozen = _freeze(claims)
    assert isinstance(frozen, Mapping)
    return HclReport(
        version=version,
        request_type=request_type,
        status=status,
        report_type=report_type,
        report_type_id=report_type_id,
        hash_type=_HASH_TYPES[hash_type_id],
        hash_type_id=hash_type_id,
        tee_report=area[:hw_size],
        runtime_data=runtime_data,
        runtime_claims=frozen,
        ak_public=ak_public,
        ek_public=ek_public,
        user_data=user_data,
        runtime_keys=order,
    )


def verify_hcl_binding(hcl: HclReport, report_data: bytes, *, checks: Checks | None = None) -> None:
    """Require ``report_data`` (the hardware report's, 64 bytes) to start with H(runtime data).

    ``H`` is the report's hash type (SHA-256 on every Azure VM seen so far, binding
    ``report_data[:32]``); the bytes after it must be zero. Raises :class:`BindingError` when
    either does not hold.
    """
    checks = Checks() if checks is None else checks
    checks.require(
        len(report_data) == 64,
        "hcl.report_data.length",
        MalformedError,
        f"report_data must be 64 bytes, got {len(report_data)}",
        expected=64,
        actual=len(report_data),
    )
    digest = hcl.runtime_data_digest()
    checks.equal(
        "hcl.runtime_data_binding",
        digest,
        bytes(report_data[: len(digest)]),
        BindingError,
        f"report_data[0:{len(digest)}] is not {hcl.hash_type}(HCL runtime data)",
    )
    # The HCL zero-fills the rest (every Azure report seen); anything else there is data no
    # one vouches for, so refuse it rather than let a reader take it for bound.
    checks.equal(
        "hcl.report_data_padding",
        bytes(64 - len(digest)),
        bytes(report_data[len(digest) :]),
        BindingError,
        f"report_data[{len(digest)}:64] is not zero after the {hcl.hash_type} of HCL runtime data",
    )
