"""Find the TEE of the machine we run on."""

from __future__ import annotations

from pathlib import Path

from attestation.errors import CollectionError
from attestation.guest._configfs import DEFAULT_TSM_ROOT, ConfigfsTsm, TsmFilesystem
from attestation.guest._devices import (
    DEFAULT_SEV_GUEST,
    DEFAULT_TDX_GUEST,
    DeviceIo,
    SevGuestDevice,
    TdxGuestDevice,
)
from attestation.guest._evidence import TeeDevice

__all__ = ["detect_tee"]


def detect_tee(
    *,
    tsm_root: Path = DEFAULT_TSM_ROOT,
    sev_guest: Path = DEFAULT_SEV_GUEST,
    tdx_guest: Path = DEFAULT_TDX_GUEST,
    fs: TsmFilesystem | None = None,
    io: DeviceIo | None = None,
) -> TeeDevice | None:
    """The best evidence source present, or None when this is not a confidential VM.

    configfs-tsm comes first (it gives TDX quotes and SNP reports with certificates, and is the
    kernel's preferred interface); it counts only when a provider answers. Then
    ``/dev/sev-guest``, then ``/dev/tdx_guest`` (whose :meth:`get_evidence` explains that a quote
    needs configfs-tsm or a QGS). Probing configfs-tsm creates and removes one entry.
    """
    tsm = ConfigfsTsm(tsm_root, fs=fs)
    if tsm.available() and _has_provider(tsm):
        return tsm
    sev = SevGuestDevice(sev_guest, io=io)
    if sev.available():
        return sev
    tdx = TdxGuestDevice(tdx_guest, io=io)
    if tdx.available():
        return tdx
    return None


def _has_provider(tsm: ConfigfsTsm) -> bool:
    try:
        tsm.platform  # noqa: B018 - probes the provider; unknown or missing ones raise
    except CollectionError:
        return False  # No provider (or an unknown one): look at the device files.
    return True
