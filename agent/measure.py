"""Model weights verification and runtime measurement, before the agent serves anything.

Weights: the model directory carries a ``cube-model.json`` manifest (``cube-model/1``, written by
``scripts/make-tiny-model`` and the image build): the SHA-256 of every other file and a combined
digest, ``"sha256:" + hex(SHA-256 over the lines b"<name>\\0<sha256 hex>\\n" sorted by name)``.
:func:`verify_model_dir` re-hashes every file, requires the file set to be exactly the
manifest's (an extra file could be code a backend loads), recomputes the combined digest and
requires it to equal the digest the configuration pins. Any difference refuses the start.

Runtime measurement: where a vTPM exists, the model digest and the configuration digest are
extended into ``config.runtime_pcr`` (every active bank), each as the SHA-256 (per bank) of a
small event string, and the events are kept in a :class:`RuntimeLog` so a verifier can replay the
PCR: ``cube-agent/1 model sha256:<hex>`` then ``cube-agent/1 config sha256:<hex>``. The TDX RTMRs
(configfs-tsm ``rtmrs``) are not extended by this agent yet; :func:`rtmr_note` says so.

Everything here blocks (hashing gigabytes, TPM commands); callers run it with
``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from attestation._json import ObjectReader, loads_object
from attestation.errors import AttestationError, MalformedError

__all__ = [
    "EVENT_PREFIX",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MeasurementError",
    "ModelMeasurement",
    "RuntimeEvent",
    "RuntimeLog",
    "combined_digest",
    "measure_runtime",
    "rtmr_note",
    "verify_model_dir",
]

log = logging.getLogger("cube.agent.measure")

MANIFEST = "cube-model.json"
MANIFEST_FORMAT = "cube-model/1"
EVENT_PREFIX = "cube-agent/1"
_MAX_MANIFEST = 4 * 1024 * 1024
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MeasurementError(Exception):
    """The model does not match its pinned digest, or runtime measurement failed."""


@dataclass(frozen=True)
class ModelMeasurement:
    """A verified model directory."""

    directory: Path
    digest: str
    files: Mapping[str, str]
    total_bytes: int


def combined_digest(files: Mapping[str, str]) -> str:
    """``"sha256:<hex>"`` over the sorted lines ``b"<name>\\0<sha256 hex>\\n"``."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def _read_manifest(directory: Path) -> tuple[dict[str, str], str]:
    path = directory / MANIFEST
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_MANIFEST + 1)
    except OSError as exc:
        raise MeasurementError(f"cannot read the model manifest {path}: {exc.strerror}") from exc
    if len(data) > _MAX_MANIFEST:
        raise MeasurementError(f"model manifest {path} is too large")
    try:
        r = ObjectReader(loads_object(data, what=MANIFEST), what=MANIFEST)
        fmt = r.string("format", required=True)
        if fmt != MANIFEST_FORMAT:
            raise MalformedError(f"{MANIFEST}: format must be {MANIFEST_FORMAT!r}, got {fmt!r}")
        files_obj = r.raw("files", required=True)
        digest = r.string("digest", required=True) or ""
    except AttestationError as exc:
        raise MeasurementError(f"model manifest {path}: {exc}") from exc
    # Other keys (name, architecture, recipe...) describe the model; they are not verified.
    if not isinstance(files_obj, dict) or not files_obj:
        raise MeasurementError(f"model manifest {path}: 'files' must be a non-empty object")
    files: dict[str, str] = {}
    for name, value in files_obj.items():
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise MeasurementError(f"model manifest: {name!r} has no lowercase SHA-256 hex")
        pure = PurePosixPath(name)
        if (
            not name
            or pure.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))
            or "\0" in name
            or "\n" in name
            or name == MANIFEST
        ):
            raise MeasurementError(f"model manifest: file name {name!r} is not allowed")
        files[name] = value
    return files, digest


def _present_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative, '/'-separated) but the manifest.

    Anything else — a symbolic link (to a file or to a directory a backend would read through
    it), a device, a socket — is refused: what the backend loads must be exactly the files the
    manifest hashes."""
    out: list[str] = []
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(top) / name
            relative = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise MeasurementError(
                    f"model directory: {relative!r} is not a regular file (a link or a device)"
                )
            if relative != MANIFEST:
                out.append(relative)
    return sorted(out)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: a file swapped for a link after the listing is refused, not followed.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def verify_model_dir(directory: str | Path, expected_digest: str) -> ModelMeasurement:
    """Hash every file of ``directory`` against its manifest and ``expected_digest``. Blocking."""
    root = Path(directory)
    if not root.is_dir():
        raise MeasurementError(f"model directory {root} does not exist")
    files, manifest_digest = _read_manifest(root)
    computed = combined_digest(files)
    if not hmac.compare_digest(computed, manifest_digest):
        raise MeasurementError(
            f"model manifest {root / MANIFEST} is inconsistent: its file list hashes to "
            f"{computed}, it says {manifest_digest}"
        )
    if not hmac.compare_digest(computed, expected_digest.lower()):
        raise MeasurementError(
            f"model digest mismatch in {root}: the configuration pins {expected_digest}, "
            f"the weights are {computed}"
        )
    present = _present_files(root)
    if present != sorted(files):
        missing = sorted(set(files) - set(present))
        extra = sorted(set(present) - set(files))
        raise MeasurementError(
            f"model directory {root} differs from its manifest: missing {missing or 'none'}, "
            f"not in the manifest {extra or 'none'}"
        )
    total = 0
    for name in sorted(files):
        try:
            actual, size = _sha256_file(root / name)
        except OSError as exc:
            raise MeasurementError(f"cannot read model file {name}: {exc.strerror}") from exc
        if not hmac.compare_digest(actual, files[name]):
            raise MeasurementError(
                f"model file {name} in {root} does not match the manifest "
                f"(sha256 {actual}, expected {files[name]})"
            )
        total += size
    log.info(
        "model weights verified",
        extra={"fields": {"model_dir": str(root), "digest": computed, "bytes": total}},
    )
    return ModelMeasurement(root, computed, dict(files), total)


# -- runtime measurement ---------------------------------------------------------------------


class Measurer(Protocol):
    """What runtime measurement needs of a TPM (:class:`attestation.tpm.device.TpmQuoter`)."""

    def measure(self, pcr: int, data: bytes) -> dict[str, bytes]: ...


@dataclass(frozen=True)
class RuntimeEvent:
    """One extension of a PCR: the event data and the digest extended in each bank."""

    pcr: int
    kind: str  # "model" | "config"
    data: bytes
    digests: Mapping[str, bytes]

    def to_json(self) -> dict[str, object]:
        return {
            "pcr": self.pcr,
            "kind": self.kind,
            "data": self.data.decode(),
            "digests": {bank: value.hex() for bank, value in sorted(self.digests.items())},
        }


@dataclass
class RuntimeLog:
    """The runtime events of this boot of the agent, in the order they were extended."""

    events: list[RuntimeEvent] = field(default_factory=list)

    def to_json(self) -> list[dict[str, object]]:
        return [e.to_json() for e in self.events]


def event_data(kind: str, digest: str) -> bytes:
    return f"{EVENT_PREFIX} {kind} {digest}".encode()


def measure_runtime(
    tpm: Measurer, pcr: int, *, model_digest: str, config_digest: str
) -> RuntimeLog:
    """Extend ``pcr`` with the model and then the configuration digest. Blocking."""
    out = RuntimeLog()
    for kind, digest in (("model", model_digest), ("config", config_digest)):
        data = event_data(kind, digest)
        try:
            digests = tpm.measure(pcr, data)
        except AttestationError as exc:
            raise MeasurementError(
                f"cannot extend PCR {pcr} with the {kind} digest: {exc}"
            ) from exc
        event = RuntimeEvent(pcr, kind, data, dict(digests))
        out.events.append(event)
        log.info("runtime measurement", extra={"fields": event.to_json()})
    return out


def rtmr_note(platform: str) -> str | None:
    """What the agent says about RTMRs on this platform (not extended by this agent)."""
    if platform.removeprefix("sim-") != "tdx":
        return None
    return (
        "TDX RTMRs (configfs-tsm rtmrs) are not extended by this agent: runtime measurements "
        "are recorded only where a vTPM exists; the model and configuration digests are still "
        "bound by the claims of every evidence document"
    )
