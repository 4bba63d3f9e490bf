"""configfs-tsm: the kernel's provider-neutral report interface (Linux >= 6.7).

Protocol (Documentation/ABI/testing/configfs-tsm-report): ``mkdir`` an entry under
``/sys/kernel/config/tsm/report``, optionally write ``privlevel``, write 64 bytes to ``inblob``,
read ``outblob`` (the SNP report or TDX quote) and ``auxblob`` (SNP: the certificate table),
``rmdir`` the entry. Every write bumps ``generation``; comparing it before the writes and after
the reads detects another writer in the same entry, in which case the reads do not belong to our
input and we start again. ``provider`` names the TEE driver (``sev_guest``, ``tdx_guest``).

File access goes through a :class:`TsmFilesystem` so that the simulator (and tests) can serve the
same tree from memory; the default is the real file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

from attestation.errors import (
    CollectionError,
    DeviceBusyError,
    DeviceNotFoundError,
    MalformedError,
)
from attestation.guest._certtable import parse_certificate_table
from attestation.guest._evidence import (
    REPORT_DATA_SIZE,
    EvidenceKind,
    Platform,
    TeeEvidence,
)

__all__ = [
    "DEFAULT_TSM_ROOT",
    "PROVIDERS",
    "ConfigfsTsm",
    "OsFilesystem",
    "TsmFilesystem",
]

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")

#: provider attribute -> (platform, evidence kind). The ``sim_`` providers are the simulator's
#: (attestation.sim); a kernel never reports them, and their evidence is labelled ``sim-``.
PROVIDERS: dict[str, tuple[Platform, EvidenceKind]] = {
    "sev_guest": ("sev-snp", "snp-report"),
    "tdx_guest": ("tdx", "tdx-quote"),
    "sim_sev_guest": ("sim-sev-snp", "snp-report"),
    "sim_tdx_guest": ("sim-tdx", "tdx-quote"),
}

T = TypeVar("T")

_BUSY_ERRNOS = (errno.EBUSY, errno.EAGAIN)
# Reports are a few KiB; certificate tables a few more. Anything bigger is not a report.
_MAX_READ = 1 << 20


class TsmFilesystem(Protocol):
    """The file operations configfs-tsm needs. Errors are ``OSError`` with the kernel's errno."""

    def is_dir(self, path: Path) -> bool: ...

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path) -> bytes: ...

    def write(self, path: Path, data: bytes) -> None: ...


class OsFilesystem:
    """The real file system. Writes are committed (and fail) when the file is closed, as
    configfs binary attributes do, so ``close`` errors are reported."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > _MAX_READ:
                    raise OSError(errno.EFBIG, f"more than {_MAX_READ} bytes", str(path))
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


class _Retry(Exception):
    """Internal: this attempt lost a race or met a busy device; try again."""


# One report at a time per configfs tree, across every ConfigfsTsm instance of this process.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(root: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(root), threading.Lock())


class ConfigfsTsm:
    """Collect SNP reports or TDX quotes through configfs-tsm.

    ``privlevel`` (SNP: the VMPL to report at) is written when given. Busy devices and lost
    races are retried ``attempts`` times with exponential backoff starting at ``backoff``
    seconds, then :class:`DeviceBusyError` is raised.
    """

    def __init__(
        self,
        root: Path = DEFAULT_TSM_ROOT,
        *,
        privlevel: int | None = None,
        fs: TsmFilesystem | None = None,
        attempts: int = 5,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if privlevel is not None and not 0 <= privlevel <= 3:
            raise CollectionError(f"configfs-tsm: privlevel must be 0..3, got {privlevel}")
        if attempts < 1:
            raise CollectionError("configfs-tsm: attempts must be at least 1")
        self.root = Path(root)
        self.privlevel = privlevel
        self._fs: TsmFilesystem = fs if fs is not None else OsFilesystem()
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep
        self._provider: str | None = None

    def __repr__(self) -> str:
        return f"ConfigfsTsm({str(self.root)!r})"

    @property
    def source(self) -> str:
        return f"configfs-tsm:{self.root}"

    def available(self) -> bool:
        """Whether the configfs-tsm report directory exists (says nothing about a provider)."""
        try:
            return self._fs.is_dir(self.root)
        except OSError:
            return False

    def provider(self) -> str:
        """The TEE driver behind configfs-tsm (creates and removes a probe entry once)."""
        if self._provider is None:
            with _lock_for(self.root):
                self._provider = self._with_retries(self._probe_provider)
        return self._provider

    @property
    def platform(self) -> Platform:
        return self._platform_of(self.provider())[0]

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        """Collect a report binding ``report_data`` (exactly 64 bytes). Blocking."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise MalformedError(
                f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        data = bytes(report_data)
        with _lock_for(self.root):
            return self._with_retries(lambda: self._collect(data))

    async def aget_evidence(self, report_data: bytes) -> TeeEvidence:
        return await asyncio.to_thread(self.get_evidence, report_data)

    # -- internals ---------------------------------------------------------------------------

    def _platform_of(self, provider: str) -> tuple[Platform, EvidenceKind]:
        try:
            return PROVIDERS[provider]
        except KeyError:
            raise CollectionError(
                f"configfs-tsm: unsupported provider {provider!r} at {self.root} "
                f"(supported: {', '.join(p for p in PROVIDERS if not p.startswith('sim_'))})"
            ) from None

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        delay = self._backoff
        last = ""
        for number in range(self._attempts):
            try:
                return attempt()
            except _Retry as exc:
                last = str(exc)
            if number + 1 < self._attempts:
                self._sleep(delay)
                delay *= 2
        raise DeviceBusyError(
            f"configfs-tsm at {self.root} stayed busy after {self._attempts} attempts ({last}); "
            "another process is generating reports, retry later"
        )

    def _new_entry(self) -> Path:
        entry = self.root / f"cube-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self._fs.mkdir(entry)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise DeviceNotFoundError(
                    f"configfs-tsm not found at {self.root} (needs Linux >= 6.7 with "
                    "CONFIG_TSM_REPORTS, configfs mounted, and a TEE guest driver)"
                ) from exc
            if exc.errno == errno.ENXIO:
                raise DeviceNotFoundError(
                    f"configfs-tsm at {self.root} has no TEE provider (load sev-guest or tdx-guest)"
                ) from exc
            self._raise_os(exc, "create a report entry")
        return entry

    def _remove_entry(self, entry: Path) -> None:
        # A leftover entry costs a little kernel memory, not correctness; never mask the
        # outcome of the collection over it.
        with contextlib.suppress(OSError):
            self._fs.rmdir(entry)

    def _raise_os(self, exc: OSError, doing: str) -> NoReturn:
        if exc.errno in _BUSY_ERRNOS:
            raise _Retry(f"{doing}: {os.strerror(exc.errno or 0)}") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CollectionError(
                f"configfs-tsm: permission denied to {doing} under {self.root} (run as root)"
            ) from exc
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise CollectionError(
            f"configfs-tsm: cannot {doing} under {self.root}: {name} ({exc.strerror})"
        ) from exc

    def _read(self, path: Path, doing: str) -> bytes:
        try:
            return self._fs.read(path)
        except OSError as exc:
            self._raise_os(exc, doing)

    def _write(self, path: Path, data: bytes, doing: str) -> None:
        try:
            self._fs.write(path, data)
        except OSError as exc:
            self._raise_os(exc, doing)

    def _read_text(self, path: Path, doing: str) -> str:
        raw = self._read(path, doing)
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise CollectionError(f"configfs-tsm: {path.name} is not ASCII text") from exc

    def _generation(self, entry: Path) -> int:
        text = self._read_text(entry / "generation", "read generation")
        if not text.isdigit():
            raise CollectionError(f"configfs-tsm: generation is not a number: {text!r}")
        return int(text)

    def _probe_provider(self) -> str:
        entry = self._new_entry()
        try:
            return self._read_text(entry / "provider", "read provider")
        finally:
            self._remove_entry(entry)

    def _read_auxblob(self, entry: Path) -> bytes | None:
        try:
            return self._fs.read(entry / "auxblob")
        except OSError as exc:
            # Providers without auxiliary data (TDX) do not show the attribute at all.
            if exc.errno in (errno.ENOENT, errno.ENODATA):
                return None
            self._raise_os(exc, "read auxblob")

    def _collect(self, report_data: bytes) -> TeeEvidence:
        entry = self._new_entry()
        try:
            provider = self._read_text(entry / "provider", "read provider")
            platform, kind = self._platform_of(provider)
            self._provider = provider
            before = self._generation(entry)
            writes = 0
            if self.privlevel is not None:
                self._write(entry / "privlevel", f"{self.privlevel}\n".encode(), "write privlevel")
                writes += 1
            self._write(entry / "inblob", report_data, "write inblob")
            writes += 1
            outblob = self._read(entry / "outblob", "read outblob")
            auxblob = self._read_auxblob(entry)
            after = self._generation(entry)
            if after != before + writes:
                raise _Retry(
                    f"generation moved from {before} to {after} for our {writes} write(s): "
                    "another writer used the entry"
                )
        finally:
            self._remove_entry(entry)
        if not outblob:
            raise CollectionError(f"configfs-tsm: provider {provider} returned an empty outblob")
        certificates = parse_certificate_table(auxblob) if auxblob and kind == "snp-report" else {}
        return TeeEvidence(
            platform=platform,
            kind=kind,
            report=outblob,
            report_data=report_data,
            certificates=certificates,
            source=self.source,
            auxblob=auxblob,
            generation=after,
        )
