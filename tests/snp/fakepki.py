"""A small AMD-shaped test PKI (ARK -> ASK/ASVK -> VCEK/VLEK) to sign reports the vectors lack.

RSA-2048 instead of AMD's 4096 keeps key generation fast; everything else (RSASSA-PSS/SHA-384
links, P-384 report key, KDS extensions) has AMD's shape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from attestation.snp import ProductRoots, SnpTrustRoots

NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2034, 1, 1, tzinfo=dt.UTC)
INSIDE = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1"


@cache
def _amd_name_template() -> x509.Name:
    pem = (resources.files("attestation.snp") / "trust" / "ark_milan.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).subject


def _name(cn: str) -> x509.Name:
    """AMD's distinguished-name shape (same attributes and string types) with ``cn``."""
    return x509.Name(
        [
            x509.NameAttribute(attr.oid, cn, _type=attr._type)
            if attr.oid == NameOID.COMMON_NAME
            else attr
            for attr in _amd_name_template()
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _ia5(text: str) -> bytes:
    raw = text.encode()
    return bytes([0x16, len(raw)]) + raw


@cache
def _rsa_key(label: str) -> rsa.RSAPrivateKey:
    del label  # one key per label, generated once per test session
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class FakeAmd:
    product: str
    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    asvk_key: rsa.RSAPrivateKey
    asvk: x509.Certificate

    def roots(self) -> SnpTrustRoots:
        return SnpTrustRoots.of(
            [
                ProductRoots.from_pem(
                    self.product,
                    ark=self.ark.public_bytes(Encoding.PEM),
                    ask=self.ask.public_bytes(Encoding.PEM),
                    asvk=self.asvk.public_bytes(Encoding.PEM),
                )
            ],
            simulated=True,
        )

    def chain_pem(self, *, vlek: bool = False) -> bytes:
        inter = self.asvk if vlek else self.ask
        return inter.public_bytes(Encoding.PEM) + self.ark.public_bytes(Encoding.PEM)

    def leaf(
        self,
        *,
        tcb: dict[str, int],
        hwid: bytes | None,
        vlek: bool = False,
        product_name: str | None = None,
        not_before: dt.datetime = NOT_BEFORE,
        not_after: dt.datetime = NOT_AFTER,
        curve: ec.EllipticCurve | None = None,
        rsa_padding: padding.PSS | padding.PKCS1v15 = _PSS,
        hash_algorithm: hashes.SHA256 | hashes.SHA384 | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        """A VCEK (or VLEK) with KDS extensions; returns its key and DER.

        ``tcb`` may hold ``fmc`` (Turin's fmcSPL). ``curve`` (P-384 by default),
        ``rsa_padding`` and ``hash_algorithm`` (AMD's PSS/SHA-384 by default) build leaves AMD
        would not issue.
        """
        key = ec.generate_private_key(curve or ec.SECP384R1())
        issuer, issuer_key = (self.asvk, self.asvk_key) if vlek else (self.ask, self.ask_key)
        exts: list[tuple[str, bytes]] = [
            (f"{_AMD}.1", _der_int(0)),
            (f"{_AMD}.2", _ia5(product_name or f"{self.product}-B0")),
            (f"{_AMD}.3.1", _der_int(tcb["bootloader"])),
            (f"{_AMD}.3.2", _der_int(tcb["tee"])),
            (f"{_AMD}.3.3", _der_int(tcb["snp"])),
            (f"{_AMD}.3.4", _der_int(0)),
            (f"{_AMD}.3.5", _der_int(0)),
            (f"{_AMD}.3.6", _der_int(0)),
            (f"{_AMD}.3.7", _der_int(0)),
            (f"{_AMD}.3.8", _der_int(tcb["microcode"])),
        ]
        if "fmc" in tcb:
            exts.append((f"{_AMD}.3.9", _der_int(tcb["fmc"])))
        if hwid is not None:
            exts.append((f"{_AMD}.4", hwid))
        if vlek:
            exts.append((f"{_AMD}.5", _ia5("CN=test.example")))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VLEK" if vlek else "SEV-VCEK"))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        for oid, value in exts:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
            )
        cert = builder.sign(issuer_key, hash_algorithm or hashes.SHA384(), rsa_padding=rsa_padding)
        return key, cert.public_bytes(Encoding.DER)

    def crl(
        self,
        revoked_serials: tuple[int, ...] = (),
        *,
        this_update: dt.datetime = NOT_BEFORE,
        next_update: dt.datetime = NOT_AFTER,
        key: rsa.RSAPrivateKey | None = None,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(this_update)
            .next_update(next_update)
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .build()
            )
        crl = builder.sign(key or self.ark_key, hashes.SHA384(), rsa_padding=_PSS)
        return crl.public_bytes(Encoding.DER)


def _ca(
    name: str,
    key: rsa.RSAPrivateKey,
    issuer_name: str,
    issuer_key: rsa.RSAPrivateKey,
    serial: int,
    *,
    ca: bool = True,
    rsa_padding: padding.PSS | padding.PKCS1v15 = _PSS,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | None = None,
) -> x509.Certificate:
    """An AMD-shaped CA certificate; ``ca``/``rsa_padding``/``hash_algorithm`` can spoil it."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hash_algorithm or hashes.SHA384(), rsa_padding=rsa_padding)
    )


@cache
def fake_amd(product: str = "Milan") -> FakeAmd:
    ark_key, ask_key, asvk_key = (_rsa_key(f"{product}-{n}") for n in ("ark", "ask", "asvk"))
    ark_name = f"ARK-{product}"
    return FakeAmd(
        product=product,
        ark_key=ark_key,
        ark=_ca(ark_name, ark_key, ark_name, ark_key, 0x10000),
        ask_key=ask_key,
        ask=_ca(f"SEV-{product}", ask_key, ark_name, ark_key, 0x10001),
        asvk_key=asvk_key,
        asvk=_ca(f"SEV-VLEK-{product}", asvk_key, ark_name, ark_key, 0x10101),
    )


def reissued(fake: FakeAmd, role: str, **spoil: Any) -> FakeAmd:
    """``fake`` with its ``role`` ("ark", "ask" or "asvk") certificate issued again: same key,
    name and issuer, with ``spoil`` passed to the builder (``ca=False``, ``rsa_padding=...``)."""
    ark_name = f"ARK-{fake.product}"
    names = {"ark": ark_name, "ask": f"SEV-{fake.product}", "asvk": f"SEV-VLEK-{fake.product}"}
    serials = {"ark": 0x10000, "ask": 0x10001, "asvk": 0x10101}
    key: rsa.RSAPrivateKey = getattr(fake, f"{role}_key")
    cert = _ca(names[role], key, ark_name, fake.ark_key, serials[role], **spoil)
    if role == "ark":
        return dataclasses.replace(fake, ark=cert)
    return (
        dataclasses.replace(fake, ask=cert)
        if role == "ask"
        else dataclasses.replace(fake, asvk=cert)
    )


def sign_report(body: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Put an AMD-format ECDSA P-384 signature over ``body[:0x2A0]`` into a 1184-byte report."""
    assert len(body) == 0x4A0
    der = key.sign(body[:0x2A0], ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return body[:0x2A0] + sig + bytes(0x4A0 - 0x2A0 - len(sig))


def patch(body: bytes, offset: int, value: bytes) -> bytes:
    return body[:offset] + value + body[offset + len(value) :]
