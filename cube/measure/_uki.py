"""Unified Kernel Images: their sections, and PCR 11 as systemd-stub measures it.

systemd-stub (257, ``measure_sections``) walks its table of known sections in a fixed order and,
for every section present (except ``.pcrsig``, which carries signatures over this very PCR),
extends PCR 11 twice: with the SHA-256 of the section name including its terminating NUL
(``tpm_log_ipl_event_ascii``), then with the SHA-256 of the section's contents as loaded in
memory (``VirtualSize`` bytes). The order is the UKI specification's and systemd-measure's:
.linux .osrel .cmdline .initrd .ucode .splash .dtb .uname .sbat .pcrpkey .profile .dtbauto .hwids.

Multi-profile UKIs (several ``.profile`` sections) measure only the base plus the selected
profile; they are refused here rather than guessed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cube.measure._pe import PeError, PeFile, authenticode_digest, parse_pe

__all__ = ["MEASURED_SECTIONS", "Uki", "UkiError", "extend", "load_uki"]

#: systemd-stub's section order (src/boot/uki.h ``unified_sections``), without ``.pcrsig``.
MEASURED_SECTIONS = (
    ".linux",
    ".osrel",
    ".cmdline",
    ".initrd",
    ".ucode",
    ".splash",
    ".dtb",
    ".uname",
    ".sbat",
    ".pcrpkey",
    ".profile",
    ".dtbauto",
    ".hwids",
)


class UkiError(ValueError):
    """The file is not a UKI this tool can compute measurements for."""


def extend(value: bytes, digest: bytes) -> bytes:
    """TPM2_PCR_Extend in the sha256 bank."""
    return hashlib.sha256(value + digest).digest()


@dataclass(frozen=True)
class SectionEvent:
    """One PCR 11 extension: what was hashed and the digest."""

    section: str
    what: str  # "name" | "content"
    digest: bytes
    size: int


@dataclass(frozen=True)
class Uki:
    data: bytes
    pe: PeFile

    def section_bytes(self, name: str) -> bytes | None:
        section = self.pe.section(name)
        return None if section is None else section.memory_bytes(self.data)

    def require(self, name: str) -> bytes:
        content = self.section_bytes(name)
        if content is None:
            raise UkiError(f"the UKI has no {name} section")
        return content

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()

    def authenticode(self) -> bytes:
        return authenticode_digest(self.data)

    def kernel_authenticode(self) -> bytes:
        try:
            return authenticode_digest(self.require(".linux"))
        except PeError as exc:
            raise UkiError(f"the .linux section is not a PE kernel: {exc}") from exc

    def cmdline(self) -> str:
        """The embedded command line as systemd-stub hands it to the kernel.

        ``pe_section_to_str16`` stops at the first NUL; ``mangle_stub_cmdline`` turns control
        characters into spaces and drops leading and trailing whitespace."""
        raw = self.section_bytes(".cmdline")
        if raw is None:
            return ""
        try:
            text = raw.split(b"\0", 1)[0].decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise UkiError("the .cmdline section is not UTF-8 text") from None
        text = "".join(" " if ord(c) < 0x20 else c for c in text)
        return text.strip(" ")

    def pcr11_events(self) -> list[SectionEvent]:
        events: list[SectionEvent] = []
        for name in MEASURED_SECTIONS:
            content = self.section_bytes(name)
            if content is None:
                continue
            label = name.encode() + b"\0"
            events.append(SectionEvent(name, "name", hashlib.sha256(label).digest(), len(label)))
            events.append(
                SectionEvent(name, "content", hashlib.sha256(content).digest(), len(content))
            )
        return events

    def pcr11(self) -> bytes:
        value = bytes(32)
        for event in self.pcr11_events():
            value = extend(value, event.digest)
        return value


def load_uki(data: bytes) -> Uki:
    try:
        pe = parse_pe(data)
    except PeError as exc:
        raise UkiError(f"not a PE image: {exc}") from exc
    for name in (".linux", ".initrd", ".cmdline"):
        if pe.section(name) is None:
            raise UkiError(f"not a UKI: no {name} section")
    names = [s.name for s in pe.sections]
    duplicated = sorted({n for n in names if names.count(n) > 1 and n in MEASURED_SECTIONS})
    if duplicated:
        raise UkiError(f"sections appear more than once: {', '.join(duplicated)}")
    if ".profile" in names:
        raise UkiError("multi-profile UKIs (.profile sections) are not supported")
    return Uki(data, pe)
