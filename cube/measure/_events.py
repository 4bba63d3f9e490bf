"""The measured-boot events of the UKI boot path, computed ahead from the build outputs.

Every event is a (PCR, type, what it covers, digest) record; a PCR's reference value is the
replay of its events from zero. The rules, each checked against a real boot of the image under
QEMU + OVMF + swtpm (docs/measure.md says which matched):

- PCR 4 (boot manager code), OVMF's Tcg2Dxe and DxeTpm2MeasureBootLib: at the first boot
  attempt ``EV_EFI_ACTION "Calling EFI Application from Boot Option"``, then ``EV_SEPARATOR``
  (the digest of four zero bytes), then ``EV_EFI_BOOT_SERVICES_APPLICATION`` with the
  Authenticode SHA-256 of the UKI PE, then the same for the embedded kernel (``.linux``), which
  systemd-stub 257 starts through the firmware's LoadImage (checked on a real boot; newer stubs
  copy the kernel themselves when Secure Boot is off: ``kernel_load_measured=False``).
- PCR 7 (Secure Boot policy), Secure Boot disabled, no keys enrolled:
  ``EV_EFI_VARIABLE_DRIVER_CONFIG`` for SecureBoot (one byte 0), PK, KEK, db, dbx (empty),
  then ``EV_SEPARATOR``.
- PCR 9 (Linux's EFI stub): ``EV_EVENT_TAG`` with the kernel's LoadOptions (the UTF-16LE command
  line systemd-stub passes, with its terminating NUL), then ``EV_EVENT_TAG`` "Linux initrd" with
  the initrd it receives through LoadFile2: the ``.initrd`` section and the stub's generated
  ``.extra/os-release`` cpio, each padded to 4 bytes (:func:`initrd_bytes`).
- PCR 11: systemd-stub's UKI sections (:mod:`cube.measure._uki`).
- PCR 15: the agent's runtime events (:mod:`agent.measure`): the SHA-256 of
  ``cube-agent/1 model sha256:<hex>`` then of ``cube-agent/1 config sha256:<hex>``.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

from agent.measure import event_data as agent_event_data
from cube.measure._uki import Uki, extend

__all__ = [
    "CALLING_EFI_APPLICATION",
    "Event",
    "agent_events",
    "pcr4_events",
    "pcr7_events",
    "pcr9_events",
    "pcr11_events",
    "replay",
]

CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
SEPARATOR = hashlib.sha256(bytes(4)).digest()
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")


@dataclass(frozen=True)
class Event:
    pcr: int
    type: str
    description: str
    digest: bytes
    source: str  # the input it was computed from

    def to_json(self) -> dict[str, object]:
        return {
            "pcr": self.pcr,
            "type": self.type,
            "description": self.description,
            "sha256": self.digest.hex(),
            "source": self.source,
        }


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def replay(events: list[Event]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for event in events:
        pcrs[event.pcr] = extend(pcrs.get(event.pcr, bytes(32)), event.digest)
    return pcrs


def pcr4_events(uki: Uki, *, source: str, kernel_load_measured: bool = True) -> list[Event]:
    events = [
        Event(
            4,
            "EV_EFI_ACTION",
            CALLING_EFI_APPLICATION.decode(),
            _sha(CALLING_EFI_APPLICATION),
            "OVMF Tcg2Dxe (ReadyToBoot)",
        ),
        Event(4, "EV_SEPARATOR", "separator", SEPARATOR, "OVMF Tcg2Dxe (ReadyToBoot)"),
        Event(
            4,
            "EV_EFI_BOOT_SERVICES_APPLICATION",
            "UKI (Authenticode SHA-256)",
            uki.authenticode(),
            source,
        ),
    ]
    if kernel_load_measured:
        events.append(
            Event(
                4,
                "EV_EFI_BOOT_SERVICES_APPLICATION",
                ".linux (Authenticode SHA-256)",
                uki.kernel_authenticode(),
                f"{source} section .linux",
            )
        )
    return events


def uefi_variable_data(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA: GUID, name length (chars), data length, UTF-16LE name, data."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + encoded + data


def pcr7_events() -> list[Event]:
    """Secure Boot disabled and no keys enrolled (Debian's OVMF_VARS_4M.fd)."""
    variables = [
        (EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x00"),
        (EFI_GLOBAL_VARIABLE, "PK", b""),
        (EFI_GLOBAL_VARIABLE, "KEK", b""),
        (EFI_IMAGE_SECURITY_DATABASE, "db", b""),
        (EFI_IMAGE_SECURITY_DATABASE, "dbx", b""),
    ]
    events = [
        Event(
            7,
            "EV_EFI_VARIABLE_DRIVER_CONFIG",
            name,
            _sha(uefi_variable_data(guid, name, data)),
            "OVMF Tcg2Dxe (Secure Boot disabled, no keys enrolled)",
        )
        for guid, name, data in variables
    ]
    events.append(Event(7, "EV_SEPARATOR", "separator", SEPARATOR, "OVMF Tcg2Dxe"))
    return events


def load_options(uki: Uki) -> bytes:
    """What systemd-stub sets as the kernel's LoadOptions: UTF-16LE command line + NUL."""
    return (uki.cmdline() + "\0").encode("utf-16-le")


def _cpio_word(value: int) -> bytes:
    return b"%08x" % value


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _cpio_header(inode: int, mode: int, size: int, name_size: int) -> bytes:
    fields = (inode, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, name_size, 0)
    return b"070701" + b"".join(_cpio_word(v) for v in fields)


_CPIO_TRAILER = _cpio_header(0, 0, 0, 11).replace(b"0000000b", b"0000000B") + b"TRAILER!!!\0\0\0\0"


def cpio_literal(directory: str, name: str, data: bytes) -> bytes:
    """systemd-stub's ``pack_cpio_literal``: the directory (0555), the file (0444), the trailer;
    inodes from 1, mtime 0, every record padded to 4 bytes (src/boot/cpio.c)."""
    dir_entry = _pad4(_cpio_header(1, 0o040555, 0, len(directory) + 1) + directory.encode() + b"\0")
    path = f"{directory}/{name}".encode()
    file_entry = _pad4(
        _pad4(_cpio_header(2, 0o100444, len(data), len(path) + 1) + path + b"\0") + data
    )
    return dir_entry + file_entry + _CPIO_TRAILER


def initrd_bytes(uki: Uki) -> bytes:
    """The initrd the kernel receives from systemd-stub 257 through LoadFile2: the ``.initrd``
    section, then the cpio the stub generates with ``.extra/os-release`` (the ``.osrel``
    section), each padded to 4 bytes. Checked against a real boot. Sidecar initrds
    (credentials, sysexts, confexts) come from files next to the UKI on the ESP: the image's
    ESP has none. Sections whose handling was not checked (.ucode, .pcrsig, .pcrpkey,
    .profile) are refused rather than guessed."""
    extra = [s for s in (".ucode", ".pcrsig", ".pcrpkey", ".profile") if uki.pe.section(s)]
    if extra:
        raise ValueError(
            f"the UKI has {', '.join(extra)}: systemd-stub then passes initrds this tool does "
            "not compute; PCR 9 cannot be pinned"
        )
    parts = [uki.require(".initrd")]
    osrel = uki.section_bytes(".osrel")
    if osrel is not None:
        parts.append(cpio_literal(".extra", "os-release", osrel))
    return b"".join(_pad4(p) for p in parts)


def pcr9_events(uki: Uki, *, source: str) -> list[Event]:
    return [
        Event(
            9,
            "EV_EVENT_TAG",
            "LOADED_IMAGE::LoadOptions",
            _sha(load_options(uki)),
            f"{source} section .cmdline (UTF-16LE + NUL, as systemd-stub passes it)",
        ),
        Event(
            9,
            "EV_EVENT_TAG",
            "Linux initrd",
            _sha(initrd_bytes(uki)),
            f"{source} sections .initrd + .osrel (systemd-stub's .extra/os-release cpio)",
        ),
    ]


def pcr11_events(uki: Uki, *, source: str, phases: tuple[str, ...] = ()) -> list[Event]:
    """The stub's section events, then the boot phases systemd-pcrphase extends (if the image
    runs it): SHA-256 of each phase string, e.g. enter-initrd, leave-initrd, sysinit, ready."""
    events = [
        Event(
            11,
            "EV_IPL",
            f"{e.section} ({e.what}, {e.size} bytes)",
            e.digest,
            f"{source} section {e.section}",
        )
        for e in uki.pcr11_events()
    ]
    events += [
        Event(11, "systemd-pcrphase", phase, _sha(phase.encode()), "--pcr11-phases")
        for phase in phases
    ]
    return events


def agent_events(
    pcr: int, *, model_digest: str, config_digest: str, sources: tuple[str, str]
) -> list[Event]:
    """The agent's runtime events, in its order: the model digest, then the configuration's."""
    pairs = (("model", model_digest, sources[0]), ("config", config_digest, sources[1]))
    return [
        Event(pcr, "cube-agent", data.decode(), _sha(data), source)
        for kind, digest, source in pairs
        for data in (agent_event_data(kind, digest),)
    ]
