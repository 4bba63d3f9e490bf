"""The guest drivers' character devices: ``/dev/sev-guest`` and ``/dev/tdx_guest``.

The structures mirror the kernel's UAPI headers (``include/uapi/linux/sev-guest.h``,
``include/uapi/linux/tdx-guest.h``); their sizes are checked by the tests. Device access goes
through a :class:`DeviceIo` so that the simulator and tests can stand in for the kernel.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol

from attestation.errors import (
    CollectionError,
    DeviceBusyError,
    DeviceNotFoundError,
    MalformedError,
)
from attestation.guest._certtable import parse_certificate_table
from attestation.guest._evidence import REPORT_DATA_SIZE, Platform, TeeEvidence

__all__ = [
    "DEFAULT_SEV_GUEST",
    "DEFAULT_TDX_GUEST",
    "SNP_GET_EXT_REPORT",
    "SNP_GET_REPORT",
    "SNP_REPORT_SIZE",
    "SNP_VMM_ERR_BUSY",
    "SNP_VMM_ERR_INVALID_LEN",
    "TDX_CMD_GET_REPORT0",
    "TDX_REPORT_SIZE",
    "DeviceIo",
    "OsDeviceIo",
    "SevGuestDevice",
    "SnpExtReportReq",
    "SnpGuestRequestIoctl",
    "SnpReportReq",
    "SnpReportResp",
    "TdxGuestDevice",
    "TdxReportReq",
    "ioc_iowr",
]

DEFAULT_SEV_GUEST = Path("/dev/sev-guest")
DEFAULT_TDX_GUEST = Path("/dev/tdx_guest")

SNP_REPORT_SIZE = 1184
TDX_REPORT_SIZE = 1024
PAGE_SIZE = 4096
#: The kernel's SEV_FW_BLOB_MAX_SIZE: the largest certificate buffer it accepts.
SNP_CERTS_MAX = 0x4000
#: Halves of ``exitinfo2``: the VMM error codes of the GHCB guest request.
SNP_VMM_ERR_INVALID_LEN = 1
SNP_VMM_ERR_BUSY = 2


def ioc_iowr(kind: str, number: int, size: int) -> int:
    """Linux ``_IOWR(type, nr, size)`` on x86 (direction read|write = 3)."""
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | number


class SnpReportReq(ctypes.Structure):
    """``struct snp_report_req``: user_data[64], vmpl, rsvd[28] (96 bytes)."""

    _fields_ = (
        ("user_data", ctypes.c_uint8 * 64),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    )


class SnpReportResp(ctypes.Structure):
    """``struct snp_report_resp``: data[4000] holding MSG_REPORT_RSP (status, size, report)."""

    _fields_ = (("data", ctypes.c_uint8 * 4000),)


class SnpExtReportReq(ctypes.Structure):
    """``struct snp_ext_report_req``: the request, certs_address, certs_len (112 bytes)."""

    _fields_ = (
        ("data", SnpReportReq),
        ("certs_address", ctypes.c_uint64),
        ("certs_len", ctypes.c_uint32),
    )


class SnpGuestRequestIoctl(ctypes.Structure):
    """``struct snp_guest_request_ioctl``: msg_version, req_data, resp_data, exitinfo2."""

    _fields_ = (
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    )

    @property
    def fw_error(self) -> int:
        return int(self.exitinfo2) & 0xFFFFFFFF

    @property
    def vmm_error(self) -> int:
        return int(self.exitinfo2) >> 32


class TdxReportReq(ctypes.Structure):
    """``struct tdx_report_req``: reportdata[64] in, tdreport[1024] out (1088 bytes)."""

    _fields_ = (
        ("reportdata", ctypes.c_uint8 * 64),
        ("tdreport", ctypes.c_uint8 * TDX_REPORT_SIZE),
    )


SNP_GET_REPORT = ioc_iowr("S", 0x0, ctypes.sizeof(SnpGuestRequestIoctl))
SNP_GET_EXT_REPORT = ioc_iowr("S", 0x2, ctypes.sizeof(SnpGuestRequestIoctl))
TDX_CMD_GET_REPORT0 = ioc_iowr("T", 0x1, ctypes.sizeof(TdxReportReq))

_MSG_REPORT_RSP = struct.Struct("<II24x")


class DeviceIo(Protocol):
    """open/ioctl/close as the kernel does them; ``OSError`` carries the errno.

    ``simulated`` is True for the simulator's stand-ins, whose evidence is labelled ``sim-``.
    """

    simulated: bool

    def exists(self, path: Path) -> bool: ...

    def open(self, path: Path) -> int: ...

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None: ...

    def close(self, fd: int) -> None: ...


class OsDeviceIo:
    """The real devices, through ``os.open`` and ``fcntl.ioctl``."""

    simulated = False

    def exists(self, path: Path) -> bool:
        return path.exists()

    def open(self, path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        # The structure is passed by address and updated in place (mutate_flag=True).
        fcntl.ioctl(fd, request, memoryview(arg).cast("B"), True)

    def close(self, fd: int) -> None:
        os.close(fd)


class _Device:
    """Common open/retry/error handling of the two devices."""

    _what = "device"

    def __init__(
        self,
        path: Path,
        *,
        io: DeviceIo | None,
        attempts: int,
        backoff: float,
        sleep: Callable[[float], None],
    ) -> None:
        if attempts < 1:
            raise CollectionError(f"{self._what}: attempts must be at least 1")
        self.path = Path(path)
        self._io: DeviceIo = io if io is not None else OsDeviceIo()
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def available(self) -> bool:
        try:
            return self._io.exists(self.path)
        except OSError:
            return False

    def _open(self) -> int:
        try:
            return self._io.open(self.path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise DeviceNotFoundError(
                    f"{self._what} not found at {self.path} (not a confidential VM, or the "
                    "guest driver is not loaded)"
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise CollectionError(
                    f"{self._what}: permission denied opening {self.path} (run as root)"
                ) from exc
            if exc.errno == errno.EBUSY:
                raise _Busy(f"open {self.path}: busy") from exc
            self._fail(exc, f"open {self.path}")

    def _fail(self, exc: OSError, doing: str, detail: str = "") -> NoReturn:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        extra = f"; {detail}" if detail else ""
        raise CollectionError(
            f"{self._what}: {doing} failed: {name} ({exc.strerror}){extra}"
        ) from exc


class _Busy(Exception):
    """Internal: the device or host asked us to retry."""


def _retry_loop(
    attempt: Callable[[], TeeEvidence],
    *,
    attempts: int,
    backoff: float,
    sleep: Callable[[float], None],
    what: str,
) -> TeeEvidence:
    delay = backoff
    last = ""
    for number in range(attempts):
        try:
            return attempt()
        except _Busy as exc:
            last = str(exc)
        if number + 1 < attempts:
            sleep(delay)
            delay *= 2
    raise DeviceBusyError(f"{what} stayed busy after {attempts} attempts ({last}); retry later")


class SevGuestDevice(_Device):
    """``/dev/sev-guest``: SNP_GET_EXT_REPORT (report plus the host's certificates) or
    SNP_GET_REPORT (``extended=False``). ``vmpl`` is the VMPL the report is requested at."""

    _what = "SEV-SNP guest device"

    def __init__(
        self,
        path: Path = DEFAULT_SEV_GUEST,
        *,
        vmpl: int = 0,
        extended: bool = True,
        io: DeviceIo | None = None,
        attempts: int = 5,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(path, io=io, attempts=attempts, backoff=backoff, sleep=sleep)
        if not 0 <= vmpl <= 3:
            raise CollectionError(f"{self._what}: vmpl must be 0..3, got {vmpl}")
        self.vmpl = vmpl
        self.extended = extended

    @property
    def platform(self) -> Platform:
        return "sim-sev-snp" if self._io.simulated else "sev-snp"

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise MalformedError(
                f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        data = bytes(report_data)
        return _retry_loop(
            lambda: self._collect(data),
            attempts=self._attempts,
            backoff=self._backoff,
            sleep=self._sleep,
            what=f"{self._what} {self.path}",
        )

    async def aget_evidence(self, report_data: bytes) -> TeeEvidence:
        return await asyncio.to_thread(self.get_evidence, report_data)

    def _collect(self, report_data: bytes) -> TeeEvidence:
        fd = self._open()
        try:
            certs_blob = b""
            req = SnpReportReq()
            ctypes.memmove(req.user_data, report_data, REPORT_DATA_SIZE)
            req.vmpl = self.vmpl
            resp = SnpReportResp()
            guest = SnpGuestRequestIoctl(msg_version=1, resp_data=ctypes.addressof(resp))
            if self.extended:
                certs_len = SNP_CERTS_MAX
                while True:
                    certs = ctypes.create_string_buffer(certs_len)
                    ext = SnpExtReportReq(
                        data=req, certs_address=ctypes.addressof(certs), certs_len=certs_len
                    )
                    guest.req_data = ctypes.addressof(ext)
                    guest.exitinfo2 = 0
                    if self._ioctl(fd, SNP_GET_EXT_REPORT, guest, "SNP_GET_EXT_REPORT"):
                        certs_blob = certs.raw[: ext.certs_len] if ext.certs_len else b""
                        break
                    # The host needs a bigger buffer and said how big (a page multiple).
                    wanted = int(ext.certs_len)
                    if wanted <= certs_len or wanted > 16 * SNP_CERTS_MAX:
                        raise CollectionError(
                            f"{self._what}: host asked for a {wanted}-byte certificate buffer"
                        )
                    certs_len = wanted
            else:
                guest.req_data = ctypes.addressof(req)
                self._ioctl(fd, SNP_GET_REPORT, guest, "SNP_GET_REPORT", allow_resize=False)
        finally:
            self._io.close(fd)
        report = self._report_from(bytes(resp.data))
        return TeeEvidence(
            platform=self.platform,
            kind="snp-report",
            report=report,
            report_data=report_data,
            certificates=parse_certificate_table(certs_blob) if certs_blob else {},
            source=str(self.path),
            auxblob=certs_blob or None,
        )

    def _ioctl(
        self,
        fd: int,
        request: int,
        guest: SnpGuestRequestIoctl,
        name: str,
        *,
        allow_resize: bool = True,
    ) -> bool:
        """True on success, False when the certificate buffer must grow."""
        try:
            self._io.ioctl(fd, request, guest)
        except OSError as exc:
            if guest.vmm_error == SNP_VMM_ERR_INVALID_LEN and allow_resize:
                return False
            if guest.vmm_error == SNP_VMM_ERR_BUSY or exc.errno in (errno.EBUSY, errno.EAGAIN):
                raise _Busy(f"{name}: host busy") from exc
            self._fail(
                exc,
                name,
                f"firmware error 0x{guest.fw_error:x}, VMM error 0x{guest.vmm_error:x}",
            )
        return True

    def _report_from(self, data: bytes) -> bytes:
        status, size = _MSG_REPORT_RSP.unpack_from(data)
        if status != 0:
            raise CollectionError(
                f"{self._what}: firmware refused the report request (status 0x{status:x})"
            )
        if size != SNP_REPORT_SIZE:
            raise CollectionError(
                f"{self._what}: firmware returned a {size}-byte report, expected {SNP_REPORT_SIZE}"
            )
        start = _MSG_REPORT_RSP.size
        return data[start : start + size]


class TdxGuestDevice(_Device):
    """``/dev/tdx_guest``: TDX_CMD_GET_REPORT0 gives a TDREPORT, which only the same machine
    can check (it is MAC'd, not signed). A remotely verifiable *quote* needs the Quoting Enclave:
    configfs-tsm (Linux >= 6.7) or a QGS; :meth:`get_evidence` says so."""

    _what = "TDX guest device"

    def __init__(
        self,
        path: Path = DEFAULT_TDX_GUEST,
        *,
        io: DeviceIo | None = None,
        attempts: int = 5,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(path, io=io, attempts=attempts, backoff=backoff, sleep=sleep)

    @property
    def platform(self) -> Platform:
        return "sim-tdx" if self._io.simulated else "tdx"

    def get_tdreport(self, report_data: bytes) -> TeeEvidence:
        """A TDREPORT (1024 bytes) binding ``report_data``. Blocking."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise MalformedError(
                f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        data = bytes(report_data)
        return _retry_loop(
            lambda: self._collect(data),
            attempts=self._attempts,
            backoff=self._backoff,
            sleep=self._sleep,
            what=f"{self._what} {self.path}",
        )

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        """Always fails: /dev/tdx_guest cannot produce a quote (see the class docstring)."""
        raise CollectionError(
            f"{self._what}: {self.path} only gives a TDREPORT, which a remote verifier cannot "
            "check; a TDX quote needs configfs-tsm (Linux >= 6.7, "
            "/sys/kernel/config/tsm/report) or a Quote Generation Service (QGS)"
        )

    async def aget_evidence(self, report_data: bytes) -> TeeEvidence:
        return await asyncio.to_thread(self.get_evidence, report_data)

    async def aget_tdreport(self, report_data: bytes) -> TeeEvidence:
        return await asyncio.to_thread(self.get_tdreport, report_data)

    def _collect(self, report_data: bytes) -> TeeEvidence:
        fd = self._open()
        try:
            req = TdxReportReq()
            ctypes.memmove(req.reportdata, report_data, REPORT_DATA_SIZE)
            try:
                self._io.ioctl(fd, TDX_CMD_GET_REPORT0, req)
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.EAGAIN):
                    raise _Busy("TDX_CMD_GET_REPORT0: busy") from exc
                self._fail(exc, "TDX_CMD_GET_REPORT0")
        finally:
            self._io.close(fd)
        return TeeEvidence(
            platform=self.platform,
            kind="tdx-report",
            report=bytes(req.tdreport),
            report_data=report_data,
            source=str(self.path),
        )
