"""AMD VCEK/VLEK certificate extensions (parse only; no crypto).

AMD's Key Distribution Service (KDS) puts the TCB the key was derived for, the product and the
chip identity into private extensions under 1.3.6.1.4.1.3704.1. The SPL values are DER
INTEGERs, names are IA5Strings, and hwID is the raw chip id with no DER wrapper: 64 bytes for
Milan and Genoa, 8 bytes for Turin (whose report CHIP_ID is those 8 bytes and 56 zero bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from attestation import _der
from attestation._x509 import Certificate
from attestation.errors import MalformedError
from attestation.snp.report import PRODUCTS, TcbLayout, TcbVersion, tcb_layout_for

__all__ = [
    "OID_BL_SPL",
    "OID_CSP_ID",
    "OID_FMC_SPL",
    "OID_HW_ID",
    "OID_PRODUCT_NAME",
    "OID_SNP_SPL",
    "OID_STRUCT_VERSION",
    "OID_TEE_SPL",
    "OID_UCODE_SPL",
    "VcekExtensions",
    "parse_vcek_extensions",
    "product_of_name",
]

_AMD: Final = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION: Final = f"{_AMD}.1"
OID_PRODUCT_NAME: Final = f"{_AMD}.2"
OID_BL_SPL: Final = f"{_AMD}.3.1"
OID_TEE_SPL: Final = f"{_AMD}.3.2"
OID_SNP_SPL: Final = f"{_AMD}.3.3"
OID_SPL: Final = {n: f"{_AMD}.3.{n}" for n in (4, 5, 6, 7)}
OID_UCODE_SPL: Final = f"{_AMD}.3.8"
OID_FMC_SPL: Final = f"{_AMD}.3.9"
OID_HW_ID: Final = f"{_AMD}.4"
OID_CSP_ID: Final = f"{_AMD}.5"

_STRING_TAGS = (0x16, 0x0C, 0x13)  # IA5String (what KDS uses), UTF8String, PrintableString
_HWID_SIZES = (64, 8)


def product_of_name(product_name: str) -> str | None:
    """``"Milan-B0"`` -> ``"Milan"``; None for a product this library does not know."""
    base = product_name.split("-", 1)[0]
    return base if base in PRODUCTS else None


def _integer(value: bytes, what: str) -> int:
    number = _der.parse(value).as_int()
    if not 0 <= number <= 0xFF:
        raise MalformedError(f"VCEK extension {what}: {number} is not a byte value")
    return number


def _string(value: bytes, what: str) -> str:
    node = _der.parse(value)
    if node.tag not in _STRING_TAGS:
        raise MalformedError(f"VCEK extension {what}: not a string (tag 0x{node.tag:02x})")
    return node.as_text()


def _hwid(value: bytes) -> tuple[bytes, str]:
    if len(value) in _HWID_SIZES:
        return value, "raw"
    # Tolerate a DER OCTET STRING wrapper around the same bytes.
    try:
        inner = _der.parse(value).as_octets()
    except MalformedError:
        inner = b""
    if len(inner) in _HWID_SIZES:
        return inner, "octet-string"
    raise MalformedError(f"VCEK hwID: {len(value)} bytes, expected 64 (Milan/Genoa) or 8 (Turin)")


@dataclass(frozen=True)
class VcekExtensions:
    """The AMD extensions of a VCEK or VLEK certificate."""

    struct_version: int | None
    product_name: str
    bl_spl: int
    tee_spl: int
    snp_spl: int
    ucode_spl: int
    fmc_spl: int | None = None
    spl_4: int | None = None
    spl_5: int | None = None
    spl_6: int | None = None
    spl_7: int | None = None
    hwid: bytes | None = None
    hwid_encoding: str | None = None
    csp_id: str | None = None

    @property
    def product(self) -> str | None:
        return product_of_name(self.product_name)

    def tcb_raw(self, layout: TcbLayout) -> int:
        """The 64-bit TCB_VERSION these extensions describe, in ``layout``."""
        if layout == "turin":
            b = [
                self.fmc_spl or 0,
                self.bl_spl,
                self.tee_spl,
                self.snp_spl,
                self.spl_5 or 0,
                self.spl_6 or 0,
                self.spl_7 or 0,
                self.ucode_spl,
            ]
        else:
            b = [
                self.bl_spl,
                self.tee_spl,
                self.spl_4 or 0,
                self.spl_5 or 0,
                self.spl_6 or 0,
                self.spl_7 or 0,
                self.snp_spl,
                self.ucode_spl,
            ]
        return int.from_bytes(bytes(b), "little")

    def tcb(self, layout: TcbLayout | None = None) -> TcbVersion:
        """The TCB as a decoded :class:`TcbVersion` (layout from the product by default)."""
        layout = layout or tcb_layout_for(self.product)
        return TcbVersion.decode(self.tcb_raw(layout), layout)

    def to_dict(self) -> dict[str, object]:
        """The manifest representation (``vcek_extensions``): only present extensions."""
        out: dict[str, object] = {
            "struct_version": self.struct_version,
            "product_name": self.product_name,
            "bl_spl": self.bl_spl,
            "tee_spl": self.tee_spl,
            "snp_spl": self.snp_spl,
            "ucode_spl": self.ucode_spl,
        }
        optional: dict[str, object] = {
            "fmc_spl": self.fmc_spl,
            "spl_4": self.spl_4,
            "spl_5": self.spl_5,
            "spl_6": self.spl_6,
            "spl_7": self.spl_7,
            "hwid": None if self.hwid is None else self.hwid.hex(),
            "hwid_encoding": self.hwid_encoding,
            "csp_id": self.csp_id,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def parse_vcek_extensions(cert: Certificate) -> VcekExtensions:
    """Read the AMD extensions of ``cert``; a missing TCB or product extension is malformed."""

    def required(oid: str, what: str) -> bytes:
        value = cert.extension(oid)
        if value is None:
            raise MalformedError(f"{cert.describe()}: missing AMD extension {what} ({oid})")
        return value

    def optional_int(oid: str, what: str) -> int | None:
        value = cert.extension(oid)
        return None if value is None else _integer(value, what)

    struct_version = optional_int(OID_STRUCT_VERSION, "structVersion")
    product_name = _string(required(OID_PRODUCT_NAME, "productName"), "productName")
    hwid: bytes | None = None
    encoding: str | None = None
    raw_hwid = cert.extension(OID_HW_ID)
    if raw_hwid is not None:
        hwid, encoding = _hwid(raw_hwid)
    csp = cert.extension(OID_CSP_ID)
    extensions = VcekExtensions(
        struct_version=struct_version,
        product_name=product_name,
        bl_spl=_integer(required(OID_BL_SPL, "blSPL"), "blSPL"),
        tee_spl=_integer(required(OID_TEE_SPL, "teeSPL"), "teeSPL"),
        snp_spl=_integer(required(OID_SNP_SPL, "snpSPL"), "snpSPL"),
        ucode_spl=_integer(required(OID_UCODE_SPL, "ucodeSPL"), "ucodeSPL"),
        fmc_spl=optional_int(OID_FMC_SPL, "fmcSPL"),
        spl_4=optional_int(OID_SPL[4], "spl_4"),
        spl_5=optional_int(OID_SPL[5], "spl_5"),
        spl_6=optional_int(OID_SPL[6], "spl_6"),
        spl_7=optional_int(OID_SPL[7], "spl_7"),
        hwid=hwid,
        hwid_encoding=encoding,
        csp_id=None if csp is None else _string(csp, "cspID"),
    )
    if extensions.product == "Turin" and extensions.fmc_spl is None:
        raise MalformedError(f"{cert.describe()}: Turin certificate without fmcSPL")
    return extensions
