"""The AMD SEV-SNP certificate table (GHCB spec, "extended guest request").

The host hands the guest its VCEK/VLEK, ASK and ARK with an extended report: through
``SNP_GET_EXT_REPORT`` on ``/dev/sev-guest`` or as configfs-tsm's ``auxblob``. The blob starts
with a table of 24-byte entries (16-byte GUID, little-endian u32 offset, u32 length) ended by an
all-zero entry; each entry points at one certificate (DER) elsewhere in the blob.

GUIDs are stored in RFC 4122 byte order (what ``uuid_parse`` and ``uuid.UUID(...).bytes``
produce), as AMD's and virtee's tooling write them.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from types import MappingProxyType

from attestation.errors import MalformedError

__all__ = [
    "ARK_GUID",
    "ASK_GUID",
    "CERT_TABLE_GUIDS",
    "CRL_GUID",
    "ENTRY_SIZE",
    "VCEK_GUID",
    "VLEK_GUID",
    "build_certificate_table",
    "parse_certificate_table",
]

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CRL_GUID = uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")

#: Known GUIDs and the name a parsed table uses for them. Unknown entries keep their GUID string.
CERT_TABLE_GUIDS: Mapping[uuid.UUID, str] = MappingProxyType(
    {
        VCEK_GUID: "vcek",
        VLEK_GUID: "vlek",
        ASK_GUID: "ask",
        ARK_GUID: "ark",
        CRL_GUID: "crl",
    }
)
_GUID_OF_NAME = {name: guid for guid, name in CERT_TABLE_GUIDS.items()}

ENTRY_SIZE = 24
_ENTRY = struct.Struct("<16sII")
_ZERO_ENTRY = bytes(ENTRY_SIZE)
# Far more than any host sends (ARK, ASK, VCEK/VLEK, CRL); bounds the work on hostile input.
_MAX_ENTRIES = 64


def parse_certificate_table(blob: bytes) -> Mapping[str, bytes]:
    """Split a certificate blob into ``{name: bytes}`` (names: vcek, vlek, ask, ark, crl).

    An empty or all-zero blob means the host supplied no certificates and gives ``{}``.
    Everything else must be a well-formed table: a terminating all-zero entry, every entry
    inside the blob and after the table, non-empty, no GUID twice. Bytes after the last
    certificate (page padding) are allowed. Unknown GUIDs are kept under their string form so
    a caller can see that the host sent them.
    """
    data = bytes(blob)
    if not data.strip(b"\0"):
        return MappingProxyType({})
    entries: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + ENTRY_SIZE > len(data):
            raise MalformedError(
                "certificate table: no terminating all-zero entry "
                f"(ran out of data after {len(entries)} entries)"
            )
        raw = data[pos : pos + ENTRY_SIZE]
        pos += ENTRY_SIZE
        if raw == _ZERO_ENTRY:
            break
        guid_bytes, offset, length = _ENTRY.unpack(raw)
        if guid_bytes == bytes(16):
            raise MalformedError(
                f"certificate table: entry {len(entries)} has a zero GUID but offset {offset} "
                f"and length {length} (only the all-zero entry may end the table)"
            )
        if len(entries) >= _MAX_ENTRIES:
            raise MalformedError(f"certificate table: more than {_MAX_ENTRIES} entries")
        entries.append((uuid.UUID(bytes=guid_bytes), offset, length))
    table_end = pos
    out: dict[str, bytes] = {}
    for index, (guid, offset, length) in enumerate(entries):
        name = CERT_TABLE_GUIDS.get(guid, str(guid))
        if name in out:
            raise MalformedError(f"certificate table: {name} ({guid}) appears twice")
        if length == 0:
            raise MalformedError(f"certificate table: entry {index} ({name}) is empty")
        if offset < table_end:
            raise MalformedError(
                f"certificate table: entry {index} ({name}) starts at {offset}, inside the "
                f"table (which ends at {table_end})"
            )
        if offset + length > len(data):
            raise MalformedError(
                f"certificate table: entry {index} ({name}) runs past the end of the blob "
                f"(offset {offset} + length {length} > {len(data)})"
            )
        out[name] = data[offset : offset + length]
    return MappingProxyType(out)


def build_certificate_table(certificates: Mapping[str, bytes], *, pad_to: int = 0) -> bytes:
    """The inverse of :func:`parse_certificate_table` (used by the simulator and tests).

    Keys are the names of :data:`CERT_TABLE_GUIDS` or GUID strings. ``pad_to`` zero-pads the
    blob to a multiple of that many bytes, as the kernel's page-sized buffers are.
    """
    guids: list[tuple[uuid.UUID, bytes]] = []
    for name, value in certificates.items():
        guid = _GUID_OF_NAME.get(name)
        if guid is None:
            try:
                guid = uuid.UUID(name)
            except ValueError as exc:
                raise MalformedError(f"certificate table: unknown entry name {name!r}") from exc
        if not value:
            raise MalformedError(f"certificate table: entry {name!r} is empty")
        guids.append((guid, bytes(value)))
    offset = ENTRY_SIZE * (len(guids) + 1)
    table = bytearray()
    body = bytearray()
    for guid, value in guids:
        table += _ENTRY.pack(guid.bytes, offset + len(body), len(value))
        body += value
    table += _ZERO_ENTRY
    out = bytes(table + body)
    if pad_to > 0 and len(out) % pad_to:
        out += bytes(pad_to - len(out) % pad_to)
    return out
