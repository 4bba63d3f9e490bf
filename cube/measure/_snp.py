"""SEV-SNP launch measurements of the image's kernel, initrd and command line.

The measurement is computed by ``sev-snp-measure`` (PyPI, pinned in its own venv by
``scripts/setup-sev-snp-measure``) for QEMU direct boot with ``kernel-hashes=on``: OVMF's pages,
the VMSAs of every vCPU (so the vCPU count and type matter) and the SEV hashes table holding the
SHA-256 of the kernel, the initrd and the command line (plus its NUL).

Trap: given a firmware without SEV metadata, sev-snp-measure still prints a digest, silently
(it then measures a firmware no SNP guest can launch). Before running it this module therefore
reads OVMF's GUIDed footer table itself and refuses a firmware that lacks the SEV metadata
section or the SNP kernel-hashes table.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from cube.measure._uki import Uki

__all__ = ["SnpError", "SnpMeasurement", "find_sev_snp_measure", "ovmf_sev_tables", "snp_measure"]

# OVMF's reset-vector footer: a table of (data, u16 size, GUID) entries walked backwards from
# 0x20 bytes before the end of the image, ending in this GUID.
OVMF_TABLE_FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_METADATA = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
SEV_HASH_TABLE_RV = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_ES_RESET_BLOCK = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
_MEASUREMENT = re.compile(r"^[0-9a-f]{96}$")


class SnpError(ValueError):
    """The SNP measurement cannot be computed (and so is not pinned)."""


@dataclass(frozen=True)
class SnpMeasurement:
    vcpus: int
    vcpu_type: str
    measurement: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "vcpus": self.vcpus,
            "vcpu_type": self.vcpu_type,
            "measurement": self.measurement.hex(),
        }


def ovmf_sev_tables(firmware: bytes) -> dict[uuid.UUID, bytes]:
    """OVMF's footer table (GUID -> entry data); SnpError when there is no table at all."""
    if len(firmware) < 0x40:
        raise SnpError("the firmware file is too small to be OVMF")
    footer = (
        len(firmware) - 0x20 - 18
    )  # entry: data, u16 size, 16-byte GUID; last one is the footer
    guid = uuid.UUID(bytes_le=firmware[footer + 2 : footer + 18])
    if guid != OVMF_TABLE_FOOTER:
        raise SnpError("the firmware has no OVMF GUIDed table (not an OVMF image?)")
    (table_size,) = struct.unpack_from("<H", firmware, footer)
    start = footer + 18 - table_size
    if start < 0:
        raise SnpError("OVMF GUIDed table is malformed")
    found: dict[uuid.UUID, bytes] = {}
    pos = footer  # walk the entries below the footer entry
    while pos > start:
        entry_guid = uuid.UUID(bytes_le=firmware[pos - 16 : pos])
        (size,) = struct.unpack_from("<H", firmware, pos - 18)
        if size < 18 or pos - size < start:
            raise SnpError("OVMF GUIDed table entry is malformed")
        found[entry_guid] = firmware[pos - size : pos - 18]
        pos -= size
    return found


def sev_metadata_section_types(firmware: bytes, tables: dict[uuid.UUID, bytes]) -> list[int]:
    """The section types of OVMF's SEV metadata ("ASEV"): 1 SNP_SEC_MEM, 2 SNP_SECRETS,
    3 CPUID, 4 SVSM_CAA, 0x10 SNP_KERNEL_HASHES."""
    data = tables.get(SEV_METADATA)
    if data is None or len(data) < 4:
        return []
    (offset_from_end,) = struct.unpack_from("<I", data, 0)
    start = len(firmware) - offset_from_end
    if start < 0 or start + 16 > len(firmware) or firmware[start : start + 4] != b"ASEV":
        raise SnpError("OVMF's SEV metadata pointer does not lead to an ASEV header")
    _size, _version, count = struct.unpack_from("<III", firmware, start + 4)
    if start + 16 + 12 * count > len(firmware):
        raise SnpError("OVMF's SEV metadata is truncated")
    return [struct.unpack_from("<III", firmware, start + 16 + 12 * i)[2] for i in range(count)]


SNP_KERNEL_HASHES = 0x10


def check_snp_firmware(firmware: bytes) -> None:
    tables = ovmf_sev_tables(firmware)
    missing = []
    if SEV_METADATA not in tables:
        missing.append("SEV metadata")
    elif SNP_KERNEL_HASHES not in sev_metadata_section_types(firmware, tables):
        missing.append("an SNP_KERNEL_HASHES section in its SEV metadata")
    if SEV_HASH_TABLE_RV not in tables:
        missing.append("the SEV hashes table")
    if missing:
        raise SnpError(
            f"the firmware lacks {' and '.join(missing)}: it cannot launch a measured SEV-SNP "
            "direct boot (build it with scripts/build-ovmf); refusing to print a meaningless "
            "measurement"
        )


def find_sev_snp_measure(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    cache = Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube")
    candidate = cache / "sev-snp-measure" / "bin" / "sev-snp-measure"
    if candidate.exists():
        return str(candidate)
    return shutil.which("sev-snp-measure")


def snp_measure(
    uki: Uki,
    firmware_path: Path,
    *,
    vcpus: list[int],
    vcpu_types: list[str],
    tool: str,
) -> list[SnpMeasurement]:
    """Run sev-snp-measure for every (vCPU count, vCPU type). Blocking."""
    check_snp_firmware(firmware_path.read_bytes())
    out: list[SnpMeasurement] = []
    with tempfile.TemporaryDirectory(prefix="cube-measure-") as tmp:
        kernel = Path(tmp) / "vmlinuz"
        initrd = Path(tmp) / "initrd"
        kernel.write_bytes(uki.require(".linux"))
        initrd.write_bytes(uki.require(".initrd"))
        for vcpu_type in vcpu_types:
            for count in vcpus:
                cmd = [
                    tool, "--mode", "snp", "--vmm-type", "QEMU", "--output-format", "hex",
                    "--vcpus", str(count), "--vcpu-type", vcpu_type,
                    "--ovmf", str(firmware_path), "--kernel", str(kernel),
                    "--initrd", str(initrd), "--append", uki.cmdline(),
                ]  # fmt: skip
                try:
                    proc = subprocess.run(  # noqa: S603 - our own argument list, no shell
                        cmd, capture_output=True, text=True, timeout=300, check=False
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise SnpError(f"cannot run sev-snp-measure: {exc}") from exc
                value = proc.stdout.strip().lower()
                if proc.returncode != 0 or not _MEASUREMENT.fullmatch(value):
                    detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    raise SnpError(
                        f"sev-snp-measure failed for {count} x {vcpu_type}: {detail[:300]}"
                    )
                out.append(SnpMeasurement(count, vcpu_type, bytes.fromhex(value)))
    return out
