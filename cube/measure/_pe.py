"""PE/COFF parsing and the Authenticode image hash, as UEFI firmware computes it.

The hash follows the "Windows Authenticode Portable Executable Signature Format" (and edk2's
``HashPeImageByType``/``Tcg2MeasurePeImage``, which is what OVMF extends into PCR 4):

1. hash the headers up to the CheckSum field, skip its 4 bytes;
2. hash on up to the Certificate Table data directory entry (index 4), skip its 8 bytes (when
   the optional header has fewer than 5 directories there is nothing to skip);
3. hash the rest of the headers (up to SizeOfHeaders);
4. hash every section with raw data, in the order of PointerToRawData;
5. hash whatever follows the last section up to the end of the file, less the certificate
   table (an attached signature is never part of its own hash).

Everything is checked against the file's size; anything inconsistent raises :class:`PeError`
(fail closed: a malformed UKI has no reference value).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

__all__ = ["PeError", "PeFile", "PeSection", "authenticode_digest", "parse_pe"]

_PE32 = 0x10B
_PE32_PLUS = 0x20B
_CERT_DIR = 4


class PeError(ValueError):
    """The file is not a well-formed PE/COFF image."""


@dataclass(frozen=True)
class PeSection:
    name: str
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_offset: int

    def memory_bytes(self, data: bytes) -> bytes:
        """The section as loaded in memory: VirtualSize bytes, zero-filled past the raw data.

        That is what systemd-stub measures and uses (``VirtualSize`` is the real length; raw
        data is padded to FileAlignment)."""
        raw = data[self.raw_offset : self.raw_offset + min(self.raw_size, self.virtual_size)]
        return raw + bytes(self.virtual_size - len(raw))


@dataclass(frozen=True)
class PeFile:
    machine: int
    magic: int
    checksum_offset: int
    cert_dir_offset: int | None  # offset of the Certificate Table directory entry, if any
    cert_table: tuple[int, int]  # (file offset, size); (0, 0) when unsigned
    size_of_headers: int
    sections: tuple[PeSection, ...]

    def section(self, name: str) -> PeSection | None:
        found = [s for s in self.sections if s.name == name]
        if len(found) > 1:
            raise PeError(f"PE section {name} appears {len(found)} times")
        return found[0] if found else None


def _u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def parse_pe(data: bytes) -> PeFile:
    """Parse the headers and section table of a PE32/PE32+ image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PeError("not a PE file (no MZ header)")
    pe = _u32(data, 0x3C)
    if pe + 24 > len(data) or data[pe : pe + 4] != b"PE\0\0":
        raise PeError("not a PE file (no PE signature)")
    machine = _u16(data, pe + 4)
    n_sections = _u16(data, pe + 6)
    opt_size = _u16(data, pe + 20)
    opt = pe + 24
    if opt + opt_size > len(data) or opt_size < 2:
        raise PeError("truncated optional header")
    magic = _u16(data, opt)
    if magic == _PE32:
        dirs_count_off, dirs_off = opt + 92, opt + 96
    elif magic == _PE32_PLUS:
        dirs_count_off, dirs_off = opt + 108, opt + 112
    else:
        raise PeError(f"unknown optional header magic {magic:#x}")
    if dirs_off > opt + opt_size:
        raise PeError("optional header too small")
    checksum_offset = opt + 64
    size_of_headers = _u32(data, opt + 60)
    n_dirs = _u32(data, dirs_count_off)
    if dirs_off + 8 * n_dirs > opt + opt_size:
        raise PeError("data directories overrun the optional header")
    cert_dir_offset: int | None = None
    cert_table = (0, 0)
    if n_dirs > _CERT_DIR:
        cert_dir_offset = dirs_off + 8 * _CERT_DIR
        cert_off, cert_size = struct.unpack_from("<II", data, cert_dir_offset)
        if cert_size and (cert_off < size_of_headers or cert_off + cert_size > len(data)):
            raise PeError("certificate table lies outside the file")
        cert_table = (int(cert_off), int(cert_size))
    table = opt + opt_size
    if table + 40 * n_sections > len(data):
        raise PeError("truncated section table")
    if size_of_headers > len(data) or size_of_headers < table + 40 * n_sections:
        raise PeError("SizeOfHeaders is inconsistent with the section table")
    sections = []
    for i in range(n_sections):
        raw_name, vsize, vaddr, raw_size, raw_ptr = struct.unpack_from(
            "<8sIIII", data, table + 40 * i
        )
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        if raw_size and raw_ptr + raw_size > len(data):
            raise PeError(f"section {name} lies outside the file")
        sections.append(PeSection(name, int(vsize), int(vaddr), int(raw_size), int(raw_ptr)))
    return PeFile(
        machine=machine,
        magic=magic,
        checksum_offset=checksum_offset,
        cert_dir_offset=cert_dir_offset,
        cert_table=cert_table,
        size_of_headers=size_of_headers,
        sections=tuple(sections),
    )


def authenticode_digest(data: bytes, algorithm: str = "sha256") -> bytes:
    """The Authenticode hash of a PE image (what UEFI measures for a loaded application)."""
    pe = parse_pe(data)
    h = hashlib.new(algorithm)
    h.update(data[: pe.checksum_offset])
    after_checksum = pe.checksum_offset + 4
    if pe.cert_dir_offset is None:
        h.update(data[after_checksum : pe.size_of_headers])
    else:
        h.update(data[after_checksum : pe.cert_dir_offset])
        h.update(data[pe.cert_dir_offset + 8 : pe.size_of_headers])
    hashed = pe.size_of_headers
    for section in sorted(pe.sections, key=lambda s: s.raw_offset):
        if section.raw_size == 0:
            continue
        h.update(data[section.raw_offset : section.raw_offset + section.raw_size])
        hashed += section.raw_size
    cert_size = pe.cert_table[1]
    if len(data) > hashed + cert_size:
        h.update(data[hashed : len(data) - cert_size])
    return h.digest()
