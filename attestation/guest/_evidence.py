"""What a guest-side collector returns, and the interface every collector has."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "REPORT_DATA_SIZE",
    "EvidenceKind",
    "Platform",
    "TeeDevice",
    "TeeEvidence",
]

#: SNP REPORT_DATA and TDX REPORTDATA are both 64 bytes.
REPORT_DATA_SIZE = 64

#: Platform names as the ``cube-evidence/1`` document spells them (``sim-`` = simulator).
Platform = Literal["sev-snp", "tdx", "sim-sev-snp", "sim-tdx"]

#: ``snp-report``: a signed SNP attestation report (1184 bytes). ``tdx-quote``: a signed TDX
#: DCAP quote. ``tdx-report``: a TDREPORT (MAC'd, only verifiable on the same machine).
EvidenceKind = Literal["snp-report", "tdx-quote", "tdx-report"]


@dataclass(frozen=True)
class TeeEvidence:
    """Evidence collected inside a confidential VM, before any verification.

    ``certificates`` holds what the host supplied with an SNP extended report, by name (``vcek``
    or ``vlek``, ``ask``, ``ark``, ``crl``; unknown entries under their GUID). ``source`` says
    where it came from (``configfs-tsm:/sys/...``, ``/dev/sev-guest``...).
    """

    platform: Platform
    kind: EvidenceKind
    report: bytes
    report_data: bytes
    certificates: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""
    auxblob: bytes | None = None
    generation: int | None = None

    @property
    def simulated(self) -> bool:
        """True for evidence from the simulator: never accepted unless a policy allows it."""
        return self.platform.startswith("sim-")

    @property
    def endorsement_key(self) -> bytes | None:
        """The VCEK or VLEK certificate (DER) the host supplied, if any."""
        return self.certificates.get("vcek") or self.certificates.get("vlek")

    def describe(self) -> str:
        label = "SIMULATED " if self.simulated else ""
        digest = hashlib.sha256(self.report).hexdigest()[:16]
        certs = ",".join(sorted(self.certificates)) or "none"
        return (
            f"{label}{self.platform} {self.kind} ({len(self.report)} bytes, sha256 {digest}...) "
            f"from {self.source or 'unknown'}; certificates: {certs}"
        )


@runtime_checkable
class TeeDevice(Protocol):
    """A source of TEE evidence inside a guest."""

    @property
    def platform(self) -> Platform: ...

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        """Collect evidence binding ``report_data`` (64 bytes). Blocking."""
        ...

    async def aget_evidence(self, report_data: bytes) -> TeeEvidence:
        """:meth:`get_evidence` off the event loop (``asyncio.to_thread``)."""
        ...
