"""Verify an SEV-SNP report: AMD certificate chain, optional CRL, report signature, VCEK binding.

Chain: ARK (pinned, self-signed) -> ASK (VCEK) or ASVK (VLEK) -> VCEK/VLEK, every link
RSASSA-PSS with SHA-384. The report is signed with ECDSA P-384/SHA-384 by the VCEK/VLEK over
bytes 0x000..0x2A0; r and s are 72-byte little-endian integers at 0x2A0 and 0x2E8.

Caching: parsing certificates and verifying certificate signatures are pure functions of the
certificate bytes, so their results are cached (keyed by the bytes of issuer and subject).
Validity periods, the chain's match with the pinned roots, the report signature and every
comparison with the report are evaluated on every call; no verdict on a report is ever cached.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key

from attestation import _der
from attestation._checks import Checks
from attestation._x509 import (
    MAX_CRL_SIZE,
    Certificate,
    SignatureAlgorithm,
    _algorithm,
    load_certificates,
    verify_signature,
)
from attestation.errors import (
    AttestationError,
    CertificateChainError,
    MalformedError,
    RevokedError,
    SignatureError,
    ValidityError,
)
from attestation.snp.certs import VcekExtensions, parse_vcek_extensions
from attestation.snp.report import (
    SIGNING_KEY_NONE,
    SIGNING_KEY_VLEK,
    SnpReport,
    TcbVersion,
    parse_report,
    tcb_layout_for,
)
from attestation.snp.roots import DEFAULT_TRUST_ROOTS, ProductRoots, SnpTrustRoots

__all__ = ["VerifiedSnpReport", "clear_caches", "verify_crl", "verify_report"]

_LEAF_CN = {"vcek": "SEV-VCEK", "vlek": "SEV-VLEK"}
_TURIN_HWID = 8


@dataclass(frozen=True)
class VerifiedSnpReport:
    """A report whose signature, chain and VCEK binding verified at ``now``."""

    report: SnpReport
    vcek: Certificate
    signing_key: Literal["vcek", "vlek"]
    product: str
    extensions: VcekExtensions
    vcek_tcb: TcbVersion
    chip_id_checked: bool
    chip_id_note: str
    crl_checked: bool = False
    simulated: bool = False

    def fields(self) -> dict[str, object]:
        """The report's fields (product resolved) plus the VCEK's extensions."""
        out = self.report.fields(product=self.product)
        out["vcek_extensions"] = self.extensions.to_dict()
        out["verified_signing_key"] = self.signing_key
        return out


# -- caches (pure functions of certificate bytes) ----------------------------------------------

_LINK_CACHE_MAX = 1024
_link_cache: dict[tuple[bytes, bytes], None] = {}
_link_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _certificates(data: bytes) -> tuple[Certificate, ...]:
    return tuple(load_certificates(data))


@functools.lru_cache(maxsize=256)
def _leaf(data: bytes) -> tuple[Certificate, VcekExtensions]:
    certs = _certificates(data)
    if len(certs) != 1:
        raise MalformedError(f"VCEK/VLEK input must hold one certificate, found {len(certs)}")
    return certs[0], parse_vcek_extensions(certs[0])


@functools.lru_cache(maxsize=256)
def _public_key_of(spki: bytes) -> PublicKeyTypes:
    try:
        return load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MalformedError("certificate: unusable public key") from exc


def _public_key(cert: Certificate) -> PublicKeyTypes:
    return _public_key_of(cert.spki)


def _verify_link(cert: Certificate, issuer: Certificate) -> bool:
    """Verify ``issuer``'s signature on ``cert``; True when the result came from the cache."""
    key = (issuer.der, cert.der)
    if key in _link_cache:
        return True
    verify_signature(
        _public_key(issuer),
        cert.signature_algorithm,
        cert.signature,
        cert.tbs,
        what=f"{cert.describe()} <- {issuer.describe()}",
    )
    with _link_lock:
        if len(_link_cache) >= _LINK_CACHE_MAX:
            _link_cache.clear()
        _link_cache[key] = None
    return False


def clear_caches() -> None:
    """Forget cached certificate parses and signature results (for tests and benchmarks)."""
    with _link_lock:
        _link_cache.clear()
        _info_cache.clear()
    _certificates.cache_clear()
    _leaf.cache_clear()
    _public_key_of.cache_clear()
    _parse_crl.cache_clear()


# -- chain ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CertInfo:
    """Display strings of a certificate, computed once per certificate (not per check)."""

    name: str
    subject: str
    issuer: str
    window: str
    fingerprint: str
    pss_sha384: bool
    algorithm: str


_info_cache: dict[bytes, _CertInfo] = {}


def _info(cert: Certificate) -> _CertInfo:
    info = _info_cache.get(cert.der)
    if info is None:
        alg = cert.signature_algorithm
        info = _CertInfo(
            name=cert.describe(),
            subject=str(cert.subject),
            issuer=str(cert.issuer),
            window=f"{cert.not_before.isoformat()} .. {cert.not_after.isoformat()}",
            fingerprint=cert.sha256.hex(),
            pss_sha384=alg.scheme == "rsa-pss" and alg.hash_name == "sha384",
            algorithm=str(alg),
        )
        with _link_lock:
            if len(_info_cache) >= _LINK_CACHE_MAX:
                _info_cache.clear()
            _info_cache[cert.der] = info
    return info


def _require(
    checks: Checks,
    condition: bool,
    name: str,
    error: type[AttestationError],
    message: Callable[[], str],
    *,
    expected: object = None,
    actual: object = None,
    detail: str = "",
) -> None:
    """Like ``Checks.require`` but builds the failure message only when it is needed."""
    if condition:
        checks.ok(name, expected=expected, actual=actual, detail=detail)
    else:
        checks.fail(name, error, message(), expected=expected, actual=actual)


def _require_pss_sha384(cert: Certificate, label: str, checks: Checks) -> None:
    info = _info(cert)
    _require(
        checks,
        info.pss_sha384,
        f"{label}.algorithm",
        CertificateChainError,
        lambda: f"{info.name} is signed with {info.algorithm}, AMD uses RSASSA-PSS/SHA384",
        expected="RSASSA-PSS/SHA384",
        actual=info.algorithm,
    )


def _check_link(
    cert: Certificate, issuer: Certificate, *, now: datetime, checks: Checks, label: str
) -> None:
    info, issuer_info = _info(cert), _info(issuer)
    _require(
        checks,
        cert.issuer.der == issuer.subject.der,
        f"{label}.issuer",
        CertificateChainError,
        lambda: f"{info.name} was not issued by {issuer_info.name}",
        expected=issuer_info.subject,
        actual=info.issuer,
    )
    _require_pss_sha384(cert, label, checks)
    try:
        cached = _verify_link(cert, issuer)
    except SignatureError as exc:
        checks.fail(f"{label}.signature", SignatureError, exc.message)
    checks.ok(
        f"{label}.signature",
        detail=f"{info.name} signed by {issuer_info.name}" + (" (cached)" if cached else ""),
    )
    _check_validity(cert, now=now, checks=checks, label=label)


def _check_validity(cert: Certificate, *, now: datetime, checks: Checks, label: str) -> None:
    info = _info(cert)
    _require(
        checks,
        cert.not_before <= now <= cert.not_after,
        f"{label}.validity",
        ValidityError,
        lambda: f"{info.name} is not valid at {now.isoformat()} (valid {info.window})",
        expected=info.window,
        actual=now,
    )


def _select_intermediate(
    pinned: ProductRoots,
    signing_key: str,
    cert_chain: bytes | None,
    vcek: Certificate,
    checks: Checks,
) -> Certificate:
    """The ASK/ASVK to use: the pinned one, or the one a supplied chain names."""
    try:
        intermediate = pinned.intermediate(signing_key)
    except CertificateChainError as exc:
        checks.fail("snp.chain.intermediate", CertificateChainError, exc.message)
    if cert_chain is None:
        checks.ok("snp.chain.supplied", detail="no chain supplied; using the pinned ASK/ARK")
        return intermediate
    supplied = _certificates(bytes(cert_chain))
    others = {c.subject.der for c in (pinned.ask, pinned.asvk) if c is not None}
    for cert in supplied:
        if cert.subject.der == pinned.ark.subject.der:
            checks.require(
                cert.der == pinned.ark.der,
                "snp.chain.ark_pinned",
                CertificateChainError,
                f"supplied ARK {_info(cert).name} is not the pinned {pinned.product} ARK",
                expected=_info(pinned.ark).fingerprint,
                actual=_info(cert).fingerprint,
            )
        elif cert.subject.der == intermediate.subject.der:
            intermediate = cert
        elif cert.subject.der in others or cert.der == vcek.der:
            continue  # the other intermediate of the same product, or the leaf repeated
        else:
            checks.fail(
                "snp.chain.unexpected",
                CertificateChainError,
                f"supplied chain holds {cert.describe()} (issuer {cert.issuer}), which is not "
                f"part of the {pinned.product} AMD chain",
                expected=str(pinned.ark.subject),
                actual=str(cert.subject),
            )
    checks.ok("snp.chain.supplied", detail=f"{len(supplied)} certificates match pinned roots")
    return intermediate


# -- CRL -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedCrl:
    tbs: bytes
    algorithm: SignatureAlgorithm
    signature: bytes
    issuer_der: bytes
    this_update: datetime
    next_update: datetime | None
    revoked: frozenset[int]


#: What ``cryptography`` raises for a CRL it cannot read: not only ValueError (an unknown CRL
#: version is x509.InvalidVersion, an unknown algorithm UnsupportedAlgorithm).
_CRL_ERRORS = (ValueError, x509.InvalidVersion, UnsupportedAlgorithm)


@functools.lru_cache(maxsize=32)
def _parse_crl(data: bytes) -> _ParsedCrl:
    if len(data) > MAX_CRL_SIZE:
        raise MalformedError(f"CRL: {len(data)} bytes, larger than {MAX_CRL_SIZE}")
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(data)
        )
        der = crl.public_bytes(encoding=Encoding.DER)
        # Read everything cryptography may decode lazily inside the same guard.
        this_update = crl.last_update_utc
        next_update = crl.next_update_utc
        revoked = frozenset(entry.serial_number for entry in crl)
    except _CRL_ERRORS as exc:
        raise MalformedError(f"CRL does not parse ({type(exc).__name__}: {exc})") from exc
    outer = _der.parse(der).expect(_der.SEQUENCE, "CertificateList").children()
    if len(outer) != 3:
        raise MalformedError("CRL: CertificateList must have three fields")
    tbs = outer[0].expect(_der.SEQUENCE, "TBSCertList").children()
    index = 1 if tbs and tbs[0].tag == _der.INTEGER else 0
    if len(tbs) < index + 3:
        raise MalformedError("CRL: TBSCertList too short")
    if tbs[index].raw != outer[1].raw:
        raise MalformedError("CRL: inner and outer signature algorithms differ")
    return _ParsedCrl(
        tbs=outer[0].raw,
        algorithm=_algorithm(outer[1]),
        signature=outer[2].as_bits(),
        issuer_der=tbs[index + 1].raw,
        this_update=this_update,
        next_update=next_update,
        revoked=revoked,
    )


def verify_crl(
    crl: bytes,
    ark: Certificate,
    *,
    serials: dict[str, Certificate],
    now: datetime,
    checks: Checks | None = None,
) -> None:
    """Check an AMD CRL (signed by ``ark``) and that none of ``serials`` is listed.

    ``serials`` maps a label ("ask", "vcek") to the certificate whose serial is looked up.
    Raises SignatureError/CertificateChainError for a CRL not from the ARK, ValidityError
    outside thisUpdate..nextUpdate, RevokedError for a listed certificate.
    """
    checks = Checks() if checks is None else checks
    parsed = _parse_crl(bytes(crl))
    checks.require(
        parsed.issuer_der == ark.subject.der,
        "snp.crl.issuer",
        CertificateChainError,
        f"CRL is not issued by {ark.describe()}",
        expected=str(ark.subject),
    )
    key = (ark.der, parsed.tbs + parsed.signature)
    if key not in _link_cache:
        try:
            verify_signature(
                _public_key(ark), parsed.algorithm, parsed.signature, parsed.tbs, what="AMD CRL"
            )
        except SignatureError as exc:
            checks.fail("snp.crl.signature", SignatureError, exc.message)
        with _link_lock:
            _link_cache[key] = None
    checks.ok("snp.crl.signature", detail=f"CRL signed by {ark.describe()} ({parsed.algorithm})")
    window = f"{parsed.this_update.isoformat()} .. " + (
        parsed.next_update.isoformat() if parsed.next_update else "(no nextUpdate)"
    )
    checks.require(
        parsed.next_update is not None and parsed.this_update <= now <= parsed.next_update,
        "snp.crl.validity",
        ValidityError,
        f"CRL is not current at {now.isoformat()} (valid {window})",
        expected=window,
        actual=now.isoformat(),
    )
    for label, cert in serials.items():
        checks.require(
            cert.serial not in parsed.revoked,
            f"snp.crl.{label}",
            RevokedError,
            f"{cert.describe()} (serial {cert.serial:#x}) is revoked by AMD's CRL",
            expected="not listed",
            actual="listed" if cert.serial in parsed.revoked else "not listed",
        )


# -- report --------------------------------------------------------------------------------------


def _resolve_product(report: SnpReport, extensions: VcekExtensions, checks: Checks) -> str:
    from_report = report.product
    from_cert = extensions.product
    if from_report is not None and from_cert is not None:
        checks.equal(
            "snp.product",
            from_report,
            from_cert,
            CertificateChainError,
            "product of the VCEK (productName) differs from the report's CPUID",
        )
        product = from_report
    else:
        product_or_none = from_report or from_cert
        if product_or_none is None:
            checks.fail(
                "snp.product",
                CertificateChainError,
                f"unknown SEV product (CPUID family {report.cpuid_fam_id}, "
                f"VCEK productName {extensions.product_name!r})",
            )
        product = product_or_none
        source = "CPUID" if from_report else f"VCEK productName {extensions.product_name!r}"
        checks.ok("snp.product", actual=product, detail=f"from {source}")
    checks.require(
        tcb_layout_for(product) == report.tcb_layout,
        "snp.tcb_layout",
        CertificateChainError,
        f"product {product} does not match the report's TCB layout ({report.tcb_layout})",
        expected=tcb_layout_for(product),
        actual=report.tcb_layout,
    )
    return product


def _check_chip_id(
    report: SnpReport,
    extensions: VcekExtensions,
    signing_key: str,
    product: str,
    checks: Checks,
) -> tuple[bool, str]:
    if signing_key == "vlek":
        note = "skipped: a VLEK is not bound to one chip (it has no hwID)"
        checks.ok("snp.chip_id", detail=note)
        return False, note
    if report.mask_chip_key:
        note = "skipped: MASK_CHIP_KEY is set, so the report's CHIP_ID is masked"
        checks.ok("snp.chip_id", detail=note)
        return False, note
    if extensions.hwid is None:
        checks.fail("snp.chip_id", CertificateChainError, "VCEK has no hwID extension")
    hwid = extensions.hwid
    if product == "Turin":
        expected_chip_id = hwid + bytes(64 - len(hwid)) if len(hwid) == _TURIN_HWID else hwid
    else:
        expected_chip_id = hwid
    checks.equal(
        "snp.chip_id",
        expected_chip_id,
        report.chip_id,
        CertificateChainError,
        "report CHIP_ID is not the VCEK's hwID",
    )
    return True, f"VCEK hwID ({len(hwid)} bytes) matches CHIP_ID"


def verify_report(
    report: SnpReport | bytes,
    *,
    vcek: bytes,
    cert_chain: bytes | None = None,
    crl: bytes | None = None,
    now: datetime,
    roots: SnpTrustRoots = DEFAULT_TRUST_ROOTS,
    checks: Checks | None = None,
) -> VerifiedSnpReport:
    """Verify ``report`` with its VCEK (or VLEK) at time ``now`` (tz-aware UTC).

    ``vcek``: one certificate, PEM or DER. ``cert_chain``: optional ASK/ASVK and ARK (PEM bundle
    or DER); its ARK must equal the pinned one byte for byte. ``crl``: optional AMD CRL (DER or
    PEM) for the product. Raises MalformedError, SignatureError, CertificateChainError,
    RevokedError or ValidityError; every check is recorded in ``checks``.
    """
    checks = Checks() if checks is None else checks
    if now.tzinfo is None:
        raise MalformedError("verification time must be timezone-aware (UTC)")
    if not isinstance(report, SnpReport):
        report = parse_report(report)

    checks.require(
        report.signing_key != SIGNING_KEY_NONE,
        "snp.report.signing_key",
        SignatureError,
        "the report is not signed (SIGNING_KEY = none)",
        actual=report.signing_key_name,
    )
    signing_key: Literal["vcek", "vlek"] = (
        "vlek" if report.signing_key == SIGNING_KEY_VLEK else "vcek"
    )
    leaf, extensions = _leaf(bytes(vcek))
    checks.equal(
        "snp.vcek.kind",
        _LEAF_CN[signing_key],
        leaf.subject.get("CN"),
        CertificateChainError,
        f"report SIGNING_KEY is {signing_key.upper()} but the certificate is not one",
    )
    product = _resolve_product(report, extensions, checks)
    try:
        pinned = roots.for_product(product)
    except CertificateChainError as exc:
        checks.fail("snp.roots", CertificateChainError, exc.message)
    intermediate = _select_intermediate(pinned, signing_key, cert_chain, leaf, checks)

    # ARK: pinned, self-signed, current.
    ark = pinned.ark
    _require_pss_sha384(ark, "snp.ark", checks)
    try:
        cached = _verify_link(ark, ark)
    except SignatureError as exc:
        checks.fail("snp.ark.self_signature", SignatureError, exc.message)
    checks.ok(
        "snp.ark.self_signature",
        expected=_info(ark).fingerprint,
        actual=_info(ark).fingerprint,
        detail=f"pinned {_info(ark).name} is self-signed" + (" (cached)" if cached else ""),
    )
    _check_validity(ark, now=now, checks=checks, label="snp.ark")

    inter_label = "snp.ask" if signing_key == "vcek" else "snp.asvk"
    _require(
        checks,
        intermediate.is_ca() is not False,
        f"{inter_label}.ca",
        CertificateChainError,
        lambda: f"{_info(intermediate).name} is not a CA",
    )
    _check_link(intermediate, ark, now=now, checks=checks, label=inter_label)
    _check_link(leaf, intermediate, now=now, checks=checks, label="snp.vcek")

    if crl is not None:
        verify_crl(
            crl,
            ark,
            serials={inter_label.removeprefix("snp."): intermediate, signing_key: leaf},
            now=now,
            checks=checks,
        )

    # Report signature (never cached).
    key = _public_key(leaf)
    _require(
        checks,
        isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1",
        "snp.vcek.key",
        CertificateChainError,
        lambda: f"{_info(leaf).name} does not hold an ECDSA P-384 key",
    )
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(
            encode_dss_signature(report.sig_r, report.sig_s),
            report.signed_bytes,
            ec.ECDSA(hashes.SHA384()),
        )
    except (InvalidSignature, ValueError) as exc:
        checks.fail(
            "snp.report.signature",
            SignatureError,
            f"report signature does not verify with the {signing_key.upper()} "
            f"({type(exc).__name__})",
        )
    checks.ok(
        "snp.report.signature",
        detail=f"ECDSA P-384/SHA-384 by the {signing_key.upper()} over bytes 0x000..0x2a0",
    )
    # TCB the VCEK was issued for == REPORTED_TCB.
    layout = report.tcb_layout
    cert_tcb_raw = extensions.tcb_raw(layout)
    _require(
        checks,
        cert_tcb_raw == report.reported_tcb_raw,
        "snp.vcek.tcb",
        CertificateChainError,
        lambda: (
            f"{signing_key.upper()} TCB extensions {cert_tcb_raw:#018x} != REPORTED_TCB "
            f"{report.reported_tcb_raw:#018x}"
        ),
        expected=f"{report.reported_tcb_raw:#018x}",
        actual=f"{cert_tcb_raw:#018x}",
    )
    vcek_tcb = TcbVersion.decode(cert_tcb_raw, layout)
    chip_checked, chip_note = _check_chip_id(report, extensions, signing_key, product, checks)

    return VerifiedSnpReport(
        report=report,
        vcek=leaf,
        signing_key=signing_key,
        product=product,
        extensions=extensions,
        vcek_tcb=vcek_tcb,
        chip_id_checked=chip_checked,
        chip_id_note=chip_note,
        crl_checked=crl is not None,
        simulated=roots.simulated,
    )
