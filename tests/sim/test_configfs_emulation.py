"""The emulated configfs-tsm behaves like the kernel's, in memory and over FUSE."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attestation import snp, tdx
from attestation.guest import ConfigfsTsm
from attestation.sim import EmulatedConfigfsTsm, SimulatedSnp

ROOT = Path("/sys/kernel/config/tsm/report")
ENTRY = ROOT / "e"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def tsm() -> EmulatedConfigfsTsm:
    emulation = EmulatedConfigfsTsm.snp()
    emulation.mkdir(ENTRY)
    return emulation


def errno_of(action: object) -> int:
    assert callable(action)
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno is not None
    return info.value.errno


def test_entry_layout(tsm: EmulatedConfigfsTsm) -> None:
    assert tsm.is_dir(ROOT) and tsm.is_dir(ENTRY)
    assert tsm.listdir(ROOT) == ["e"]
    assert tsm.listdir(ENTRY) == [
        "auxblob",
        "generation",
        "inblob",
        "outblob",
        "privlevel",
        "privlevel_floor",
        "provider",
    ]
    assert tsm.read(ENTRY / "provider") == b"sim_sev_guest\n"
    assert tsm.read(ENTRY / "generation") == b"0\n"
    assert errno_of(lambda: tsm.mkdir(ENTRY)) == errno.EEXIST
    assert errno_of(lambda: tsm.mkdir(Path("/elsewhere/x"))) == errno.ENOENT
    tsm.rmdir(ENTRY)
    assert errno_of(lambda: tsm.rmdir(ENTRY)) == errno.ENOENT
    assert tsm.entries == ()


def test_generation_and_caching(tsm: EmulatedConfigfsTsm) -> None:
    assert errno_of(lambda: tsm.read(ENTRY / "outblob")) == errno.EINVAL  # no inblob yet
    tsm.write(ENTRY / "inblob", b"\x01" * 64)
    tsm.write(ENTRY / "privlevel", b"2\n")
    assert tsm.read(ENTRY / "generation") == b"2\n"
    first = tsm.read(ENTRY / "outblob")
    assert tsm.read(ENTRY / "outblob") == first and tsm.reports_generated == 1
    assert tsm.read(ENTRY / "auxblob") and tsm.reports_generated == 1
    report = snp.parse_report(first)
    assert report.report_data == b"\x01" * 64 and report.vmpl == 2
    tsm.write(ENTRY / "inblob", b"short")  # zero-padded to 64 bytes
    second = snp.parse_report(tsm.read(ENTRY / "outblob"))
    assert second.report_data == b"short" + bytes(59)
    assert tsm.reports_generated == 2


def test_attribute_permissions_and_limits(tsm: EmulatedConfigfsTsm) -> None:
    assert errno_of(lambda: tsm.write(ENTRY / "inblob", bytes(65))) == errno.EINVAL
    assert errno_of(lambda: tsm.write(ENTRY / "inblob", b"")) == errno.EINVAL
    assert errno_of(lambda: tsm.write(ENTRY / "privlevel", b"4")) == errno.EINVAL
    assert errno_of(lambda: tsm.write(ENTRY / "privlevel", b"x")) == errno.EINVAL
    assert errno_of(lambda: tsm.write(ENTRY / "provider", b"x")) == errno.EACCES
    assert errno_of(lambda: tsm.write(ENTRY / "generation", b"9")) == errno.EACCES
    assert errno_of(lambda: tsm.read(ENTRY / "inblob")) == errno.EACCES
    assert errno_of(lambda: tsm.read(ENTRY / "nonsense")) == errno.ENOENT
    assert errno_of(lambda: tsm.read(ROOT / "missing" / "outblob")) == errno.ENOENT
    assert tsm.read(ENTRY / "generation") == b"0\n"  # refused writes do not count


def test_tdx_provider_shape() -> None:
    emulation = EmulatedConfigfsTsm.tdx()
    emulation.mkdir(ENTRY)
    assert "auxblob" not in emulation.listdir(ENTRY)
    assert errno_of(lambda: emulation.read(ENTRY / "auxblob")) == errno.ENOENT
    assert errno_of(lambda: emulation.write(ENTRY / "privlevel", b"0")) == errno.ENOENT
    emulation.write(ENTRY / "inblob", bytes(64))
    assert tdx.parse_quote(emulation.read(ENTRY / "outblob")).report_data == bytes(64)


def test_generation_wrap_is_busy(tsm: EmulatedConfigfsTsm) -> None:
    tsm.write(ENTRY / "inblob", b"x")
    tsm.read(ENTRY / "outblob")  # read at generation 1
    # Writing 2**32 - 1 more times without a read would wrap onto the generation last read.
    entry = tsm._entries["e"]
    entry.write_generation = 0  # == read_generation - 1: the next write would wrap
    assert errno_of(lambda: tsm.write(ENTRY / "inblob", b"y")) == errno.EBUSY


def test_only_simulated_provider_names() -> None:
    with pytest.raises(ValueError, match="sim_"):
        EmulatedConfigfsTsm("sev_guest", lambda data, level: (data, None))


# -- FUSE --------------------------------------------------------------------------------------


def _fusepy_available() -> bool:
    try:
        from attestation.sim.tsm_fuse import load_fusepy

        load_fusepy()
    except ImportError:
        return False
    return shutil.which("fusermount") is not None and Path("/dev/fuse").exists()


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[Path]:
    if not _fusepy_available():
        pytest.skip("FUSE emulation needs fusepy, libfuse2, fusermount and /dev/fuse")
    mountpoint = tmp_path / "tsm"
    mountpoint.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "attestation.sim.tsm_fuse", str(mountpoint)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                error = server.stderr.read().decode() if server.stderr else ""
                pytest.skip(f"cannot mount FUSE here: {error.strip()[-300:]}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount", "-u", str(mountpoint)], check=False)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_configfs_tsm_over_fuse_with_real_file_calls(fuse_mount: Path) -> None:
    nonce = bytes(range(64))
    tsm = ConfigfsTsm(fuse_mount, privlevel=1)  # the default OsFilesystem: os.mkdir, os.open...
    evidence = tsm.get_evidence(nonce)
    assert evidence.platform == "sim-sev-snp"
    verified = snp.verify_report(
        evidence.report,
        vcek=evidence.certificates["vcek"],
        now=NOW,
        roots=SimulatedSnp().trust_roots(),
    )
    assert verified.report.report_data == nonce and verified.report.vmpl == 1
    assert os.listdir(fuse_mount) == []
    # Writes are committed (and refused) on close, as with configfs binary attributes.
    entry = fuse_mount / "manual"
    entry.mkdir()
    with pytest.raises(OSError) as info, open(entry / "inblob", "wb") as handle:
        handle.write(bytes(65))
    assert info.value.errno == errno.EINVAL
    assert (entry / "provider").read_bytes() == b"sim_sev_guest\n"
    entry.rmdir()
