"""AMD SEV-SNP: parse, verify and validate attestation reports.

- parse: :func:`parse_report` -> :class:`SnpReport` (no crypto); :func:`parse_vcek_extensions`.
- verify: :func:`verify_report` -> :class:`VerifiedSnpReport` (AMD chain, CRL, signature, VCEK
  binding) against pinned :class:`SnpTrustRoots` (default: AMD's, shipped in ``trust/``).
- validate: :func:`validate_report` applies an :class:`SnpPolicy` (policy section ``sev_snp``).
"""

from attestation.snp.certs import VcekExtensions, parse_vcek_extensions
from attestation.snp.policy import SnpMinTcb, SnpPolicy, validate_report
from attestation.snp.report import (
    PRODUCTS,
    REPORT_SIZE,
    GuestPolicy,
    SnpReport,
    TcbVersion,
    parse_report,
    product_from_cpuid,
)
from attestation.snp.roots import DEFAULT_TRUST_ROOTS, ProductRoots, SnpTrustRoots
from attestation.snp.verify import VerifiedSnpReport, clear_caches, verify_crl, verify_report

__all__ = [
    "DEFAULT_TRUST_ROOTS",
    "PRODUCTS",
    "REPORT_SIZE",
    "GuestPolicy",
    "ProductRoots",
    "SnpMinTcb",
    "SnpPolicy",
    "SnpReport",
    "SnpTrustRoots",
    "TcbVersion",
    "VcekExtensions",
    "VerifiedSnpReport",
    "clear_caches",
    "parse_report",
    "parse_vcek_extensions",
    "product_from_cpuid",
    "validate_report",
    "verify_crl",
    "verify_report",
]
