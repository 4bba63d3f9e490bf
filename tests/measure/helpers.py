"""Small PE/UKI builders for the measure tests (objcopy on pip's own Windows launcher)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pip
import pytest

#: A PE32+ image that exists wherever pip does (distlib's console-script launcher).
PIP_PE = Path(pip.__file__).parent / "_vendor" / "distlib" / "t64.exe"
#: Where objcopy places the added sections (above the launcher's own, image base 0x140000000).
_VMAS = {".osrel": 0x140100000, ".cmdline": 0x140110000, ".initrd": 0x140120000,
         ".linux": 0x140200000, ".uname": 0x140130000, ".sbat": 0x140140000}  # fmt: skip


def base_pe() -> bytes:
    if not PIP_PE.is_file():
        pytest.skip("pip's t64.exe is not available")
    return PIP_PE.read_bytes()


def make_uki(tmp: Path, sections: dict[str, bytes], base: bytes | None = None) -> bytes:
    """A PE with the given extra sections added by objcopy (a synthetic UKI)."""
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy (binutils) is not installed")
    src = tmp / "base.efi"
    src.write_bytes(base if base is not None else base_pe())
    args = ["objcopy"]
    for name, content in sections.items():
        path = tmp / f"section{name}"
        path.write_bytes(content)
        args += [
            "--add-section",
            f"{name}={path}",
            "--change-section-vma",
            f"{name}={_VMAS[name]:#x}",
        ]
    out = tmp / "uki.efi"
    subprocess.run([*args, str(src), str(out)], check=True, capture_output=True)
    return out.read_bytes()
