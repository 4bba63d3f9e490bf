"""X.509 certificates read with our own strict DER reader.

Why not ``cryptography.x509`` for certificates: AMD's VCEK/VLEK certificates carry serial number
0, which ``cryptography`` (>= 42) accepts only with a deprecation warning and has announced it
will reject. We parse the certificate structure ourselves and use ``cryptography`` only for what
it is good at: public keys and signature verification. CRLs (which have ordinary serials) may be
read with ``cryptography`` directly.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_public_key

from attestation import _der
from attestation._checks import Checks
from attestation.errors import (
    CertificateChainError,
    MalformedError,
    SignatureError,
    ValidityError,
)

__all__ = [
    "MAX_CRL_SIZE",
    "Certificate",
    "Extension",
    "SignatureAlgorithm",
    "below_anchor",
    "load_certificate",
    "load_certificates",
    "pem_certificate",
    "verify_chain",
    "verify_issued_by",
    "verify_signature",
]

#: The largest CRL (DER) read. Real AMD and Intel CRLs are a few KB (the vectors' are 0.3 and
#: 2.6 KB); 1 MiB holds tens of thousands of entries and bounds what a hostile one costs.
MAX_CRL_SIZE = 1024 * 1024

_NAME_OIDS = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.5": "serialNumber",
    "1.2.840.113549.1.9.1": "emailAddress",
}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_HASH_OIDS = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}

RSA_PSS = "1.2.840.113549.1.1.10"
_RSA_PKCS1 = {
    "1.2.840.113549.1.1.5": "sha1",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
}
_ECDSA = {
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
}
_MGF1 = "1.2.840.113549.1.1.8"
BASIC_CONSTRAINTS = "2.5.29.19"

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class SignatureAlgorithm:
    """A signature algorithm with its parameters resolved."""

    oid: str
    scheme: str  # "rsa-pss" | "rsa-pkcs1v15" | "ecdsa"
    hash_name: str  # "sha256", "sha384", ...
    salt_length: int | None = None  # RSA-PSS only

    def hash(self) -> hashes.HashAlgorithm:
        return _HASHES[self.hash_name]()

    def __str__(self) -> str:
        if self.scheme == "rsa-pss":
            return f"RSASSA-PSS/{self.hash_name.upper()}"
        return f"{self.scheme}/{self.hash_name}"


@dataclass(frozen=True)
class Extension:
    oid: str
    critical: bool
    value: bytes


@dataclass(frozen=True)
class Name:
    """A distinguished name: its DER (for comparison) and its attributes (for display)."""

    der: bytes
    attributes: tuple[tuple[str, str], ...]

    def get(self, short: str) -> str | None:
        for key, value in self.attributes:
            if key == short:
                return value
        return None

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.attributes)


@dataclass(frozen=True)
class Certificate:
    """A parsed X.509 v3 certificate. Signatures are *not* verified by parsing."""

    der: bytes
    tbs: bytes
    serial: int
    signature_algorithm: SignatureAlgorithm
    signature: bytes
    issuer: Name
    subject: Name
    not_before: datetime
    not_after: datetime
    spki: bytes
    extensions: Mapping[str, Extension] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    def public_key(self) -> PublicKeyTypes:
        try:
            return load_der_public_key(self.spki)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise MalformedError(f"certificate {self.subject}: unusable public key") from exc

    def extension(self, oid: str) -> bytes | None:
        ext = self.extensions.get(oid)
        return None if ext is None else ext.value

    def is_ca(self) -> bool | None:
        """The basicConstraints cA flag, or None when the extension is absent."""
        value = self.extension(BASIC_CONSTRAINTS)
        if value is None:
            return None
        items = _der.parse(value).expect(_der.SEQUENCE, "basicConstraints").children()
        return bool(items) and items[0].tag == _der.BOOLEAN and items[0].as_bool()

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now <= self.not_after

    def describe(self) -> str:
        return self.subject.get("CN") or str(self.subject) or "certificate"


def _algorithm(node: _der.Node) -> SignatureAlgorithm:
    items = node.expect(_der.SEQUENCE, "AlgorithmIdentifier").children()
    if not items:
        raise MalformedError("empty AlgorithmIdentifier")
    oid = items[0].as_oid()
    if oid in _RSA_PKCS1:
        return SignatureAlgorithm(oid, "rsa-pkcs1v15", _RSA_PKCS1[oid])
    if oid in _ECDSA:
        return SignatureAlgorithm(oid, "ecdsa", _ECDSA[oid])
    if oid == RSA_PSS:
        hash_name = "sha1"
        mgf_hash = "sha1"
        salt = 20
        if len(items) > 1:
            for param in items[1].expect(_der.SEQUENCE, "RSASSA-PSS params").children():
                inner = param.children()
                if len(inner) != 1:
                    raise MalformedError("RSASSA-PSS params: bad field")
                if param.tag == 0xA0:
                    hash_name = _hash_of(inner[0])
                elif param.tag == 0xA1:
                    mgf = inner[0].expect(_der.SEQUENCE, "MGF").children()
                    if len(mgf) != 2 or mgf[0].as_oid() != _MGF1:
                        raise MalformedError("RSASSA-PSS: only MGF1 is supported")
                    mgf_hash = _hash_of(mgf[1])
                elif param.tag == 0xA2:
                    salt = inner[0].as_int()
                elif param.tag == 0xA3:
                    if inner[0].as_int() != 1:
                        raise MalformedError("RSASSA-PSS: trailer field must be 1")
                else:
                    raise MalformedError("RSASSA-PSS params: unknown field")
        if mgf_hash != hash_name:
            raise MalformedError("RSASSA-PSS: MGF1 hash differs from the message hash")
        if not 0 <= salt <= 512:
            raise MalformedError("RSASSA-PSS: bad salt length")
        return SignatureAlgorithm(oid, "rsa-pss", hash_name, salt)
    raise MalformedError(f"unsupported signature algorithm {oid}")


def _hash_of(node: _der.Node) -> str:
    items = node.expect(_der.SEQUENCE, "hash AlgorithmIdentifier").children()
    if not items:
        raise MalformedError("empty hash AlgorithmIdentifier")
    oid = items[0].as_oid()
    if oid not in _HASH_OIDS:
        raise MalformedError(f"unsupported hash algorithm {oid}")
    return _HASH_OIDS[oid]


def _name(node: _der.Node) -> Name:
    attrs: list[tuple[str, str]] = []
    for rdn in node.expect(_der.SEQUENCE, "Name").children():
        for atv in rdn.expect(_der.SET, "RDN").children():
            pair = atv.expect(_der.SEQUENCE, "AttributeTypeAndValue").children()
            if len(pair) != 2:
                raise MalformedError("bad AttributeTypeAndValue")
            oid = pair[0].as_oid()
            attrs.append((_NAME_OIDS.get(oid, oid), pair[1].content.decode("utf-8", "replace")))
    return Name(node.raw, tuple(attrs))


def parse_certificate_der(data: bytes) -> Certificate:
    """Parse one DER certificate (strict: no trailing bytes)."""
    try:
        cert = _der.parse(data).expect(_der.SEQUENCE, "Certificate").children()
        if len(cert) != 3:
            raise MalformedError("Certificate must have three fields")
        tbs_node, outer_alg, sig_node = cert
        tbs = tbs_node.expect(_der.SEQUENCE, "TBSCertificate").children()
        i = 0
        if tbs and tbs[0].tag == 0xA0:
            version_items = tbs[0].children()
            if len(version_items) != 1 or version_items[0].as_int() != 2:
                raise MalformedError("only X.509 v3 certificates are supported")
            i = 1
        if len(tbs) < i + 6:
            raise MalformedError("TBSCertificate too short")
        serial = tbs[i].as_int()
        inner_alg = tbs[i + 1]
        if inner_alg.raw != outer_alg.raw:
            raise MalformedError("inner and outer signature algorithms differ")
        issuer = _name(tbs[i + 2])
        validity = tbs[i + 3].expect(_der.SEQUENCE, "Validity").children()
        if len(validity) != 2:
            raise MalformedError("Validity must have two times")
        subject = _name(tbs[i + 4])
        spki = tbs[i + 5].expect(_der.SEQUENCE, "SubjectPublicKeyInfo").raw
        extensions: dict[str, Extension] = {}
        for extra in tbs[i + 6 :]:
            if extra.tag in (0x81, 0x82):
                continue
            if extra.tag != 0xA3:
                raise MalformedError(f"unexpected TBSCertificate field 0x{extra.tag:02x}")
            wrapped = extra.children()
            if len(wrapped) != 1:
                raise MalformedError("bad extensions wrapper")
            for ext in wrapped[0].expect(_der.SEQUENCE, "Extensions").children():
                parts = ext.expect(_der.SEQUENCE, "Extension").children()
                if len(parts) not in (2, 3):
                    raise MalformedError("bad Extension")
                oid = parts[0].as_oid()
                critical = parts[1].as_bool() if len(parts) == 3 else False
                if oid in extensions:
                    raise MalformedError(f"duplicate extension {oid}")
                extensions[oid] = Extension(oid, critical, parts[-1].as_octets())
        return Certificate(
            der=bytes(data),
            tbs=tbs_node.raw,
            serial=serial,
            signature_algorithm=_algorithm(outer_alg),
            signature=sig_node.as_bits(),
            issuer=issuer,
            subject=subject,
            not_before=validity[0].as_time(),
            not_after=validity[1].as_time(),
            spki=spki,
            extensions=MappingProxyType(extensions),
        )
    except MalformedError as exc:
        raise MalformedError(f"certificate: {exc.message}") from exc


def load_certificates(data: bytes) -> list[Certificate]:
    """Load every certificate in ``data``: a PEM bundle, or one DER certificate."""
    if b"-----BEGIN" in data:
        blocks = _PEM_RE.findall(data)
        if not blocks:
            raise MalformedError("PEM input holds no CERTIFICATE block")
        out = []
        for block in blocks:
            try:
                der = base64.b64decode(b"".join(block.split()), validate=True)
            except ValueError as exc:
                raise MalformedError("PEM certificate is not valid base64") from exc
            out.append(parse_certificate_der(der))
        return out
    if not data:
        raise MalformedError("empty certificate input")
    return [parse_certificate_der(data)]


def pem_certificate(der: bytes) -> bytes:
    """One DER certificate as a PEM block."""
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def load_certificate(data: bytes) -> Certificate:
    """Load exactly one certificate (PEM or DER)."""
    certs = load_certificates(data)
    if len(certs) != 1:
        raise MalformedError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def verify_signature(
    public_key: PublicKeyTypes,
    algorithm: SignatureAlgorithm,
    signature: bytes,
    data: bytes,
    *,
    what: str,
) -> None:
    """Verify ``signature`` over ``data``; raise :class:`SignatureError` if it does not verify."""
    try:
        if algorithm.scheme in ("rsa-pss", "rsa-pkcs1v15"):
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise SignatureError(f"{what}: {algorithm} needs an RSA key")
            pad: padding.AsymmetricPadding
            if algorithm.scheme == "rsa-pss":
                assert algorithm.salt_length is not None
                pad = padding.PSS(
                    mgf=padding.MGF1(algorithm.hash()), salt_length=algorithm.salt_length
                )
            else:
                pad = padding.PKCS1v15()
            public_key.verify(signature, data, pad, algorithm.hash())
        elif algorithm.scheme == "ecdsa":
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise SignatureError(f"{what}: ECDSA needs an EC key")
            public_key.verify(signature, data, ec.ECDSA(algorithm.hash()))
        else:
            raise SignatureError(f"{what}: unsupported scheme {algorithm.scheme}")
    except InvalidSignature as exc:
        raise SignatureError(f"{what}: signature does not verify") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{what}: signature cannot be checked ({exc})") from exc


def verify_issued_by(
    cert: Certificate,
    issuer: Certificate,
    *,
    now: datetime,
    checks: Checks,
    label: str,
) -> None:
    """Check that ``issuer`` issued ``cert`` and that ``cert`` is valid at ``now``."""
    checks.require(
        cert.issuer.der == issuer.subject.der,
        f"{label}.issuer",
        CertificateChainError,
        f"{cert.describe()} was not issued by {issuer.describe()} "
        f"(issuer {cert.issuer}, not {issuer.subject})",
        expected=str(issuer.subject),
        actual=str(cert.issuer),
    )
    try:
        verify_signature(
            issuer.public_key(),
            cert.signature_algorithm,
            cert.signature,
            cert.tbs,
            what=f"{cert.describe()} <- {issuer.describe()}",
        )
    except SignatureError as exc:
        checks.fail(f"{label}.signature", SignatureError, exc.message)
    checks.ok(
        f"{label}.signature",
        detail=f"{cert.describe()} signed by {issuer.describe()} ({cert.signature_algorithm})",
    )
    check_validity(cert, now=now, checks=checks, label=label)


def check_validity(cert: Certificate, *, now: datetime, checks: Checks, label: str) -> None:
    checks.require(
        cert.valid_at(now),
        f"{label}.validity",
        ValidityError,
        f"{cert.describe()} is not valid at {now.isoformat()} "
        f"(valid {cert.not_before.isoformat()} to {cert.not_after.isoformat()})",
        expected=f"{cert.not_before.isoformat()} .. {cert.not_after.isoformat()}",
        actual=now.isoformat(),
    )


def below_anchor(
    chain: Sequence[Certificate], anchor: Certificate, *, checks: Checks, label: str
) -> list[Certificate]:
    """The certificates of ``chain`` (leaf first) below the pinned ``anchor``.

    A chain may end with the anchor itself (compared byte for byte); a different certificate
    with the anchor's name is refused.
    """
    certs = list(chain)
    if not certs:
        checks.fail(f"{label}.chain", CertificateChainError, "empty certificate chain")
    if certs[-1].der == anchor.der:
        certs.pop()
        checks.ok(
            f"{label}.root",
            expected=anchor.sha256,
            actual=anchor.sha256,
            detail=f"root {anchor.describe()} is the pinned trust anchor",
        )
    elif certs[-1].subject.der == anchor.subject.der:
        checks.fail(
            f"{label}.root",
            CertificateChainError,
            f"chain root {certs[-1].describe()} is not the pinned trust anchor",
            expected=anchor.sha256,
            actual=certs[-1].sha256,
        )
    return certs


def verify_chain(
    chain: Sequence[Certificate],
    anchor: Certificate,
    *,
    now: datetime,
    checks: Checks,
    label: str,
) -> None:
    """Verify ``chain`` (leaf first) up to the pinned ``anchor``.

    The last certificate of ``chain`` may be the anchor itself (compared byte for byte) or be
    issued by it. Every intermediate must be a CA where it says so.
    """
    certs = below_anchor(chain, anchor, checks=checks, label=label)
    try:
        verify_signature(
            anchor.public_key(),
            anchor.signature_algorithm,
            anchor.signature,
            anchor.tbs,
            what=f"{anchor.describe()} self-signature",
        )
    except SignatureError as exc:
        checks.fail(f"{label}.root.self_signature", SignatureError, exc.message)
    checks.ok(f"{label}.root.self_signature", detail=f"{anchor.describe()} is self-signed")
    check_validity(anchor, now=now, checks=checks, label=f"{label}.root")
    full = [*certs, anchor]
    for index, cert in enumerate(certs):
        issuer = full[index + 1]
        if index + 1 < len(certs) or issuer is anchor:
            checks.require(
                issuer.is_ca() is not False,
                f"{label}.{index + 1}.ca",
                CertificateChainError,
                f"{issuer.describe()} is not a CA but issued {cert.describe()}",
            )
        verify_issued_by(cert, issuer, now=now, checks=checks, label=f"{label}.{index}")
