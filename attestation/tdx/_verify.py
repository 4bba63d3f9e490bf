"""Verify a TDX quote: signatures, the PCK chain, and (optionally) Intel collateral and TCB status.

What is checked, in order (each step is recorded in ``checks``):

1. the PCK chain in the quote leads to the pinned Intel SGX Root CA, every certificate valid at
   ``now``;
2. the QE report is signed by the PCK certificate's key;
3. the QE report commits to the attestation key: REPORT_DATA = SHA-256(attestation key || QE auth
   data) || 32 zero bytes;
4. the quote (header and body) is signed by the attestation key (ECDSA P-256);
5. with collateral: the TCB info and QE identity are signed by the Intel SGX TCB Signing
   certificate, chained to the root; the CRLs are signed by their issuers; nothing in the chains
   is revoked; every collateral item is within its issueDate/nextUpdate (thisUpdate/nextUpdate)
   window at ``now``; then the TCB status is graded (:mod:`attestation.tdx._tcb`).
   Without collateral the QE must at least be Intel's TD QE (MRSIGNER, ISVPRODID, not debug) and
   the TCB status is None (not evaluated).

Caching: signature checks over certificates, CRLs and collateral are cached by the exact bytes
involved (key, algorithm, signature, signed data), and parsed chains by their bytes, so repeated
verifications with the same collateral cost only the two quote signatures. Nothing about a quote
(its signatures, its verdict) is cached; time-dependent checks run on every call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from attestation._checks import Checks
from attestation._x509 import (
    Certificate,
    Name,
    SignatureAlgorithm,
    below_anchor,
    check_validity,
    verify_signature,
)
from attestation.errors import (
    CertificateChainError,
    CollateralError,
    MalformedError,
    RevokedError,
    SignatureError,
    ValidityError,
)
from attestation.tdx._collateral import Collateral, Crl, SignedJson, embedded_root
from attestation.tdx._pck import PckExtensions
from attestation.tdx._quote import TdxQuote
from attestation.tdx._tcb import TcbEvaluation, evaluate_tcb
from attestation.tdx._util import format_time

__all__ = [
    "INTEL_TD_QE_MRSIGNER",
    "INTEL_TD_QE_PRODID",
    "VerifiedTdxQuote",
    "verify_quote",
]

#: MRSIGNER and ISVPRODID of Intel's TD Quoting Enclave (checked when no QE identity is given).
INTEL_TD_QE_MRSIGNER = bytes.fromhex(
    "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
)
INTEL_TD_QE_PRODID = 2

_ECDSA_P256_SHA256 = SignatureAlgorithm("1.2.840.10045.4.3.2", "ecdsa", "sha256")
_SIG_ALG_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
}
_TCB_SIGNING_CN = "Intel SGX TCB Signing"


# --------------------------------------------------------------------------------------------
# Cached primitives (deterministic functions of their byte inputs)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _public_key(spki: bytes) -> PublicKeyTypes:
    try:
        return load_der_public_key(spki)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedError("unusable public key in a certificate") from exc


@lru_cache(maxsize=1024)
def _signature_problem(
    spki: bytes, algorithm: SignatureAlgorithm, signature: bytes, data: bytes, what: str
) -> str | None:
    """None when ``signature`` over ``data`` verifies with ``spki``, else why not (cached)."""
    try:
        verify_signature(_public_key(spki), algorithm, signature, data, what=what)
    except (SignatureError, MalformedError) as exc:
        return exc.message
    return None


def _raw_to_der(raw: bytes) -> bytes:
    if len(raw) != 64:
        raise MalformedError(f"ECDSA P-256 signature must be 64 bytes, got {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _require_signature(
    checks: Checks,
    name: str,
    *,
    signer: Certificate,
    algorithm: SignatureAlgorithm,
    signature: bytes,
    data: bytes,
    what: str,
    detail: str,
) -> None:
    problem = _signature_problem(signer.spki, algorithm, signature, data, what)
    if problem is not None:
        checks.fail(name, SignatureError, problem)
    checks.ok(name, detail=detail)


# --------------------------------------------------------------------------------------------
# Certificate chains
# --------------------------------------------------------------------------------------------


def _verify_chain(
    chain: Sequence[Certificate],
    anchor: Certificate,
    *,
    now: datetime,
    checks: Checks,
    label: str,
    enforce_validity: bool = True,
) -> None:
    """``chain`` (leaf first) up to the pinned ``anchor``; signatures cached, dates per call."""
    certs = below_anchor(chain, anchor, checks=checks, label=label)
    if not certs:
        checks.fail(f"{label}.chain", CertificateChainError, "chain holds only the root")
    full = [*certs, anchor]
    for index, cert in enumerate(certs):
        issuer = full[index + 1]
        step = f"{label}.{index}"
        checks.require(
            cert.issuer.der == issuer.subject.der,
            f"{step}.issuer",
            CertificateChainError,
            f"{cert.describe()} was not issued by {issuer.describe()}",
            expected=str(issuer.subject),
            actual=str(cert.issuer),
        )
        if issuer is not anchor:
            checks.require(
                issuer.is_ca() is True,
                f"{label}.{index + 1}.ca",
                CertificateChainError,
                f"{issuer.describe()} is not a CA but issued {cert.describe()}",
            )
        _require_signature(
            checks,
            f"{step}.signature",
            signer=issuer,
            algorithm=cert.signature_algorithm,
            signature=cert.signature,
            data=cert.tbs,
            what=f"{cert.describe()} <- {issuer.describe()}",
            detail=f"{cert.describe()} signed by {issuer.describe()} ({cert.signature_algorithm})",
        )
        if enforce_validity:
            check_validity(cert, now=now, checks=checks, label=step)
        else:
            checks.ok(
                f"{step}.validity",
                detail=(
                    f"{cert.describe()} is the TCB Signing certificate shipped with this package "
                    f"(a pinned trust anchor): its validity period "
                    f"({cert.not_before.isoformat()} to {cert.not_after.isoformat()}) is not "
                    "enforced; the collateral's own issueDate/nextUpdate are"
                ),
            )
    _require_signature(
        checks,
        f"{label}.root.self_signature",
        signer=anchor,
        algorithm=anchor.signature_algorithm,
        signature=anchor.signature,
        data=anchor.tbs,
        what=f"{anchor.describe()} self-signature",
        detail=f"{anchor.describe()} is self-signed",
    )
    check_validity(anchor, now=now, checks=checks, label=f"{label}.root")


def _check_window(
    checks: Checks, name: str, what: str, *, start: datetime, end: datetime, now: datetime
) -> None:
    checks.require(
        start <= now <= end,
        name,
        ValidityError,
        f"{what} is not valid at {format_time(now)} (valid {format_time(start)} to "
        f"{format_time(end)})",
        expected=f"{format_time(start)} .. {format_time(end)}",
        actual=format_time(now),
    )


def _verify_crl(
    crl: Crl, issuer: Certificate, *, now: datetime, checks: Checks, label: str
) -> None:
    checks.require(
        crl.issuer.der == issuer.subject.der,
        f"{label}.issuer",
        CollateralError,
        f"{crl.describe()} is not issued by {issuer.describe()}",
        expected=str(issuer.subject),
        actual=str(crl.issuer),
    )
    _require_signature(
        checks,
        f"{label}.signature",
        signer=issuer,
        algorithm=crl.signature_algorithm,
        signature=crl.signature,
        data=crl.tbs,
        what=f"{crl.describe()} signature",
        detail=f"{crl.describe()} signed by {issuer.describe()}",
    )
    _check_window(
        checks,
        f"{label}.validity",
        crl.describe(),
        start=crl.this_update,
        end=crl.next_update,
        now=now,
    )


def _not_revoked(checks: Checks, crl: Crl, cert: Certificate, name: str) -> None:
    checks.require(
        not crl.revokes(cert),
        name,
        RevokedError,
        f"{cert.describe()} (serial {cert.serial:x}) is revoked by {crl.describe()}",
        expected="not listed",
        actual=f"serial {cert.serial:x}",
    )


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


def _rfc4514(name: Name) -> str:
    return ",".join(f"{k}={v}" for k, v in reversed(name.attributes))


def _cert_summary(cert: Certificate) -> dict[str, object]:
    return {
        "subject": _rfc4514(cert.subject),
        "issuer": _rfc4514(cert.issuer),
        "serial": f"{cert.serial:x}",
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "sha256_der": cert.sha256.hex(),
        "sig_alg": _SIG_ALG_NAMES.get(cert.signature_algorithm.oid, str(cert.signature_algorithm)),
    }


@dataclass(frozen=True)
class VerifiedTdxQuote:
    """A TDX quote whose signatures and PCK chain verified (and collateral, when given)."""

    quote: TdxQuote
    #: The PCK chain from the quote, leaf first, verified to the root.
    pck_chain: tuple[Certificate, ...]
    pck: PckExtensions
    #: The final TCB status, or None when no collateral was given (TCB not evaluated).
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    tcb: TcbEvaluation | None
    collateral: Collateral | None
    #: True when both the PCK CRL and the root CA CRL were checked.
    revocation_checked: bool

    @property
    def fmspc(self) -> bytes:
        return self.pck.fmspc

    @property
    def report_data(self) -> bytes:
        return self.quote.report_data

    def fields(self) -> dict[str, object]:
        out = self.quote.fields()
        out["pck_chain"] = [_cert_summary(c) for c in self.pck_chain]
        out["pck_extensions"] = self.pck.fields()
        out["tcb_status"] = self.tcb_status
        out["advisory_ids"] = list(self.advisory_ids)
        out["revocation_checked"] = self.revocation_checked
        if self.tcb is not None:
            out["tcb"] = self.tcb.fields()
        if self.collateral is not None:
            out["collateral"] = self.collateral.fields()
        return out


# --------------------------------------------------------------------------------------------
# verify_quote
# --------------------------------------------------------------------------------------------


def _verify_quote_signatures(quote: TdxQuote, checks: Checks) -> None:
    cert_data = quote.signature_data.certification
    pck_leaf = quote.pck_chain[0]
    qe = cert_data.qe_report
    leaf_key = _public_key(pck_leaf.spki)
    checks.require(
        isinstance(leaf_key, ec.EllipticCurvePublicKey),
        "tdx.pck_chain.leaf_key",
        CertificateChainError,
        "the PCK certificate key is not an EC key",
    )
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    try:
        leaf_key.verify(
            _raw_to_der(cert_data.qe_report_signature), qe.raw, ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, MalformedError, ValueError):
        checks.fail(
            "tdx.qe_report.signature",
            SignatureError,
            "QE report signature does not verify with the PCK certificate key",
        )
    checks.ok("tdx.qe_report.signature", detail="QE report signed by the PCK certificate key")

    expected = hashlib.sha256(
        quote.signature_data.attest_key + cert_data.qe_auth_data
    ).digest() + bytes(32)
    checks.require(
        hmac.compare_digest(qe.report_data, expected),
        "tdx.qe_report.attestation_key",
        SignatureError,
        "QE report does not certify this attestation key "
        "(REPORT_DATA != SHA-256(attestation key || QE auth data) || 0^32)",
        expected=expected,
        actual=qe.report_data,
    )

    try:
        attest_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.signature_data.attest_key
        )
        attest_key.verify(
            _raw_to_der(quote.signature_data.signature),
            quote.signed_data,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError, MalformedError) as exc:
        reason = "not a P-256 point" if isinstance(exc, ValueError) else "does not verify"
        checks.fail(
            "tdx.quote.signature",
            SignatureError,
            f"quote signature by the attestation key {reason}",
        )
    checks.ok(
        "tdx.quote.signature",
        detail=f"header and TD report ({len(quote.signed_data)} bytes) signed by the "
        "attestation key (ECDSA P-256)",
    )


def _check_intel_qe(quote: TdxQuote, checks: Checks) -> None:
    qe = quote.qe_report
    checks.equal(
        "tdx.qe_report.mrsigner",
        INTEL_TD_QE_MRSIGNER,
        qe.mr_signer,
        SignatureError,
        "QE report MRSIGNER is not Intel's TD Quoting Enclave",
    )
    checks.equal(
        "tdx.qe_report.isvprodid",
        INTEL_TD_QE_PRODID,
        qe.isv_prod_id,
        SignatureError,
        "QE report ISVPRODID is not Intel's TD Quoting Enclave",
    )
    checks.require(
        not qe.debug,
        "tdx.qe_report.debug",
        SignatureError,
        "the Quoting Enclave is a debug enclave",
        expected=False,
        actual=qe.debug,
    )


def _verify_signed_json(
    signed: SignedJson,
    root: Certificate,
    *,
    now: datetime,
    checks: Checks,
    label: str,
    what: str,
) -> None:
    chain = signed.issuer_chain
    signer = chain[0]
    checks.require(
        signer.subject.get("CN") == _TCB_SIGNING_CN,
        f"{label}.signer",
        CollateralError,
        f"{what} is signed by {signer.describe()}, not the {_TCB_SIGNING_CN} certificate",
        expected=_TCB_SIGNING_CN,
        actual=signer.describe(),
    )
    _verify_chain(
        chain,
        root,
        now=now,
        checks=checks,
        label=f"{label}.chain",
        enforce_validity=not signed.embedded_chain,
    )
    try:
        der = _raw_to_der(signed.signature)
    except MalformedError as exc:
        checks.fail(f"{label}.signature", SignatureError, f"{what}: {exc.message}")
    _require_signature(
        checks,
        f"{label}.signature",
        signer=signer,
        algorithm=_ECDSA_P256_SHA256,
        signature=der,
        data=signed.body,
        what=f"{what} signature",
        detail=f"{what} ({len(signed.body)} bytes as received) signed by {signer.describe()}",
    )


def _verify_collateral(
    quote: TdxQuote,
    collateral: Collateral,
    root: Certificate,
    *,
    now: datetime,
    checks: Checks,
) -> bool:
    """Verify every collateral item; return True when both CRLs were checked."""
    info, identity = collateral.tcb_info, collateral.qe_identity
    _verify_signed_json(
        collateral.tcb_info_signed,
        root,
        now=now,
        checks=checks,
        label="tdx.collateral.tcb_info",
        what="TCB info",
    )
    _check_window(
        checks,
        "tdx.collateral.tcb_info.validity",
        f"TCB info (FMSPC {info.fmspc.hex()})",
        start=info.issue_date,
        end=info.next_update,
        now=now,
    )
    _verify_signed_json(
        collateral.qe_identity_signed,
        root,
        now=now,
        checks=checks,
        label="tdx.collateral.qe_identity",
        what="QE identity",
    )
    _check_window(
        checks,
        "tdx.collateral.qe_identity.validity",
        "QE identity",
        start=identity.issue_date,
        end=identity.next_update,
        now=now,
    )

    pck_leaf, pck_ca = quote.pck_chain[0], quote.pck_chain[1]
    intermediates = [c for c in quote.pck_chain[1:] if c.der != root.der]
    signers = {c.der: c for c in collateral.tcb_info_signed.issuer_chain[:1]}
    signers.update({c.der: c for c in collateral.qe_identity_signed.issuer_chain[:1]})

    root_crl = collateral.root_crl
    if root_crl is not None:
        _verify_crl(root_crl, root, now=now, checks=checks, label="tdx.collateral.root_ca_crl")
        for cert in [*intermediates, *signers.values()]:
            _not_revoked(checks, root_crl, cert, f"tdx.revocation.{cert.describe()}")
    else:
        checks.ok(
            "tdx.collateral.root_ca_crl",
            detail="no root CA CRL supplied: intermediate CA revocation not checked",
        )

    pck_crl = collateral.pck_crl
    if pck_crl is not None:
        crl_issuer = pck_ca
        issuer_chain = collateral.pck_crl_issuer_chain
        if issuer_chain is not None:
            _verify_chain(
                issuer_chain,
                root,
                now=now,
                checks=checks,
                label="tdx.collateral.pck_crl_issuer_chain",
            )
            if root_crl is not None:
                for cert in issuer_chain:
                    if cert.der != root.der:
                        _not_revoked(checks, root_crl, cert, "tdx.revocation.pck_crl_issuer")
            if issuer_chain[0].subject.der == pck_crl.issuer.der:
                crl_issuer = issuer_chain[0]
        checks.require(
            pck_crl.issuer.der == pck_leaf.issuer.der,
            "tdx.collateral.pck_crl.scope",
            CollateralError,
            f"{pck_crl.describe()} does not cover the PCK certificate (issued by "
            f"{pck_leaf.issuer.get('CN') or pck_leaf.issuer})",
            expected=str(pck_leaf.issuer),
            actual=str(pck_crl.issuer),
        )
        _verify_crl(pck_crl, crl_issuer, now=now, checks=checks, label="tdx.collateral.pck_crl")
        _not_revoked(checks, pck_crl, pck_leaf, "tdx.revocation.pck_certificate")
    else:
        checks.ok(
            "tdx.collateral.pck_crl",
            detail="no PCK CRL supplied: PCK certificate revocation not checked",
        )
    return root_crl is not None and pck_crl is not None


def verify_quote(
    quote: TdxQuote,
    *,
    collateral: Collateral | None,
    now: datetime,
    root: Certificate | None = None,
    checks: Checks | None = None,
) -> VerifiedTdxQuote:
    """Verify ``quote`` at ``now`` (tz-aware), optionally against Intel ``collateral``.

    ``root`` defaults to the Intel SGX Root CA shipped with the package. Returns a
    :class:`VerifiedTdxQuote` (whose ``tcb_status`` a policy then judges) or raises an
    :class:`~attestation.errors.AttestationError`.
    """
    checks = Checks() if checks is None else checks
    if now.tzinfo is None or now.utcoffset() is None:
        raise MalformedError("verify_quote: 'now' must be a timezone-aware datetime")
    anchor = embedded_root() if root is None else root
    _verify_chain(quote.pck_chain, anchor, now=now, checks=checks, label="tdx.pck_chain")
    _verify_quote_signatures(quote, checks)
    if collateral is None:
        if anchor.der == embedded_root().der:
            _check_intel_qe(quote, checks)
        checks.ok(
            "tdx.tcb.status",
            actual="not evaluated",
            detail="no collateral supplied: TCB status not evaluated",
        )
        return VerifiedTdxQuote(
            quote=quote,
            pck_chain=quote.pck_chain,
            pck=quote.pck_extensions,
            tcb_status=None,
            advisory_ids=(),
            tcb=None,
            collateral=None,
            revocation_checked=False,
        )
    revocation_checked = _verify_collateral(quote, collateral, anchor, now=now, checks=checks)
    evaluation = evaluate_tcb(quote, quote.pck_extensions, collateral, checks)
    return VerifiedTdxQuote(
        quote=quote,
        pck_chain=quote.pck_chain,
        pck=quote.pck_extensions,
        tcb_status=evaluation.status,
        advisory_ids=evaluation.advisory_ids,
        tcb=evaluation,
        collateral=collateral,
        revocation_checked=revocation_checked,
    )
