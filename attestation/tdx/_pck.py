"""The Intel SGX extensions of a PCK certificate (OID 1.2.840.113741.1.13.1).

The extension value is a SEQUENCE of (OID, value) pairs (Intel SGX PCK Certificate and CRL
Profile): PPID, TCB (comp01..comp16, pcesvn, cpusvn), PCE-ID, FMSPC, SGX type, and for platform
CA certificates PlatformInstanceID and Configuration. Read with the strict DER reader; no crypto.
"""

from __future__ import annotations

from dataclasses import dataclass

from attestation import _der
from attestation._x509 import Certificate
from attestation.errors import MalformedError

__all__ = ["SGX_EXTENSIONS_OID", "PckExtensions", "PckTcb", "parse_pck_extensions"]

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_PPID = SGX_EXTENSIONS_OID + ".1"
_TCB = SGX_EXTENSIONS_OID + ".2"
_PCE_ID = SGX_EXTENSIONS_OID + ".3"
_FMSPC = SGX_EXTENSIONS_OID + ".4"
_SGX_TYPE = SGX_EXTENSIONS_OID + ".5"
_PLATFORM_INSTANCE_ID = SGX_EXTENSIONS_OID + ".6"
_CONFIGURATION = SGX_EXTENSIONS_OID + ".7"
_PCESVN = _TCB + ".17"
_CPUSVN = _TCB + ".18"
_CONFIG_FLAGS = {
    _CONFIGURATION + ".1": "dynamic_platform",
    _CONFIGURATION + ".2": "cached_keys",
    _CONFIGURATION + ".3": "smt_enabled",
}
_ENUMERATED = 0x0A
_SGX_TYPES = {0: "Standard", 1: "Scalable", 2: "ScalableWithIntegrity"}


@dataclass(frozen=True)
class PckTcb:
    """The platform TCB the PCK certificate was issued for."""

    #: comp01 .. comp16 (SGX TCB component SVNs).
    components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            f"comp{i:02d}": svn for i, svn in enumerate(self.components, start=1)
        }
        out["pcesvn"] = self.pcesvn
        out["cpusvn"] = self.cpusvn.hex()
        return out


@dataclass(frozen=True)
class PckExtensions:
    ppid: bytes
    tcb: PckTcb
    pce_id: bytes
    fmspc: bytes
    #: 0 Standard, 1 Scalable, 2 Scalable with integrity.
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None
    #: OIDs under the SGX arc this parser does not know (kept, not interpreted).
    unknown: tuple[str, ...] = ()

    @property
    def sgx_type_name(self) -> str:
        return _SGX_TYPES.get(self.sgx_type, f"unknown ({self.sgx_type})")

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ppid": self.ppid.hex(),
            "tcb": self.tcb.fields(),
            "pceid": self.pce_id.hex(),
            "fmspc": self.fmspc.hex(),
            "sgx_type": self.sgx_type,
        }
        if self.platform_instance_id is not None:
            out["platform_instance_id"] = self.platform_instance_id.hex()
        for name in ("dynamic_platform", "cached_keys", "smt_enabled"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _pairs(node: _der.Node, what: str) -> dict[str, _der.Node]:
    """A SEQUENCE OF SEQUENCE {OID, value} as a mapping; duplicates are malformed."""
    out: dict[str, _der.Node] = {}
    for item in node.expect(_der.SEQUENCE, what).children():
        parts = item.expect(_der.SEQUENCE, f"{what} entry").children()
        if len(parts) != 2:
            raise MalformedError(f"PCK SGX extension: {what} entry must be (OID, value)")
        oid = parts[0].as_oid()
        if oid in out:
            raise MalformedError(f"PCK SGX extension: duplicate {oid}")
        out[oid] = parts[1]
    return out


def _octets(node: _der.Node, length: int, what: str) -> bytes:
    value = node.as_octets()
    if len(value) != length:
        raise MalformedError(f"PCK SGX extension: {what} must be {length} bytes, got {len(value)}")
    return value


def _small_int(node: _der.Node, maximum: int, what: str) -> int:
    value = node.as_int()
    if not 0 <= value <= maximum:
        raise MalformedError(f"PCK SGX extension: {what} {value} out of range 0..{maximum}")
    return value


def _require(items: dict[str, _der.Node], oid: str, what: str) -> _der.Node:
    node = items.get(oid)
    if node is None:
        raise MalformedError(f"PCK SGX extension: {what} ({oid}) is missing")
    return node


def _tcb(node: _der.Node) -> PckTcb:
    items = _pairs(node, "TCB")
    components = tuple(
        _small_int(_require(items, f"{_TCB}.{i}", f"comp{i:02d}"), 255, f"comp{i:02d}")
        for i in range(1, 17)
    )
    pcesvn = _small_int(_require(items, _PCESVN, "pcesvn"), 0xFFFF, "pcesvn")
    cpusvn = _octets(_require(items, _CPUSVN, "cpusvn"), 16, "cpusvn")
    extra = set(items) - {f"{_TCB}.{i}" for i in range(1, 19)}
    if extra:
        raise MalformedError(f"PCK SGX extension: unknown TCB entries {sorted(extra)}")
    return PckTcb(components, pcesvn, cpusvn)


def parse_pck_extensions(cert: Certificate) -> PckExtensions:
    """Parse the SGX extension of a PCK certificate; MalformedError if absent or malformed."""
    value = cert.extension(SGX_EXTENSIONS_OID)
    if value is None:
        raise MalformedError(
            f"{cert.describe()}: no Intel SGX extension ({SGX_EXTENSIONS_OID}); not a PCK "
            "certificate"
        )
    try:
        return _parse_sgx_extension(value)
    except MalformedError as exc:
        raise MalformedError(f"{cert.describe()}: {exc.message}") from exc


def _parse_sgx_extension(value: bytes) -> PckExtensions:
    items = _pairs(_der.parse(value), "SGX extensions")
    sgx_type_node = _require(items, _SGX_TYPE, "SGX type")
    if sgx_type_node.tag != _ENUMERATED:
        raise MalformedError("PCK SGX extension: SGX type must be ENUMERATED")
    sgx_type = _small_int(
        _der.Node(_der.INTEGER, sgx_type_node.raw, sgx_type_node.content), 255, "SGX type"
    )
    platform_instance_id = None
    if _PLATFORM_INSTANCE_ID in items:
        platform_instance_id = _octets(items[_PLATFORM_INSTANCE_ID], 16, "PlatformInstanceID")
    flags: dict[str, bool] = {}
    if _CONFIGURATION in items:
        for oid, node in _pairs(items[_CONFIGURATION], "Configuration").items():
            if oid not in _CONFIG_FLAGS:
                raise MalformedError(f"PCK SGX extension: unknown configuration {oid}")
            flags[_CONFIG_FLAGS[oid]] = node.as_bool()
    known = {_PPID, _TCB, _PCE_ID, _FMSPC, _SGX_TYPE, _PLATFORM_INSTANCE_ID, _CONFIGURATION}
    return PckExtensions(
        ppid=_octets(_require(items, _PPID, "PPID"), 16, "PPID"),
        tcb=_tcb(_require(items, _TCB, "TCB")),
        pce_id=_octets(_require(items, _PCE_ID, "PCE-ID"), 2, "PCE-ID"),
        fmspc=_octets(_require(items, _FMSPC, "FMSPC"), 6, "FMSPC"),
        sgx_type=sgx_type,
        platform_instance_id=platform_instance_id,
        dynamic_platform=flags.get("dynamic_platform"),
        cached_keys=flags.get("cached_keys"),
        smt_enabled=flags.get("smt_enabled"),
        unknown=tuple(sorted(set(items) - known)),
    )
