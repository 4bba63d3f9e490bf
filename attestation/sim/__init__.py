"""SIMULATED TEEs for development and tests — never evidence of a real confidential VM.

- :class:`SimulatedSnp` — a seed-derived test PKI shaped like AMD's (ARK -> ASK -> VCEK) and
  signed SEV-SNP reports byte-compatible with real ones.
- :class:`SimulatedTdx` — a seed-derived PKI shaped like Intel's (root -> PCK platform CA -> PCK,
  TCB signing) with TDX quotes (v4, v5) and matching collateral (dcap-qvl JSON form).
- :class:`EmulatedConfigfsTsm` — configfs-tsm's kernel semantics in memory, so
  :class:`attestation.guest.ConfigfsTsm` runs unchanged against it (``fs=``); and
  :func:`attestation.sim.tsm_fuse.serve_configfs_tsm`
  (``python -m attestation.sim.tsm_fuse MOUNTPOINT``) to serve it as
  a real directory over FUSE, where ``ConfigfsTsm(root=MOUNTPOINT)`` uses real file calls.
- :class:`SimulatedSevGuestIo` / :class:`SimulatedTdxGuestIo` — ``/dev/sev-guest`` and
  ``/dev/tdx_guest`` ioctls answered with simulated data (``SevGuestDevice(io=...)``).

Every certificate says so in its name (``O=Cube Simulator``, ``OU=SIMULATED - not AMD/Intel``;
roots and CAs ``CN=SIM-...``; only the SNP leaf keeps ``CN=SEV-VCEK``/``SEV-VLEK`` and the TDX
collateral signer ``CN=Intel SGX TCB Signing``, because the verifiers identify them by CN).
Evidence collected from the simulator is labelled ``sim-sev-snp`` / ``sim-tdx``; the verifiers'
real roots refuse it. Keys derive from a public seed (:data:`DEFAULT_SEED`), so a verifier can
re-derive the simulator's roots; certificates and signatures are deterministic too (RFC 6979
ECDSA, RSA-PSS with a derived salt), so re-derived roots are byte-identical.
"""

from attestation.sim._configfs import EmulatedConfigfsTsm, ReportGenerator
from attestation.sim._devices import SimulatedSevGuestIo, SimulatedTdxGuestIo
from attestation.sim._snp import DEFAULT_SEED, SNP_PRODUCTS, SimulatedSnp, SnpTcb
from attestation.sim._tdx import SIM_FMSPC, SimulatedTdx, TdxPlatformTcb

__all__ = [
    "DEFAULT_SEED",
    "SIM_FMSPC",
    "SNP_PRODUCTS",
    "EmulatedConfigfsTsm",
    "ReportGenerator",
    "SimulatedSevGuestIo",
    "SimulatedSnp",
    "SimulatedTdx",
    "SimulatedTdxGuestIo",
    "SnpTcb",
    "TdxPlatformTcb",
]
