"""An in-memory configfs-tsm with the kernel's semantics, serving SIMULATED reports.

It implements :class:`attestation.guest.TsmFilesystem`, so the production
:class:`attestation.guest.ConfigfsTsm` runs against it unchanged (``fs=emulation``), and
:mod:`attestation.sim.fuse` can serve it as a real directory tree. Kernel behaviour emulated
(drivers/virt/coco/tsm.c):

- entries are directories made with ``mkdir`` under the report root and removed with ``rmdir``;
- ``inblob`` (write-only, 1..64 bytes) and ``privlevel`` (SNP only, 0..3, not below
  ``privlevel_floor``) bump ``generation``; a write that would wrap ``generation`` onto the last
  generation read fails with EBUSY, as does a write while another thread generates the report;
- ``outblob`` / ``auxblob`` (SNP only) are generated on first read after a write and cached for
  that generation; reading them before ``inblob`` was written is EINVAL;
- ``provider`` names the provider: ``sim_sev_guest`` or ``sim_tdx_guest``, so evidence collected
  through it is labelled ``sim-sev-snp`` / ``sim-tdx``;
- read-only attributes refuse writes (EACCES), write-only ones refuse reads (EACCES), unknown
  names are ENOENT.

Fault injection for tests: ``busy`` (the next N operations fail with EBUSY) and ``interfere``
(the next N ``outblob`` reads are preceded by another writer's ``inblob`` write).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.guest._configfs import DEFAULT_TSM_ROOT
from attestation.sim._snp import SimulatedSnp
from attestation.sim._tdx import SimulatedTdx

__all__ = ["EmulatedConfigfsTsm", "ReportGenerator"]

_INBLOB_MAX = 64
_PRIVLEVEL_MAX = 3
_U32 = 1 << 32

#: (inblob zero-padded to 64 bytes, privlevel) -> (outblob, auxblob or None)
ReportGenerator = Callable[[bytes, int], tuple[bytes, bytes | None]]

_READ_ONLY = ("provider", "generation", "outblob", "auxblob", "privlevel_floor")
_WRITE_ONLY = ("inblob",)
_READ_WRITE = ("privlevel",)


def _error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@dataclass
class _Entry:
    inblob: bytes | None = None
    privlevel: int = 0
    write_generation: int = 0
    read_generation: int | None = None
    outblob: bytes | None = None
    auxblob: bytes | None = None
    generating: bool = False


class EmulatedConfigfsTsm:
    """configfs-tsm in memory (SIMULATED provider), rooted at ``root``."""

    def __init__(
        self,
        provider: str,
        generate: ReportGenerator,
        *,
        root: Path = DEFAULT_TSM_ROOT,
        privlevel_floor: int = 0,
        has_auxblob: bool = True,
        has_privlevel: bool = True,
    ) -> None:
        if not provider.startswith("sim_"):
            raise ValueError("an emulated provider's name must start with 'sim_'")
        self.provider = provider
        self.root = Path(root)
        self.privlevel_floor = privlevel_floor
        self._generate = generate
        self._has_auxblob = has_auxblob
        self._has_privlevel = has_privlevel
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        #: Fault injection: the next ``busy`` operations fail with EBUSY.
        self.busy = 0
        #: Fault injection: before each of the next ``interfere`` outblob reads, another writer
        #: writes the entry's inblob (so ``generation`` moves under the reader).
        self.interfere = 0
        #: How many reports were generated (tests check caching with it).
        self.reports_generated = 0

    @classmethod
    def snp(
        cls,
        sim: SimulatedSnp | None = None,
        *,
        root: Path = DEFAULT_TSM_ROOT,
        **report_fields: Any,
    ) -> EmulatedConfigfsTsm:
        """configfs-tsm of a SIMULATED SEV-SNP guest: outblob = ``sim.report(inblob,
        vmpl=privlevel, **report_fields)``, auxblob = the certificate table."""
        machine = sim if sim is not None else SimulatedSnp()

        def generate(report_data: bytes, privlevel: int) -> tuple[bytes, bytes | None]:
            report = machine.report(report_data, vmpl=privlevel, **report_fields)
            return report, machine.certificate_table(pad_to=4096)

        return cls("sim_sev_guest", generate, root=root)

    @classmethod
    def tdx(
        cls,
        sim: SimulatedTdx | None = None,
        *,
        root: Path = DEFAULT_TSM_ROOT,
        **quote_fields: Any,
    ) -> EmulatedConfigfsTsm:
        """configfs-tsm of a SIMULATED TDX guest: outblob = ``sim.quote(inblob, ...)``; no
        auxblob and no privlevel, like the kernel's tdx_guest provider."""
        machine = sim if sim is not None else SimulatedTdx()

        def generate(report_data: bytes, privlevel: int) -> tuple[bytes, bytes | None]:
            del privlevel
            return machine.quote(report_data, **quote_fields), None

        return cls("sim_tdx_guest", generate, root=root, has_auxblob=False, has_privlevel=False)

    # -- introspection -----------------------------------------------------------------------

    @property
    def entries(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._entries))

    def attributes(self) -> tuple[str, ...]:
        """The attribute files every entry shows (depends on the provider)."""
        names = ["generation", "inblob", "outblob", "provider"]
        if self._has_auxblob:
            names.append("auxblob")
        if self._has_privlevel:
            names += ["privlevel", "privlevel_floor"]
        return tuple(sorted(names))

    def attribute_mode(self, name: str) -> str:
        """ "r", "w" or "rw"."""
        if name in _WRITE_ONLY:
            return "w"
        if name in _READ_WRITE:
            return "rw"
        return "r"

    # -- TsmFilesystem -----------------------------------------------------------------------

    def _split(self, path: Path) -> tuple[str | None, str | None]:
        """(entry, attribute) of ``path`` below the root; OSError(ENOENT) outside it."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            raise _error(errno.ENOENT, path) from None
        parts = rel.parts
        if len(parts) > 2 or any(p in ("", ".", "..") for p in parts):
            raise _error(errno.ENOENT, path)
        entry = parts[0] if parts else None
        attribute = parts[1] if len(parts) == 2 else None
        return entry, attribute

    def _check_busy(self, path: Path) -> None:
        if self.busy > 0:
            self.busy -= 1
            raise _error(errno.EBUSY, path)

    def _entry(self, name: str, path: Path) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise _error(errno.ENOENT, path)
        return entry

    def _known(self, attribute: str, path: Path) -> None:
        if attribute not in self.attributes():
            raise _error(errno.ENOENT, path)

    def is_dir(self, path: Path) -> bool:
        try:
            entry, attribute = self._split(path)
        except OSError:
            return False
        if attribute is not None:
            return False
        with self._lock:
            return entry is None or entry in self._entries

    def exists(self, path: Path) -> bool:
        try:
            entry, attribute = self._split(path)
        except OSError:
            return False
        with self._lock:
            if entry is None:
                return True
            if entry not in self._entries:
                return False
        return attribute is None or attribute in self.attributes()

    def listdir(self, path: Path) -> list[str]:
        entry, attribute = self._split(path)
        with self._lock:
            if attribute is not None:
                raise _error(errno.ENOTDIR, path)
            if entry is None:
                return sorted(self._entries)
            self._entry(entry, path)
        return list(self.attributes())

    def mkdir(self, path: Path) -> None:
        entry, attribute = self._split(path)
        with self._lock:
            self._check_busy(path)
            if entry is None:
                raise _error(errno.EEXIST, path)
            if attribute is not None:
                raise _error(errno.EPERM if entry in self._entries else errno.ENOENT, path)
            if entry in self._entries:
                raise _error(errno.EEXIST, path)
            self._entries[entry] = _Entry()

    def rmdir(self, path: Path) -> None:
        entry, attribute = self._split(path)
        with self._lock:
            if entry is None:
                raise _error(errno.EBUSY, path)
            if attribute is not None:
                raise _error(errno.ENOTDIR, path)
            self._entry(entry, path)
            del self._entries[entry]

    def write(self, path: Path, data: bytes) -> None:
        name, attribute = self._split(path)
        if name is None or attribute is None:
            raise _error(errno.EISDIR, path)
        with self._lock:
            self._check_busy(path)
            entry = self._entry(name, path)
            self._known(attribute, path)
            if "w" not in self.attribute_mode(attribute):
                raise _error(errno.EACCES, path)
            if entry.generating:
                # Another thread is generating this entry's report: a concurrent writer races.
                raise _error(errno.EBUSY, path)
            if attribute == "inblob":
                if not 0 < len(data) <= _INBLOB_MAX:
                    raise _error(errno.EINVAL, path)
                self._advance(entry, path)
                entry.inblob = bytes(data)
            else:  # privlevel
                try:
                    level = int(bytes(data).decode("ascii").strip(), 10)
                except (UnicodeDecodeError, ValueError):
                    raise _error(errno.EINVAL, path) from None
                if not self.privlevel_floor <= level <= _PRIVLEVEL_MAX:
                    raise _error(errno.EINVAL, path)
                self._advance(entry, path)
                entry.privlevel = level

    @staticmethod
    def _advance(entry: _Entry, path: Path) -> None:
        # The kernel refuses a write that would make write_generation equal the last generation
        # read without an interim read (the counter would have wrapped).
        if entry.read_generation is not None and (
            entry.write_generation == (entry.read_generation - 1) % _U32
        ):
            raise _error(errno.EBUSY, path)
        entry.write_generation = (entry.write_generation + 1) % _U32

    def read(self, path: Path) -> bytes:
        name, attribute = self._split(path)
        if name is None or attribute is None:
            raise _error(errno.EISDIR, path)
        with self._lock:
            self._check_busy(path)
            entry = self._entry(name, path)
            self._known(attribute, path)
            if "r" not in self.attribute_mode(attribute):
                raise _error(errno.EACCES, path)
            if attribute == "provider":
                return f"{self.provider}\n".encode()
            if attribute == "generation":
                return f"{entry.write_generation}\n".encode()
            if attribute == "privlevel":
                return f"{entry.privlevel}\n".encode()
            if attribute == "privlevel_floor":
                return f"{self.privlevel_floor}\n".encode()
            if attribute == "outblob" and self.interfere > 0 and entry.inblob is not None:
                self.interfere -= 1
                self._advance(entry, path)
                entry.inblob = b"\x5a" * _INBLOB_MAX  # somebody else's nonce
            if entry.inblob is None:
                raise _error(errno.EINVAL, path)
            if entry.read_generation != entry.write_generation or entry.outblob is None:
                inblob = entry.inblob.ljust(_INBLOB_MAX, b"\0")
                generation, privlevel = entry.write_generation, entry.privlevel
                entry.generating = True
                try:
                    self._lock.release()
                    try:
                        outblob, auxblob = self._generate(inblob, privlevel)
                    finally:
                        self._lock.acquire()
                finally:
                    entry.generating = False
                if entry.write_generation != generation:
                    raise _error(errno.EBUSY, path)
                entry.outblob, entry.auxblob = outblob, auxblob
                entry.read_generation = generation
                self.reports_generated += 1
            assert entry.outblob is not None
            if attribute == "outblob":
                return entry.outblob
            return entry.auxblob or b""
