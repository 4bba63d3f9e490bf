"""Serve a SIMULATED configfs-tsm as a real directory tree over FUSE.

    python -m attestation.sim.tsm_fuse /tmp/tsm --platform sev-snp

mounts an :class:`EmulatedConfigfsTsm` at ``/tmp/tsm`` until interrupted; then
``ConfigfsTsm(root=Path("/tmp/tsm"))`` (the production collector, with its real file
operations) collects SIMULATED evidence from it, exactly as from
``/sys/kernel/config/tsm/report``. Needs the optional ``fusepy`` package, libfuse 2
(Debian: ``libfuse2``) and permission to mount (root, or ``fusermount``).

Like configfs binary attributes, writes are buffered per open file and committed on close
(``flush``), so an error such as EINVAL or EBUSY is reported by ``close()``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import itertools
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from attestation.sim._configfs import EmulatedConfigfsTsm
from attestation.sim._snp import DEFAULT_SEED, SNP_PRODUCTS, SimulatedSnp
from attestation.sim._tdx import SimulatedTdx

__all__ = ["load_fusepy", "main", "serve_configfs_tsm"]


def load_fusepy() -> ModuleType:
    """The ``fusepy`` module; ImportError with a hint when it (or libfuse) is missing."""
    try:
        module = importlib.import_module("fuse")
    except (ImportError, OSError) as exc:
        raise ImportError(
            "serving configfs-tsm over FUSE needs fusepy (pip install fusepy) and libfuse 2 "
            f"(apt install libfuse2): {exc}"
        ) from exc
    if not hasattr(module, "FUSE") or not hasattr(module, "FuseOSError"):
        raise ImportError("the installed 'fuse' module is not fusepy")
    return module


@dataclass
class _Handle:
    path: Path
    writes: bytearray = field(default_factory=bytearray)
    dirty: bool = False
    contents: bytes | None = None


# fusepy registers only the operations its ``operations`` object has attributes for.
_OPERATIONS = frozenset(
    {"statfs", "getattr", "readdir", "mkdir", "rmdir", "open", "read", "write", "truncate",
     "flush", "release", "access"}
)  # fmt: skip


class _TsmOperations:
    """fusepy operations (``raw_fi`` mode) backed by an :class:`EmulatedConfigfsTsm`."""

    use_ns = True

    def __init__(self, fuse: ModuleType, emulation: EmulatedConfigfsTsm) -> None:
        self._fuse = fuse
        self._tsm = emulation
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, op: str, *args: Any) -> Any:
        if op not in _OPERATIONS:
            if op in ("init", "destroy", "opendir", "releasedir", "fsyncdir"):
                return 0
            raise self._fuse.FuseOSError(errno.ENOSYS)
        handler = getattr(self, op)
        try:
            return handler(*args)
        except OSError as exc:
            if isinstance(exc, self._fuse.FuseOSError):
                raise
            raise self._fuse.FuseOSError(exc.errno or errno.EIO) from exc

    def _path(self, path: str) -> Path:
        return self._tsm.root.joinpath(*[p for p in path.split("/") if p])

    def access(self, path: str, amode: int) -> int:
        if not self._tsm.exists(self._path(path)):
            raise self._fuse.FuseOSError(errno.ENOENT)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_namemax": 255}

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        target = self._path(path)
        if self._tsm.is_dir(target):
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
        if not self._tsm.exists(target):
            raise self._fuse.FuseOSError(errno.ENOENT)
        mode = {"r": 0o444, "w": 0o200, "rw": 0o644}[self._tsm.attribute_mode(target.name)]
        return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": 4096}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *self._tsm.listdir(self._path(path))]

    def mkdir(self, path: str, mode: int) -> int:
        self._tsm.mkdir(self._path(path))
        return 0

    def rmdir(self, path: str) -> int:
        self._tsm.rmdir(self._path(path))
        return 0

    def open(self, path: str, fi: Any) -> int:
        target = self._path(path)
        if not self._tsm.exists(target) or self._tsm.is_dir(target):
            raise self._fuse.FuseOSError(errno.ENOENT)
        mode = self._tsm.attribute_mode(target.name)
        access = fi.flags & 3  # O_RDONLY 0, O_WRONLY 1, O_RDWR 2
        if (access in (0, 2) and "r" not in mode) or (access in (1, 2) and "w" not in mode):
            raise self._fuse.FuseOSError(errno.EACCES)
        with self._lock:
            handle_id = next(self._ids)
            self._handles[handle_id] = _Handle(target)
        fi.fh = handle_id
        fi.direct_io = 1  # no page cache: every read reaches the emulation
        return 0

    def _handle(self, fi: Any) -> _Handle:
        with self._lock:
            handle = self._handles.get(int(fi.fh))
        if handle is None:
            raise self._fuse.FuseOSError(errno.EBADF)
        return handle

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        handle = self._handle(fi)
        if handle.contents is None:
            handle.contents = self._tsm.read(handle.path)
        return handle.contents[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        handle = self._handle(fi)
        end = offset + len(data)
        if len(handle.writes) < end:
            handle.writes.extend(bytes(end - len(handle.writes)))
        handle.writes[offset:end] = data
        handle.dirty = True
        return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return 0

    def flush(self, path: str, fi: Any) -> int:
        handle = self._handle(fi)
        if handle.dirty:
            handle.dirty = False
            data, handle.writes = bytes(handle.writes), bytearray()
            self._tsm.write(handle.path, data)
        return 0

    def release(self, path: str, fi: Any) -> int:
        with self._lock:
            self._handles.pop(int(fi.fh), None)
        return 0


def serve_configfs_tsm(
    emulation: EmulatedConfigfsTsm,
    *,
    foreground: bool = True,
    allow_other: bool = False,
) -> None:
    """Mount ``emulation`` at ``emulation.root`` and serve it until unmounted (blocking)."""
    fuse = load_fusepy()
    mountpoint = emulation.root
    mountpoint.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"foreground": foreground, "nothreads": True, "fsname": "sim-tsm"}
    if allow_other:
        options["allow_other"] = True
    fuse.FUSE(_TsmOperations(fuse, emulation), str(mountpoint), raw_fi=True, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attestation.sim.tsm_fuse",
        description="Serve a SIMULATED configfs-tsm report tree over FUSE (development only).",
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--platform", choices=("sev-snp", "tdx"), default="sev-snp")
    parser.add_argument("--product", choices=SNP_PRODUCTS, default="Milan")
    parser.add_argument(
        "--seed", help="simulator seed (text; default: the simulator's DEFAULT_SEED)"
    )
    parser.add_argument("--allow-other", action="store_true", help="let other users read it")
    args = parser.parse_args(argv)
    seed = DEFAULT_SEED if args.seed is None else args.seed.encode()
    root = args.mountpoint.resolve()
    if args.platform == "sev-snp":
        emulation = EmulatedConfigfsTsm.snp(SimulatedSnp(seed, product=args.product), root=root)
    else:
        emulation = EmulatedConfigfsTsm.tdx(SimulatedTdx(seed), root=root)
    print(
        f"serving a SIMULATED configfs-tsm ({emulation.provider}) at {root}; "
        "unmount with fusermount -u to stop",
        file=sys.stderr,
        flush=True,
    )
    serve_configfs_tsm(emulation, allow_other=args.allow_other)
    return 0


if __name__ == "__main__":
    sys.exit(main())
