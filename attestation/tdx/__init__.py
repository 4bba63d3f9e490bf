"""Intel TDX: parse, verify and validate DCAP quotes (v4, v5) and their Intel collateral.

* :func:`parse_quote` — bytes to a :class:`TdxQuote` (strict; no crypto).
* :class:`Collateral` — Intel TCB info, QE identity and CRLs, from the dcap-qvl JSON
  (:meth:`Collateral.from_json`) or raw Intel PCS responses (:meth:`Collateral.from_pcs`).
* :func:`verify_quote` — signatures, PCK chain to the Intel SGX Root CA, collateral and TCB
  status; returns a :class:`VerifiedTdxQuote`.
* :class:`TdxPolicy` / :func:`validate_quote` — the ``tdx`` policy section.
"""

from attestation.tdx._collateral import (
    MODULE_TCB_STATUSES,
    TCB_STATUSES,
    Collateral,
    Crl,
    IsvTcbLevel,
    QeIdentity,
    SignedJson,
    TcbInfo,
    TcbLevel,
    TdxModule,
    TdxModuleIdentity,
    embedded_root,
    embedded_tcb_signing_chain,
    parse_crl,
)
from attestation.tdx._pck import SGX_EXTENSIONS_OID, PckExtensions, PckTcb, parse_pck_extensions
from attestation.tdx._policy import TdxPolicy, validate_quote
from attestation.tdx._quote import (
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    EnclaveReport,
    QeReportCertification,
    QuoteHeader,
    QuoteSignatureData,
    TdReport,
    TdxQuote,
    parse_quote,
)
from attestation.tdx._tcb import ACCEPTABLE_TCB_STATUSES, TCB_NOT_SUPPORTED, TcbEvaluation
from attestation.tdx._verify import (
    INTEL_TD_QE_MRSIGNER,
    INTEL_TD_QE_PRODID,
    VerifiedTdxQuote,
    verify_quote,
)

__all__ = [
    "ACCEPTABLE_TCB_STATUSES",
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "INTEL_TD_QE_MRSIGNER",
    "INTEL_TD_QE_PRODID",
    "MODULE_TCB_STATUSES",
    "SGX_EXTENSIONS_OID",
    "TCB_NOT_SUPPORTED",
    "TCB_STATUSES",
    "Collateral",
    "Crl",
    "EnclaveReport",
    "IsvTcbLevel",
    "PckExtensions",
    "PckTcb",
    "QeIdentity",
    "QeReportCertification",
    "QuoteHeader",
    "QuoteSignatureData",
    "SignedJson",
    "TcbEvaluation",
    "TcbInfo",
    "TcbLevel",
    "TdReport",
    "TdxModule",
    "TdxModuleIdentity",
    "TdxPolicy",
    "TdxQuote",
    "VerifiedTdxQuote",
    "embedded_root",
    "embedded_tcb_signing_chain",
    "parse_crl",
    "parse_pck_extensions",
    "parse_quote",
    "validate_quote",
    "verify_quote",
]
