"""/dev/sev-guest and /dev/tdx_guest: ioctl ABI, errors, retries (against simulated devices)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attestation import snp
from attestation.errors import (
    CollectionError,
    DeviceBusyError,
    DeviceNotFoundError,
    MalformedError,
)
from attestation.guest import SevGuestDevice, TdxGuestDevice, TeeDevice
from attestation.guest import _devices as dev
from attestation.sim import SimulatedSevGuestIo, SimulatedSnp, SimulatedTdx, SimulatedTdxGuestIo

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = bytes(range(64))


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# -- ABI ---------------------------------------------------------------------------------------


def test_struct_sizes_match_the_kernel_uapi() -> None:
    assert ctypes.sizeof(dev.SnpReportReq) == 96
    assert ctypes.sizeof(dev.SnpReportResp) == 4000
    assert ctypes.sizeof(dev.SnpExtReportReq) == 112  # 96 + u64 + u32, padded to 8
    assert ctypes.sizeof(dev.SnpGuestRequestIoctl) == 32
    assert ctypes.sizeof(dev.TdxReportReq) == 1088


def test_struct_field_offsets() -> None:
    assert dev.SnpReportReq.vmpl.offset == 64
    assert dev.SnpReportReq.rsvd.offset == 68
    assert dev.SnpExtReportReq.certs_address.offset == 96
    assert dev.SnpExtReportReq.certs_len.offset == 104
    assert dev.SnpGuestRequestIoctl.msg_version.offset == 0
    assert dev.SnpGuestRequestIoctl.req_data.offset == 8
    assert dev.SnpGuestRequestIoctl.resp_data.offset == 16
    assert dev.SnpGuestRequestIoctl.exitinfo2.offset == 24
    assert dev.TdxReportReq.tdreport.offset == 64


def test_ioctl_request_numbers() -> None:
    # _IOWR('S', 0, 32), _IOWR('S', 2, 32), _IOWR('T', 1, 1088) as the kernel headers define.
    assert dev.SNP_GET_REPORT == 0xC0205300
    assert dev.SNP_GET_EXT_REPORT == 0xC0205302
    assert dev.TDX_CMD_GET_REPORT0 == 0xC4405401


def test_exitinfo2_halves() -> None:
    req = dev.SnpGuestRequestIoctl(exitinfo2=(2 << 32) | 0x16)
    assert (req.vmm_error, req.fw_error) == (2, 0x16)


# -- /dev/sev-guest ----------------------------------------------------------------------------


def test_sev_guest_ext_report_verifies_with_the_simulator_roots() -> None:
    sim = SimulatedSnp()
    io = SimulatedSevGuestIo(sim)
    device = SevGuestDevice(io=io, vmpl=2)
    assert isinstance(device, TeeDevice)
    evidence = device.get_evidence(NONCE)
    assert evidence.platform == "sim-sev-snp" and evidence.simulated
    assert evidence.kind == "snp-report"
    assert set(evidence.certificates) == {"vcek", "ask", "ark"}
    assert evidence.endorsement_key == sim.vcek_der()
    verified = snp.verify_report(
        evidence.report,
        vcek=evidence.certificates["vcek"],
        now=NOW,
        roots=sim.trust_roots(),
    )
    assert verified.report.report_data == NONCE
    assert verified.report.vmpl == 2
    assert io.open_descriptors == 0
    assert "SIMULATED" in evidence.describe()


def test_sev_guest_plain_report_has_no_certificates() -> None:
    io = SimulatedSevGuestIo()
    evidence = SevGuestDevice(io=io, extended=False).get_evidence(NONCE)
    assert dict(evidence.certificates) == {}
    assert snp.parse_report(evidence.report).report_data == NONCE


def test_sev_guest_grows_the_certificate_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Start with one page: three certificates need two, and the host says so.
    monkeypatch.setattr(dev, "SNP_CERTS_MAX", 4096)
    io = SimulatedSevGuestIo()
    evidence = SevGuestDevice(io=io).get_evidence(NONCE)
    assert set(evidence.certificates) == {"vcek", "ask", "ark"}
    assert io.calls == 2


def test_sev_guest_busy_is_retried_with_backoff() -> None:
    io = SimulatedSevGuestIo()
    io.busy = 2
    sleeps = Sleeps()
    evidence = SevGuestDevice(io=io, sleep=sleeps, backoff=0.01).get_evidence(NONCE)
    assert snp.parse_report(evidence.report).report_data == NONCE
    assert sleeps.calls == [0.01, 0.02]


def test_sev_guest_stays_busy() -> None:
    io = SimulatedSevGuestIo()
    io.busy = 100
    sleeps = Sleeps()
    with pytest.raises(DeviceBusyError, match="3 attempts"):
        SevGuestDevice(io=io, sleep=sleeps, attempts=3).get_evidence(NONCE)
    assert len(sleeps.calls) == 2
    assert io.open_descriptors == 0


def test_sev_guest_missing_device(tmp_path: Path) -> None:
    device = SevGuestDevice(tmp_path / "sev-guest")
    assert not device.available()
    with pytest.raises(DeviceNotFoundError, match="not found"):
        device.get_evidence(NONCE)


def test_sev_guest_permission_denied_is_not_device_not_found() -> None:
    io = SimulatedSevGuestIo()
    io.open_errno = errno.EACCES
    with pytest.raises(CollectionError, match="permission denied") as info:
        SevGuestDevice(io=io).get_evidence(NONCE)
    assert not isinstance(info.value, DeviceNotFoundError)


def test_sev_guest_firmware_error() -> None:
    io = SimulatedSevGuestIo()
    io.firmware_status = 0x16
    with pytest.raises(CollectionError, match="status 0x16"):
        SevGuestDevice(io=io).get_evidence(NONCE)


def test_sev_guest_arguments_are_checked() -> None:
    with pytest.raises(MalformedError):
        SevGuestDevice(io=SimulatedSevGuestIo()).get_evidence(b"short")
    with pytest.raises(CollectionError):
        SevGuestDevice(vmpl=4)


def test_sev_guest_async() -> None:
    evidence = asyncio.run(SevGuestDevice(io=SimulatedSevGuestIo()).aget_evidence(NONCE))
    assert snp.parse_report(evidence.report).report_data == NONCE


def test_real_device_io_reports_errno(tmp_path: Path) -> None:
    # OsDeviceIo against a regular file: open works, the ioctl fails with ENOTTY.
    fake = tmp_path / "sev-guest"
    fake.write_bytes(b"")
    with pytest.raises(CollectionError, match="ENOTTY") as info:
        SevGuestDevice(fake).get_evidence(NONCE)
    assert not isinstance(info.value, DeviceBusyError | DeviceNotFoundError)


# -- /dev/tdx_guest ----------------------------------------------------------------------------


def test_tdx_guest_gives_a_tdreport_only() -> None:
    io = SimulatedTdxGuestIo(SimulatedTdx())
    device = TdxGuestDevice(io=io)
    assert device.platform == "sim-tdx"
    report = device.get_tdreport(NONCE)
    assert report.kind == "tdx-report"
    assert len(report.report) == 1024
    assert report.report[128:192] == NONCE  # REPORTMACSTRUCT.REPORTDATA
    with pytest.raises(CollectionError, match="configfs-tsm") as info:
        device.get_evidence(NONCE)
    assert "QGS" in info.value.message


def test_tdx_guest_missing_and_busy(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFoundError):
        TdxGuestDevice(tmp_path / "tdx_guest").get_tdreport(NONCE)
    io = SimulatedTdxGuestIo()
    io.busy = 10
    with pytest.raises(DeviceBusyError):
        TdxGuestDevice(io=io, attempts=2, sleep=Sleeps()).get_tdreport(NONCE)


def test_tdx_guest_async() -> None:
    report = asyncio.run(TdxGuestDevice(io=SimulatedTdxGuestIo()).aget_tdreport(NONCE))
    assert report.report[128:192] == NONCE
