"""Fast checks of the image definition (no build): the properties docs/image.md promises and that
a careless edit of image/ could silently break."""

from __future__ import annotations

import configparser
import os
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "image"
MASKED = IMAGE / "mkosi.extra" / "etc" / "systemd" / "system"


def mkosi_settings(path: Path) -> dict[str, list[str]]:
    """Setting -> values (one per line, comments dropped) of a mkosi config file."""
    out: dict[str, list[str]] = {}
    key = ""
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.startswith("["):
            continue
        if line.startswith((" ", "\t")):
            out[key].append(line.strip())
        else:
            key, _, value = line.partition("=")
            out[key] = [value.strip()] if value.strip() else []
    return out


def test_top_level_config_includes_image() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "mkosi.conf")
    assert parser["Include"]["Include"] == "image"


def test_guest_is_a_trixie_uki_with_fixed_seed_and_epoch() -> None:
    settings = mkosi_settings(IMAGE / "mkosi.conf")
    assert settings["Release"] == ["trixie"]
    assert settings["Format"] == ["uki"]
    assert settings["Seed"] and settings["Seed"][0] != "random"
    assert settings["SourceDateEpoch"] and int(settings["SourceDateEpoch"][0]) > 0
    assert settings["SandboxTrees"] == ["sandbox"]
    assert (IMAGE / "sandbox/etc/apt/sources.list.d/mkosi.sources").exists()


def test_nothing_to_log_in_with() -> None:
    settings = mkosi_settings(IMAGE / "mkosi.conf")
    for forbidden in ("RootPassword", "Autologin", "Ssh", "SshKey"):
        assert forbidden not in settings
    assert not any("openssh" in p or p == "sudo" for p in settings["Packages"])
    for unit in (
        "getty@.service",
        "serial-getty@.service",
        "console-getty.service",
        "autovt@.service",
        "emergency.service",
        "rescue.service",
        "debug-shell.service",
    ):
        link = MASKED / unit
        assert link.is_symlink() and os.readlink(link) == "/dev/null", unit


def test_systemd_does_not_touch_the_pcrs_the_policy_pins() -> None:
    # PCR 11 must be exactly the UKI's sections and PCR 15 exactly the agent's events.
    for unit in (
        "systemd-pcrphase.service",
        "systemd-pcrphase-sysinit.service",
        "systemd-pcrmachine.service",
        "systemd-pcrfs-root.service",
        "systemd-pcrfs@.service",
        "systemd-pcrproduct.service",
    ):
        assert os.readlink(MASKED / unit) == "/dev/null", unit


def test_remove_files_lists_one_path_per_line_and_the_non_reproducible_files() -> None:
    removed = mkosi_settings(IMAGE / "mkosi.conf")["RemoveFiles"]
    assert all(" " not in entry for entry in removed), "a space-separated list matches nothing"
    for path in ("/var/cache/ldconfig/aux-cache", "/var/log/alternatives.log", "/var/lib/dpkg"):
        assert path in removed


def test_the_command_line_bindings_are_added_at_assembly_not_in_the_config() -> None:
    cmdline = " ".join(mkosi_settings(IMAGE / "mkosi.conf")["KernelCommandLine"])
    assert "cube." not in cmdline
    assert "console=ttyS0" in cmdline


def test_kernel_modules_for_a_confidential_vm_are_included() -> None:
    include = "\n".join(mkosi_settings(IMAGE / "mkosi.conf")["KernelModulesInclude"])
    for module in ("sev-guest", "tdx-guest", "tsm", "dm-verity", "erofs", "tpm_", "virtio"):
        assert module in include, module


@pytest.mark.parametrize("profile", ["cpu", "gpu", "ollama"])
def test_every_profile_defines_its_backend_on_loopback(profile: str) -> None:
    extra = IMAGE / "mkosi.profiles" / profile / "mkosi.extra"
    start = (extra / "usr/lib/cube/start-backend").read_text()
    assert "127.0.0.1" in start and "0.0.0.0" not in start
    unit = (extra / "usr/lib/systemd/system/cube-backend.service").read_text()
    assert (
        "Before=cube-agent.service" in unit and "ExecStartPost=/usr/lib/cube/wait-backend" in unit
    )


def test_agent_unit_checks_the_configuration_against_the_command_line() -> None:
    start = (IMAGE / "mkosi.extra/usr/lib/cube/start-agent").read_text()
    assert "cube.config_sha256=" in start and "--expect-config-sha256" in start
    unit = (IMAGE / "mkosi.extra/usr/lib/systemd/system/cube-agent.service").read_text()
    assert "After=cube-model-volume.service cube-backend.service" in unit


def test_agent_requirements_are_all_pinned_by_hash() -> None:
    lines = (IMAGE / "agent-requirements.txt").read_text().splitlines()
    pins = [line for line in lines if "==" in line]
    hashes = [line for line in lines if "--hash=sha256:" in line]
    assert pins and len(pins) == len(hashes)
    names = {line.split("==")[0] for line in pins}
    assert {"cryptography", "aiohttp", "pyjwt"} <= names
    assert not {"asyncpg", "sqlalchemy", "uvloop"} & names  # the proxy's drivers stay out


def pe_with_sections(sections: dict[str, bytes]) -> bytes:
    """A minimal PE image: DOS stub, PE header, no optional header, the given sections."""
    pe_offset = 0x40
    table = pe_offset + 24
    data_start = table + 40 * len(sections)
    header = bytearray(b"MZ" + b"\0" * (pe_offset - 2))
    struct.pack_into("<I", header, 0x3C, pe_offset)
    header += b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, 0, 0)
    body = b""
    for name, content in sections.items():
        header += struct.pack(
            "<8sIIII", name.encode(), len(content), 0, len(content) + 7, data_start + len(body)
        )
        header += b"\0" * 16
        body += content + b"\0" * 7  # raw size is padded; the virtual size is exact
    return bytes(header) + body


def test_pe_section_copies_the_virtual_size_of_one_section(tmp_path: Path) -> None:
    uki = tmp_path / "uki.efi"
    uki.write_bytes(pe_with_sections({".osrel": b"ID=debian\n", ".cmdline": b"console=ttyS0\0"}))
    out = tmp_path / "cmdline"
    subprocess.run([str(IMAGE / "pe-section"), str(uki), ".cmdline", str(out)], check=True)
    assert out.read_bytes() == b"console=ttyS0\0"
    missing = subprocess.run(
        [str(IMAGE / "pe-section"), str(uki), ".initrd", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "no section .initrd" in missing.stderr
