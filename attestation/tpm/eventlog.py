"""The TCG PC Client crypto-agile event log: parse it and replay it into PCR values.

Layout (TCG PC Client Platform Firmware Profile, section 10): one TCG_PCClientPCREvent in the
SHA-1 format whose data is the TCG_EfiSpecIdEvent ("Spec ID Event03") listing the digest
algorithms and their sizes, then TCG_PCR_EVENT2 records (pcrIndex, eventType, TPML_DIGEST_VALUES,
eventSize, event), all little-endian. Parsing checks sizes only; replay hashes digests, and the
comparison with quoted PCRs lives in :func:`attestation.tpm.verify.verify_event_log`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from attestation.errors import MalformedError
from attestation.tpm import _wire as w

__all__ = [
    "EVENT_TYPES",
    "EV_NO_ACTION",
    "Event",
    "EventLog",
    "SpecIdEvent",
    "extend",
    "parse_event_log",
    "replay",
]

EV_NO_ACTION: Final = 0x00000003
EVENT_TYPES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0x00000000: "EV_PREBOOT_CERT",
        0x00000001: "EV_POST_CODE",
        0x00000002: "EV_UNUSED",
        0x00000003: "EV_NO_ACTION",
        0x00000004: "EV_SEPARATOR",
        0x00000005: "EV_ACTION",
        0x00000006: "EV_EVENT_TAG",
        0x00000007: "EV_S_CRTM_CONTENTS",
        0x00000008: "EV_S_CRTM_VERSION",
        0x00000009: "EV_CPU_MICROCODE",
        0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
        0x0000000B: "EV_TABLE_OF_DEVICES",
        0x0000000C: "EV_COMPACT_HASH",
        0x0000000D: "EV_IPL",
        0x0000000E: "EV_IPL_PARTITION_DATA",
        0x0000000F: "EV_NONHOST_CODE",
        0x00000010: "EV_NONHOST_CONFIG",
        0x00000011: "EV_NONHOST_INFO",
        0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
        0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x80000002: "EV_EFI_VARIABLE_BOOT",
        0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
        0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x80000006: "EV_EFI_GPT_EVENT",
        0x80000007: "EV_EFI_ACTION",
        0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x80000009: "EV_EFI_HANDOFF_TABLES",
        0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000000B: "EV_EFI_HANDOFF_TABLES2",
        0x8000000C: "EV_EFI_VARIABLE_BOOT2",
        0x8000000D: "EV_EFI_GPT_EVENT2",
        0x80000010: "EV_EFI_HCRTM_EVENT",
        0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
        0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
        0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
    }
)

_SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\0"
_STARTUP_LOCALITY: Final = b"StartupLocality\0"
_MAX_PCR: Final = 32
_MAX_ALGORITHMS: Final = 16


@dataclass(frozen=True)
class SpecIdEvent:
    """The log header (TCG_EfiSpecIdEvent): which digests every later event carries."""

    platform_class: int
    spec_version: tuple[int, int, int]  # (major, minor, errata)
    uintn_size: int
    #: TPM_ALG_ID -> digest size, in header order (unknown algorithms included, by size).
    algorithms: Mapping[int, int]
    vendor_info: bytes

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(w.alg_name(a) for a in self.algorithms)


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2."""

    index: int  # position in the log; the header is event 0
    pcr: int
    event_type: int
    #: TPM_ALG_ID -> digest, in log order.
    digests: Mapping[int, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"0x{self.event_type:08x}")

    def digest(self, bank: str) -> bytes | None:
        return self.digests.get(w.hash_by_name(bank, "event log bank").alg)

    def fields(self) -> dict[str, object]:
        return {
            "index": self.index,
            "pcr": self.pcr,
            "type": self.type_name,
            "digests": {w.alg_name(a): d.hex() for a, d in self.digests.items()},
            "data_len": len(self.data),
        }


@dataclass(frozen=True)
class EventLog:
    raw: bytes
    spec_id: SpecIdEvent
    events: tuple[Event, ...]

    def fields(self) -> dict[str, object]:
        major, minor, errata = self.spec_id.spec_version
        return {
            "spec_version": f"{major}.{minor}.{errata}",
            "platform_class": self.spec_id.platform_class,
            "uintn_size": self.spec_id.uintn_size,
            "banks": list(self.spec_id.banks),
            "events": len(self.events),
            "pcrs": sorted({e.pcr for e in self.events if e.event_type != EV_NO_ACTION}),
        }


def _parse_spec_id(r: w.Reader) -> SpecIdEvent:
    pcr = r.u32("header.pcrIndex")
    kind = r.u32("header.eventType")
    digest = r.take(20, "header.digest")
    if pcr != 0 or kind != EV_NO_ACTION or any(digest):
        raise MalformedError(
            "TCG event log: the first event is not the EV_NO_ACTION Spec ID event "
            f"(pcr {pcr}, type 0x{kind:08x})"
        )
    size = r.u32("header.eventDataSize")
    h = w.Reader(r.take(size, "header.event"), "TCG event log Spec ID event", little=True)
    signature = h.take(16, "signature")
    if signature != _SPEC_ID_SIGNATURE:
        raise MalformedError(
            f"TCG event log: header signature {signature!r} is not 'Spec ID Event03' "
            "(only the crypto-agile log format is supported)"
        )
    platform_class = h.u32("platformClass")
    minor = h.u8("specVersionMinor")
    major = h.u8("specVersionMajor")
    errata = h.u8("specErrata")
    uintn = h.u8("uintnSize")
    if major != 2:
        raise MalformedError(f"TCG event log: spec version {major}.{minor}, expected 2.x")
    if uintn not in (1, 2):
        raise MalformedError(f"TCG event log: uintnSize {uintn}, expected 1 or 2")
    count = h.u32("numberOfAlgorithms")
    if not 1 <= count <= _MAX_ALGORITHMS:
        raise MalformedError(f"TCG event log: {count} digest algorithms (1..{_MAX_ALGORITHMS})")
    algorithms: dict[int, int] = {}
    for i in range(count):
        alg = h.u16(f"digestSizes[{i}].algorithmId")
        digest_size = h.u16(f"digestSizes[{i}].digestSize")
        if alg in algorithms:
            raise MalformedError(f"TCG event log: algorithm {w.alg_name(alg)} listed twice")
        if not 1 <= digest_size <= w.MAX_DIGEST:
            raise MalformedError(f"TCG event log: {w.alg_name(alg)} digest size {digest_size}")
        try:
            known = w.hash_by_id(alg, "").size
        except MalformedError:
            known = digest_size  # unknown algorithm: trust its size to skip its digests
        if known != digest_size:
            raise MalformedError(
                f"TCG event log: {w.alg_name(alg)} digest size {digest_size}, expected {known}"
            )
        algorithms[alg] = digest_size
    vendor = h.take(h.u8("vendorInfoSize"), "vendorInfo")
    h.finish()
    return SpecIdEvent(
        platform_class, (major, minor, errata), uintn, MappingProxyType(algorithms), vendor
    )


_EVENT_HEAD: Final = struct.Struct("<III")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")


def _truncated(field: str, offset: int) -> MalformedError:
    return MalformedError(f"TCG event log: truncated at offset {offset} reading {field}")


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile TCG event log.

    For example Linux's /sys/kernel/security/tpm0/binary_bios_measurements.
    """
    r = w.Reader(data, "TCG event log", little=True)
    spec = _parse_spec_id(r)
    raw, offset, end = r.data, r.offset, len(r.data)
    sizes = spec.algorithms
    events: list[Event] = []
    # Hot loop over thousands of records: unpack directly, build messages only on error.
    while offset < end:
        index = len(events) + 1
        if end - offset < _EVENT_HEAD.size:
            raise _truncated(f"event[{index}] header", offset)
        pcr, kind, count = _EVENT_HEAD.unpack_from(raw, offset)
        offset += _EVENT_HEAD.size
        if pcr >= _MAX_PCR:
            raise MalformedError(f"TCG event log: event[{index}] extends PCR {pcr}")
        if count != len(sizes):
            raise MalformedError(
                f"TCG event log: event[{index}] has {count} digests, the header lists "
                f"{len(sizes)} algorithms"
            )
        digests: dict[int, bytes] = {}
        for _ in range(count):
            if end - offset < 2:
                raise _truncated(f"event[{index}] digest algorithm", offset)
            (alg,) = _U16.unpack_from(raw, offset)
            offset += 2
            size = sizes.get(alg)
            if size is None or alg in digests:
                raise MalformedError(
                    f"TCG event log: event[{index}] has a {w.alg_name(alg)} digest the header "
                    "does not list, or two of them"
                )
            if end - offset < size:
                raise _truncated(f"event[{index}] {w.alg_name(alg)} digest", offset)
            digests[alg] = raw[offset : offset + size]
            offset += size
        if end - offset < 4:
            raise _truncated(f"event[{index}] eventSize", offset)
        (size,) = _U32.unpack_from(raw, offset)
        offset += 4
        if end - offset < size:
            raise _truncated(f"event[{index}] event data ({size} bytes)", offset)
        event_data = raw[offset : offset + size]
        offset += size
        events.append(Event(index, pcr, kind, MappingProxyType(digests), event_data))
    return EventLog(raw, spec, tuple(events))


def extend(value: bytes, digest: bytes, bank: str) -> bytes:
    """One PCR extend: ``H(value || digest)`` in ``bank``'s hash."""
    alg = w.hash_by_name(bank, "PCR bank")
    if len(value) != alg.size or len(digest) != alg.size:
        raise MalformedError(f"PCR extend: {bank} values and digests are {alg.size} bytes")
    return alg.digest(value + digest)


def _initial_value(log: EventLog, pcr: int, size: int) -> bytes:
    if pcr == 0:
        # A StartupLocality event says from which locality the TPM was started (H-CRTM: 3/4).
        for event in log.events:
            if (
                event.event_type == EV_NO_ACTION
                and event.pcr == 0
                and event.data.startswith(_STARTUP_LOCALITY)
                and len(event.data) == len(_STARTUP_LOCALITY) + 1
            ):
                return bytes(size - 1) + event.data[-1:]
    return bytes(size)


def replay(log: EventLog) -> dict[str, dict[int, bytes]]:
    """Replay ``log``: per bank (that this Python can hash), the value of every PCR it extends.

    PCRs the log never extends are absent: the log says nothing about them.
    """
    out: dict[str, dict[int, bytes]] = {}
    for alg_id, size in log.spec_id.algorithms.items():
        try:
            alg = w.hash_by_id(alg_id, "event log bank")
        except MalformedError:
            continue
        if not alg.computable:
            continue
        values: dict[int, bytes] = {}
        for event in log.events:
            if event.event_type == EV_NO_ACTION:
                continue  # informational: never extended into a PCR
            current = values.get(event.pcr)
            if current is None:
                current = _initial_value(log, event.pcr, size)
            values[event.pcr] = alg.digest(current + event.digests[alg_id])
        out[alg.name] = values
    return out
