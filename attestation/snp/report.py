"""Parse AMD SEV-SNP attestation reports (bytes to frozen structures; no crypto, no I/O).

Layout: AMD SEV-SNP Firmware ABI specification, ``ATTESTATION_REPORT`` (report versions 2, 3
and 5; 0x4A0 bytes). Every reserved (must-be-zero) range is checked, so two different byte
strings never parse to the same report.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Literal

from attestation.errors import MalformedError

__all__ = [
    "PRODUCTS",
    "REPORT_SIZE",
    "SIGNATURE_OFFSET",
    "SUPPORTED_VERSIONS",
    "GuestPolicy",
    "SnpReport",
    "TcbLayout",
    "TcbVersion",
    "parse_report",
    "product_from_cpuid",
    "tcb_layout_for",
]

REPORT_SIZE: Final = 0x4A0
SIGNATURE_OFFSET: Final = 0x2A0
SUPPORTED_VERSIONS: Final = (2, 3, 5)
PRODUCTS: Final = ("Milan", "Genoa", "Turin")
SIGNATURE_ALGO_ECDSA_P384_SHA384: Final = 1
_ECDSA_COMPONENT = 72  # r and s: 72-byte little-endian each

SIGNING_KEY_VCEK: Final = 0
SIGNING_KEY_VLEK: Final = 1
SIGNING_KEY_NONE: Final = 7
_SIGNING_KEY_NAMES = {SIGNING_KEY_VCEK: "vcek", SIGNING_KEY_VLEK: "vlek", SIGNING_KEY_NONE: "none"}

# Guest policy bits (SNP ABI, "GUEST_POLICY").
POLICY_SMT: Final = 1 << 16
POLICY_RESERVED_ONE: Final = 1 << 17  # the ABI says this bit must be one
POLICY_MIGRATE_MA: Final = 1 << 18
POLICY_DEBUG: Final = 1 << 19
POLICY_SINGLE_SOCKET: Final = 1 << 20
# Bits 21..25 (CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS, CIPHERTEXT_HIDING, PAGE_SWAP_DISABLE) are
# defined by later ABI revisions (up to 1.58); 63:26 are reserved, must be zero.
POLICY_RESERVED_ZERO: Final = 0xFFFF_FFFF_FFFF_FFFF & ~((1 << 26) - 1)

TcbLayout = Literal["pre-turin", "turin"]

# (offset, size) of the fixed-position fields.
_HEAD = struct.Struct("<IIQ16s16sIIQQII64s48s32s48s48s32s32sQ")  # 0x000 .. 0x188
_CPUID_OFFSET = 0x188
_CHIP_ID = slice(0x1A0, 0x1E0)
_TAIL = struct.Struct("<Q4B4BQ")  # 0x1E0 .. 0x1F8: committed TCB, versions, launch TCB
_MIT = struct.Struct("<QQ")  # 0x1F8 .. 0x208 (v5)


@dataclass(frozen=True)
class TcbVersion:
    """A decoded 64-bit TCB_VERSION. ``fmc`` is only present in the Turin layout."""

    raw: int
    layout: TcbLayout
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, layout: TcbLayout) -> TcbVersion:
        """Decode ``raw``; the reserved bytes of the layout must be zero."""
        if not 0 <= raw < 1 << 64:
            raise MalformedError(f"TCB value {raw:#x} does not fit in 64 bits")
        b = raw.to_bytes(8, "little")
        if layout == "turin":
            # fmc, bootloader, tee, snp, reserved[3], microcode
            if any(b[4:7]):
                raise MalformedError(f"TCB {raw:#018x}: reserved bytes 4..6 are not zero")
            return cls(raw, layout, bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        # bootloader, tee, reserved[4], snp, microcode
        if any(b[2:6]):
            raise MalformedError(f"TCB {raw:#018x}: reserved bytes 2..5 are not zero")
        return cls(raw, layout, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    @classmethod
    def encode(
        cls,
        layout: TcbLayout,
        *,
        bootloader: int,
        tee: int,
        snp: int,
        microcode: int,
        fmc: int | None = None,
    ) -> TcbVersion:
        """Build a TCB from its components (for comparison with certificate extensions)."""
        values = (bootloader, tee, snp, microcode, fmc or 0)
        if not all(0 <= v <= 0xFF for v in values):
            raise MalformedError(f"TCB component out of range: {values}")
        if layout == "turin":
            b = bytes([fmc or 0, bootloader, tee, snp, 0, 0, 0, microcode])
        else:
            if fmc is not None:
                raise MalformedError("the pre-Turin TCB layout has no FMC component")
            b = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        return cls.decode(int.from_bytes(b, "little"), layout)

    def components(self) -> dict[str, int]:
        """The SVNs by name (``fmc`` only for Turin)."""
        out = {} if self.fmc is None else {"fmc": self.fmc}
        out.update(bootloader=self.bootloader, tee=self.tee, snp=self.snp, microcode=self.microcode)
        return out

    def to_dict(self) -> dict[str, object]:
        """Manifest representation: the components plus ``raw`` as ``0x`` hex."""
        return {**self.components(), "raw": f"{self.raw:#018x}"}

    def __str__(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in self.components().items())
        return f"{parts} ({self.raw:#018x})"


@dataclass(frozen=True)
class GuestPolicy:
    """The guest policy the VM was launched with (decoded; the raw value is ``value``)."""

    value: int

    @property
    def abi_minor(self) -> int:
        return self.value & 0xFF

    @property
    def abi_major(self) -> int:
        return (self.value >> 8) & 0xFF

    @property
    def smt(self) -> bool:
        return bool(self.value & POLICY_SMT)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.value & POLICY_MIGRATE_MA)

    @property
    def debug(self) -> bool:
        return bool(self.value & POLICY_DEBUG)

    @property
    def single_socket(self) -> bool:
        return bool(self.value & POLICY_SINGLE_SOCKET)

    def to_dict(self) -> dict[str, object]:
        return {
            "abi": f"{self.abi_major}.{self.abi_minor}",
            "smt": self.smt,
            "migrate_ma": self.migrate_ma,
            "debug": self.debug,
            "single_socket": self.single_socket,
        }


def product_from_cpuid(family: int, model: int) -> str | None:
    """The SEV product name for CPUID family/model, or None when unknown."""
    if family == 0x19:
        # Zen 3 (Milan) and Zen 4 (Genoa; Bergamo/Siena use Genoa's keys).
        return {0x0: "Milan", 0x1: "Genoa", 0xA: "Genoa"}.get(model >> 4)
    if family == 0x1A and model >> 4 in (0x0, 0x1):
        return "Turin"
    return None


def tcb_layout_for(product: str | None) -> TcbLayout:
    return "turin" if product == "Turin" else "pre-turin"


def _mbz(data: bytes, start: int, end: int, what: str) -> None:
    if any(data[start:end]):
        raise MalformedError(
            f"SNP report: reserved bytes {what} [{start:#x}:{end:#x}] are not zero "
            f"({data[start:end].hex()})"
        )


@dataclass(frozen=True)
class SnpReport:
    """A parsed ``ATTESTATION_REPORT``. Parsing checks structure only, never the signature."""

    raw: bytes = field(repr=False)
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: int
    chip_id: bytes
    committed_tcb_raw: int
    current_version: tuple[int, int, int]  # (major, minor, build)
    committed_version: tuple[int, int, int]
    launch_tcb_raw: int
    sig_r: int
    sig_s: int
    cpuid_fam_id: int | None = None  # v3+
    cpuid_mod_id: int | None = None
    cpuid_step: int | None = None
    launch_mit_vector: int | None = None  # v5
    current_mit_vector: int | None = None

    # -- derived views ---------------------------------------------------------------------

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (0x000 .. 0x2A0)."""
        return self.raw[:SIGNATURE_OFFSET]

    @property
    def author_key_en(self) -> bool:
        return bool(self.flags & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.flags & 2)

    @property
    def signing_key(self) -> int:
        """SIGNING_KEY: 0 = VCEK, 1 = VLEK, 7 = none."""
        return (self.flags >> 2) & 7

    @property
    def signing_key_name(self) -> str:
        return _SIGNING_KEY_NAMES[self.signing_key]

    @property
    def guest_policy(self) -> GuestPolicy:
        return GuestPolicy(self.policy)

    @property
    def product(self) -> str | None:
        """Product from the CPUID fields (v3+); None for v2 or an unknown CPU."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def tcb_layout(self) -> TcbLayout:
        # v2 reports come only from pre-Turin firmware; v3+ name their CPU family.
        if self.cpuid_fam_id == 0x1A:
            return "turin"
        return "pre-turin"

    @property
    def current_tcb(self) -> TcbVersion:
        return TcbVersion.decode(self.current_tcb_raw, self.tcb_layout)

    @property
    def reported_tcb(self) -> TcbVersion:
        return TcbVersion.decode(self.reported_tcb_raw, self.tcb_layout)

    @property
    def committed_tcb(self) -> TcbVersion:
        return TcbVersion.decode(self.committed_tcb_raw, self.tcb_layout)

    @property
    def launch_tcb(self) -> TcbVersion:
        return TcbVersion.decode(self.launch_tcb_raw, self.tcb_layout)

    def tcbs(self) -> dict[str, TcbVersion]:
        """All four TCB values by name (current, committed, reported, launch)."""
        return {
            "current": self.current_tcb,
            "committed": self.committed_tcb,
            "reported": self.reported_tcb,
            "launch": self.launch_tcb,
        }

    def fields(self, *, product: str | None = None) -> dict[str, object]:
        """Every field in the test-vector manifest's representation.

        ``product`` overrides the CPUID-derived product (a verifier passes the VCEK's for v2).
        """
        out: dict[str, object] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": hex(self.policy),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb_raw": f"{self.current_tcb_raw:#018x}",
            "platform_info": hex(self.platform_info),
            "author_key_en": int(self.author_key_en),
            "mask_chip_key": int(self.mask_chip_key),
            "signing_key": self.signing_key,
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb_raw": f"{self.reported_tcb_raw:#018x}",
            "chip_id": self.chip_id.hex(),
            "committed_tcb_raw": f"{self.committed_tcb_raw:#018x}",
            "current_version": ".".join(map(str, self.current_version)),
            "committed_version": ".".join(map(str, self.committed_version)),
            "launch_tcb_raw": f"{self.launch_tcb_raw:#018x}",
            "sig_r": format(self.sig_r, "x"),
            "sig_s": format(self.sig_s, "x"),
        }
        if self.version >= 3:
            out["cpuid_fam_id"] = self.cpuid_fam_id
            out["cpuid_mod_id"] = self.cpuid_mod_id
            out["cpuid_step"] = self.cpuid_step
        if self.version >= 5:
            out["launch_mit_vector"] = hex(self.launch_mit_vector or 0)
            out["current_mit_vector"] = hex(self.current_mit_vector or 0)
        out["product"] = product or self.product
        for name, tcb in self.tcbs().items():
            out[f"{name}_tcb"] = tcb.to_dict()
        out["signing_key_name"] = self.signing_key_name
        out["guest_policy"] = self.guest_policy.to_dict()
        return out


def parse_report(data: bytes) -> SnpReport:
    """Parse an SEV-SNP ``ATTESTATION_REPORT`` (exactly 1184 bytes; versions 2, 3 and 5).

    Raises :class:`MalformedError` for a wrong length, an unsupported version or signature
    algorithm, a reserved field that is not zero, or a TCB value with reserved bits set.
    """
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise MalformedError(f"SNP report must be {REPORT_SIZE} bytes, got {len(data)}")
    (
        version,
        guest_svn,
        policy,
        family_id,
        image_id,
        vmpl,
        signature_algo,
        current_tcb_raw,
        platform_info,
        flags,
        reserved0,
        report_data,
        measurement,
        host_data,
        id_key_digest,
        author_key_digest,
        report_id,
        report_id_ma,
        reported_tcb_raw,
    ) = _HEAD.unpack_from(data)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedError(
            f"SNP report version {version} is not supported (supported: {SUPPORTED_VERSIONS})"
        )
    if signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise MalformedError(
            f"SNP report signature algorithm {signature_algo} is not 1 (ECDSA P-384 SHA-384)"
        )
    if not policy & POLICY_RESERVED_ONE:
        raise MalformedError("SNP report: guest policy bit 17 is reserved and must be one")
    if policy & POLICY_RESERVED_ZERO:
        raise MalformedError(f"SNP report: reserved guest policy bits 63:26 are set ({policy:#x})")
    if vmpl > 3:
        raise MalformedError(f"SNP report: VMPL {vmpl} is out of range 0..3")
    if flags >> 5:
        raise MalformedError(f"SNP report: reserved flag bits are set ({flags:#x})")
    signing_key = (flags >> 2) & 7
    if signing_key not in _SIGNING_KEY_NAMES:
        raise MalformedError(f"SNP report: SIGNING_KEY {signing_key} is reserved")
    if reserved0:
        raise MalformedError("SNP report: reserved word at 0x4c is not zero")

    cpuid: tuple[int | None, int | None, int | None] = (None, None, None)
    if version >= 3:
        cpuid = (data[0x188], data[0x189], data[0x18A])
        _mbz(data, 0x18B, 0x1A0, "after CPUID")
        if cpuid[0] not in (0x19, 0x1A):
            raise MalformedError(f"SNP report: unknown CPUID family {cpuid[0]:#x}")
    else:
        _mbz(data, 0x188, 0x1A0, "after REPORTED_TCB")
    tail = _TAIL.unpack_from(data, 0x1E0)
    committed_tcb_raw, launch_tcb_raw = tail[0], tail[9]
    cur_build, cur_minor, cur_major, rsvd1 = tail[1:5]
    com_build, com_minor, com_major, rsvd2 = tail[5:9]
    if rsvd1 or rsvd2:
        raise MalformedError("SNP report: reserved bytes in the firmware versions are not zero")
    mit: tuple[int | None, int | None] = (None, None)
    if version >= 5:
        mit = _MIT.unpack_from(data, 0x1F8)
        _mbz(data, 0x208, SIGNATURE_OFFSET, "before the signature")
    else:
        _mbz(data, 0x1F8, SIGNATURE_OFFSET, "before the signature")
    sig = data[SIGNATURE_OFFSET:]
    _mbz(data, SIGNATURE_OFFSET + 2 * _ECDSA_COMPONENT, REPORT_SIZE, "in the signature")
    report = SnpReport(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb_raw=current_tcb_raw,
        platform_info=platform_info,
        flags=flags,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb_raw=reported_tcb_raw,
        chip_id=data[_CHIP_ID],
        committed_tcb_raw=committed_tcb_raw,
        current_version=(cur_major, cur_minor, cur_build),
        committed_version=(com_major, com_minor, com_build),
        launch_tcb_raw=launch_tcb_raw,
        sig_r=int.from_bytes(sig[:_ECDSA_COMPONENT], "little"),
        sig_s=int.from_bytes(sig[_ECDSA_COMPONENT : 2 * _ECDSA_COMPONENT], "little"),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
    )
    # Decode every TCB once so reserved TCB bytes are rejected at parse time.
    report.tcbs()
    return report
