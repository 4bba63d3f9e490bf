"""Guest-side evidence collection: runs inside a confidential VM.

Sources, in the order :func:`detect_tee` prefers them:

- :class:`ConfigfsTsm` — ``/sys/kernel/config/tsm/report`` (Linux >= 6.7): SNP reports with the
  host's certificates, TDX quotes.
- :class:`SevGuestDevice` — ``/dev/sev-guest`` ioctls (SNP_GET_EXT_REPORT / SNP_GET_REPORT).
- :class:`TdxGuestDevice` — ``/dev/tdx_guest`` (TDX_CMD_GET_REPORT0: a TDREPORT only).

Each has a blocking ``get_evidence(report_data)`` and ``async aget_evidence(report_data)``
(``asyncio.to_thread``). Failures are :class:`attestation.errors.CollectionError`
(:class:`~attestation.errors.DeviceNotFoundError`, :class:`~attestation.errors.DeviceBusyError`).
Device and file access are injectable (``fs=``, ``io=``) so that :mod:`attestation.sim` can
stand in for the kernel; simulated evidence is always labelled ``sim-...``.
"""

from attestation.guest._certtable import (
    ARK_GUID,
    ASK_GUID,
    CERT_TABLE_GUIDS,
    CRL_GUID,
    VCEK_GUID,
    VLEK_GUID,
    build_certificate_table,
    parse_certificate_table,
)
from attestation.guest._configfs import (
    DEFAULT_TSM_ROOT,
    PROVIDERS,
    ConfigfsTsm,
    OsFilesystem,
    TsmFilesystem,
)
from attestation.guest._detect import detect_tee
from attestation.guest._devices import (
    DEFAULT_SEV_GUEST,
    DEFAULT_TDX_GUEST,
    DeviceIo,
    OsDeviceIo,
    SevGuestDevice,
    TdxGuestDevice,
)
from attestation.guest._evidence import (
    REPORT_DATA_SIZE,
    EvidenceKind,
    Platform,
    TeeDevice,
    TeeEvidence,
)

__all__ = [
    "ARK_GUID",
    "ASK_GUID",
    "CERT_TABLE_GUIDS",
    "CRL_GUID",
    "DEFAULT_SEV_GUEST",
    "DEFAULT_TDX_GUEST",
    "DEFAULT_TSM_ROOT",
    "PROVIDERS",
    "REPORT_DATA_SIZE",
    "VCEK_GUID",
    "VLEK_GUID",
    "ConfigfsTsm",
    "DeviceIo",
    "EvidenceKind",
    "OsDeviceIo",
    "OsFilesystem",
    "Platform",
    "SevGuestDevice",
    "TdxGuestDevice",
    "TeeDevice",
    "TeeEvidence",
    "TsmFilesystem",
    "build_certificate_table",
    "detect_tee",
    "parse_certificate_table",
]
