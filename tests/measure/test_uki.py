"""PCR 11 (systemd-stub's section measurements) on synthetic UKIs built with objcopy."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from cube.measure import UkiError, load_uki
from tests.measure.helpers import make_uki

SECTIONS = {
    ".osrel": b"ID=debian\nVERSION_ID=13\n",
    ".cmdline": b"  console=ttyS0 cube.config_sha256=ab\n",
    ".initrd": os.urandom(5000),
    ".linux": b"MZ" + os.urandom(3000),
    ".uname": b"6.12.0-test",
}
TOOLS_TREE = (
    Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache/cube") / "image-tools/tools-tree"
)


def _expected_pcr11(sections: dict[str, bytes]) -> bytes:
    """The rule written out independently: the stub's order, name+NUL then content."""
    value = bytes(32)
    for name in (".linux", ".osrel", ".cmdline", ".initrd", ".uname"):
        for data in (name.encode() + b"\0", sections[name]):
            value = hashlib.sha256(value + hashlib.sha256(data).digest()).digest()
    return value


def test_pcr11_follows_the_stub_order_not_the_file_order(tmp_path: Path) -> None:
    uki = load_uki(make_uki(tmp_path, SECTIONS))
    # objcopy put .osrel first in the file; the stub measures .linux first.
    names = [s.name for s in uki.pe.sections]
    assert names.index(".osrel") < names.index(".linux")
    assert uki.pcr11() == _expected_pcr11(SECTIONS)
    events = uki.pcr11_events()
    assert [e.section for e in events[::2]] == [".linux", ".osrel", ".cmdline", ".initrd", ".uname"]


def test_pcr11_changes_with_the_command_line(tmp_path: Path) -> None:
    a = load_uki(make_uki(tmp_path, SECTIONS))
    changed = dict(SECTIONS, **{".cmdline": b"console=ttyS0 cube.config_sha256=ac\n"})
    (tmp_path / "b").mkdir()
    b = load_uki(make_uki(tmp_path / "b", changed))
    assert a.pcr11() != b.pcr11()


def test_pcr11_matches_systemd_measure(tmp_path: Path) -> None:
    """systemd's own calculator (from the trixie tools tree of scripts/setup-image-tools)."""
    measure = TOOLS_TREE / "usr/lib/systemd/systemd-measure"
    loader = TOOLS_TREE / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    if not measure.exists() or not loader.exists():
        pytest.skip("no systemd-measure in the image tools tree")
    args = []
    for name, data in SECTIONS.items():
        (tmp_path / name[1:]).write_bytes(data)
        args.append(f"--{name[1:]}={tmp_path / name[1:]}")
    libs = f"{TOOLS_TREE}/usr/lib/x86_64-linux-gnu:{TOOLS_TREE}/usr/lib/x86_64-linux-gnu/systemd"
    out = subprocess.run(
        [str(loader), str(measure), "calculate", *args, "--bank=sha256", "--phase="],
        env={"LD_LIBRARY_PATH": libs}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    value = out.strip().splitlines()[-1].split("=", 1)[1]
    (tmp_path / "u").mkdir()
    assert load_uki(make_uki(tmp_path / "u", SECTIONS)).pcr11().hex() == value


def test_cmdline_is_mangled_like_the_stub(tmp_path: Path) -> None:
    sections = dict(SECTIONS, **{".cmdline": b"\tconsole=ttyS0\nquiet  \n\0garbage"})
    uki = load_uki(make_uki(tmp_path, sections))
    assert uki.cmdline() == "console=ttyS0 quiet"


@pytest.mark.parametrize("missing", [".linux", ".initrd", ".cmdline"])
def test_not_a_uki_is_refused(tmp_path: Path, missing: str) -> None:
    sections = {k: v for k, v in SECTIONS.items() if k != missing}
    with pytest.raises(UkiError, match=missing):
        load_uki(make_uki(tmp_path, sections))


def test_garbage_is_refused() -> None:
    with pytest.raises(UkiError):
        load_uki(b"not a PE at all" * 10)


def test_stub_initrd_appends_an_os_release_cpio(tmp_path: Path) -> None:
    """PCR 9's initrd: .initrd padded to 4 bytes, then systemd-stub's .extra/os-release cpio."""
    import shutil

    from cube.measure._events import cpio_literal, initrd_bytes

    uki = load_uki(make_uki(tmp_path, SECTIONS))
    cpio = cpio_literal(".extra", "os-release", SECTIONS[".osrel"])
    initrd = SECTIONS[".initrd"]
    assert initrd_bytes(uki) == initrd + bytes(-len(initrd) % 4) + cpio
    assert (
        len(cpio) % 4 == 0 and cpio.startswith(b"070701") and cpio.endswith(b"TRAILER!!!\0\0\0\0")
    )
    if shutil.which("cpio") is None:
        return
    out = tmp_path / "unpacked"
    out.mkdir()
    (tmp_path / "x.cpio").write_bytes(cpio)
    with (tmp_path / "x.cpio").open("rb") as archive:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=archive, cwd=out, check=True)
    extracted = out / ".extra" / "os-release"
    assert extracted.read_bytes() == SECTIONS[".osrel"]
    assert extracted.stat().st_mode & 0o777 == 0o444


def test_pcr4_with_and_without_the_kernel_load(tmp_path: Path) -> None:
    from cube.measure._events import pcr4_events
    from tests.measure.helpers import base_pe

    uki = load_uki(make_uki(tmp_path, dict(SECTIONS, **{".linux": base_pe()})))
    with_kernel = pcr4_events(uki, source="t")
    assert [e.type for e in with_kernel] == [
        "EV_EFI_ACTION", "EV_SEPARATOR",
        "EV_EFI_BOOT_SERVICES_APPLICATION", "EV_EFI_BOOT_SERVICES_APPLICATION",
    ]  # fmt: skip
    assert with_kernel[2].digest == uki.authenticode()
    assert with_kernel[3].digest == uki.kernel_authenticode()
    assert len(pcr4_events(uki, source="t", kernel_load_measured=False)) == 3
