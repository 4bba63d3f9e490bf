"""Stand-ins for ``/dev/sev-guest`` and ``/dev/tdx_guest`` that answer ioctls with SIMULATED data.

They implement :class:`attestation.guest.DeviceIo`: :class:`attestation.guest.SevGuestDevice`
and :class:`attestation.guest.TdxGuestDevice` run unchanged against them (``io=``), reading and
writing the same ctypes structures the kernel would. ``simulated`` is True, so the evidence is
labelled ``sim-...``.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import struct
import threading
from pathlib import Path
from typing import Any

from attestation.guest._devices import (
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    SNP_VMM_ERR_BUSY,
    SNP_VMM_ERR_INVALID_LEN,
    TDX_CMD_GET_REPORT0,
    SnpExtReportReq,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
    TdxReportReq,
)
from attestation.sim._snp import SimulatedSnp
from attestation.sim._tdx import SimulatedTdx

__all__ = ["SimulatedSevGuestIo", "SimulatedTdxGuestIo"]

_PAGE = 4096


class _FakeDevice:
    simulated = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fds = itertools.count(1000)
        self._open: set[int] = set()
        self._lock = threading.Lock()
        #: Fault injection: the next ``busy`` ioctls answer "busy, retry".
        self.busy = 0
        #: Fault injection: ``open`` fails with this errno (e.g. ENOENT, EACCES) when set.
        self.open_errno: int | None = None
        self.calls = 0

    def exists(self, path: Path) -> bool:
        return Path(path) == self.path and self.open_errno != errno.ENOENT

    def open(self, path: Path) -> int:
        if Path(path) != self.path:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if self.open_errno is not None:
            raise OSError(self.open_errno, os.strerror(self.open_errno), str(path))
        with self._lock:
            fd = next(self._fds)
            self._open.add(fd)
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            if fd not in self._open:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            self._open.remove(fd)

    @property
    def open_descriptors(self) -> int:
        with self._lock:
            return len(self._open)

    def _check_fd(self, fd: int) -> None:
        with self._lock:
            if fd not in self._open:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))


class SimulatedSevGuestIo(_FakeDevice):
    """``/dev/sev-guest`` of a SIMULATED SNP guest (SNP_GET_REPORT, SNP_GET_EXT_REPORT)."""

    def __init__(
        self,
        sim: SimulatedSnp | None = None,
        *,
        path: Path = Path("/dev/sev-guest"),
        certificates: bool = True,
        **report_fields: Any,
    ) -> None:
        super().__init__(path)
        self.sim = sim if sim is not None else SimulatedSnp()
        self.certificates = certificates
        self.report_fields = report_fields
        #: Fault injection: firmware status to return in MSG_REPORT_RSP (0 = success).
        self.firmware_status = 0

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        self._check_fd(fd)
        self.calls += 1
        if request not in (SNP_GET_REPORT, SNP_GET_EXT_REPORT):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if not isinstance(arg, SnpGuestRequestIoctl) or arg.msg_version != 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if self.busy > 0:
            self.busy -= 1
            arg.exitinfo2 = SNP_VMM_ERR_BUSY << 32
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        if request == SNP_GET_EXT_REPORT:
            ext = SnpExtReportReq.from_address(arg.req_data)
            req = ext.data
            table = self.sim.certificate_table() if self.certificates else b""
            needed = -(-len(table) // _PAGE) * _PAGE
            if ext.certs_len < needed:
                ext.certs_len = needed
                arg.exitinfo2 = SNP_VMM_ERR_INVALID_LEN << 32
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            ctypes.memset(ext.certs_address, 0, ext.certs_len)
            if table:
                ctypes.memmove(ext.certs_address, table, len(table))
        else:
            req = SnpReportReq.from_address(arg.req_data)
        if req.vmpl > 3 or any(req.rsvd):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        resp = SnpReportResp.from_address(arg.resp_data)
        ctypes.memset(ctypes.addressof(resp), 0, ctypes.sizeof(resp))
        if self.firmware_status:
            struct.pack_into("<II", resp.data, 0, self.firmware_status, 0)
            arg.exitinfo2 = self.firmware_status
            return
        report = self.sim.report(bytes(req.user_data), vmpl=req.vmpl, **self.report_fields)
        struct.pack_into("<II", resp.data, 0, 0, len(report))
        ctypes.memmove(ctypes.addressof(resp) + 32, report, len(report))
        arg.exitinfo2 = 0


class SimulatedTdxGuestIo(_FakeDevice):
    """``/dev/tdx_guest`` of a SIMULATED TD (TDX_CMD_GET_REPORT0 -> a simulated TDREPORT)."""

    def __init__(
        self,
        sim: SimulatedTdx | None = None,
        *,
        path: Path = Path("/dev/tdx_guest"),
    ) -> None:
        super().__init__(path)
        self.sim = sim if sim is not None else SimulatedTdx()

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        self._check_fd(fd)
        self.calls += 1
        if request != TDX_CMD_GET_REPORT0:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if not isinstance(arg, TdxReportReq):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if self.busy > 0:
            self.busy -= 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        report = self.sim.tdreport(bytes(arg.reportdata))
        ctypes.memmove(arg.tdreport, report, len(report))
