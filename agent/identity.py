"""The agent's own keys, born in memory at start, and the claims that name them.

At start the agent generates:

- a TLS key pair (ECDSA P-256) and a self-signed certificate (``CN=cube-agent``; SAN
  ``localhost``, ``127.0.0.1``, ``::1`` and any configured names; valid for a short time);
- an HPKE key pair (RFC 9180, DHKEM(X25519, HKDF-SHA256)) for end-to-end encrypted bodies.

Neither private key is ever written to disk or logged. :meth:`AgentIdentity.ssl_context` hands
the TLS key to OpenSSL through an anonymous memory file (``memfd_create``), read back through
``/proc/self/fd/N`` and closed (after being overwritten) right away: no path on any file system
ever holds it.

The claims (:meth:`AgentIdentity.claims`) are the exact bytes the evidence binds: the
certificate's SHA-256, the HPKE public key, the model, the configuration digest, the agent
version and the issue time (plus the vTPM AK's hash when a vTPM quotes). They are rebuilt for
every evidence request, so ``issued_at`` is always fresh.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hpke as hpke_mod
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig
from attestation.evidence import encode_claims

__all__ = [
    "AGENT_VERSION",
    "DEFAULT_VALIDITY",
    "HPKE_SUITE",
    "AgentIdentity",
    "IdentityError",
]


def _version() -> str:
    try:
        return metadata.version("cube")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


#: The version the claims carry (the installed ``cube`` distribution).
AGENT_VERSION = _version()
#: How long a self-signed certificate is valid when no rotation interval says otherwise. The
#: agent replaces its keys every ``key_rotate_seconds`` (agent.rotation), each certificate valid
#: for twice that; verifiers (the proxy, cube_client) refuse an expired attested certificate, so
#: the window bounds how long a leaked TLS key could be used.
DEFAULT_VALIDITY = timedelta(days=7)
#: The HPKE suite of the agent's key: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
HPKE_SUITE = hpke_mod.Suite(
    hpke_mod.KEM.X25519, hpke_mod.KDF.HKDF_SHA256, hpke_mod.AEAD.CHACHA20_POLY1305
)
_BACKDATE = timedelta(minutes=5)  # tolerate clients whose clocks run a little behind


class IdentityError(Exception):
    """The identity could not be created (bad names, no memfd support)."""


def _subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ("localhost", "127.0.0.1", "::1", *names):
        key = name.strip().lower()
        if not key or key in seen:
            continue
        seen.add(key)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(key)))
        except ValueError:
            if any(c.isspace() or c in "/\\@:" for c in key) or len(key) > 253:
                raise IdentityError(f"{name!r} is not a DNS name or IP address") from None
            try:
                out.append(x509.DNSName(key))
            except ValueError:  # not an A-label (ASCII) name
                raise IdentityError(f"{name!r} is not an ASCII DNS name (use xn--...)") from None
    return out


class AgentIdentity:
    """The TLS and HPKE keys of one agent process. Private keys stay in this object."""

    def __init__(
        self,
        *,
        tls_key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        hpke_key: x25519.X25519PrivateKey,
    ) -> None:
        self._tls_key = tls_key
        self._hpke_key = hpke_key
        self.certificate = certificate
        #: The certificate, DER; what TLS clients receive and pin.
        self.cert_der: bytes = certificate.public_bytes(serialization.Encoding.DER)
        self.cert_pem: bytes = certificate.public_bytes(serialization.Encoding.PEM)
        #: SHA-256 of :attr:`cert_der` (32 bytes), named by the claims.
        self.cert_sha256: bytes = hashlib.sha256(self.cert_der).digest()
        #: The raw X25519 public key (32 bytes), named by the claims.
        self.hpke_public_key: bytes = hpke_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:  # never show key material
        return f"AgentIdentity(cert_sha256={self.cert_sha256.hex()})"

    @classmethod
    def generate(
        cls,
        names: Sequence[str] = (),
        *,
        validity: timedelta = DEFAULT_VALIDITY,
        now: datetime | None = None,
    ) -> AgentIdentity:
        """Fresh keys and a self-signed certificate for ``localhost``, loopback and ``names``."""
        tls_key, certificate = _new_certificate(names, validity, now)
        return cls(
            tls_key=tls_key, certificate=certificate, hpke_key=x25519.X25519PrivateKey.generate()
        )

    @property
    def not_valid_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    # -- TLS ---------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A server context holding this identity, loaded without the key touching disk."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.3 only (forward secrecy and AEAD by construction), and no session resumption:
        # a resumed session shows the client the certificate of its first handshake, which
        # after a key rotation (agent.rotation) is no longer the one this connection's evidence
        # would name. TLS 1.2 would resume through the server's session-ID cache, which
        # Python's ssl cannot turn off.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        key_pem = self._tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _load_chain_from_memory(ctx, self.cert_pem + key_pem)
        return ctx

    # -- HPKE --------------------------------------------------------------------------------

    def hpke_decrypt(self, ciphertext: bytes, info: bytes = b"") -> bytes:
        """Open a single-shot HPKE message (``enc || ct``) sealed to :attr:`hpke_public_key`
        with :data:`HPKE_SUITE` (used by the encrypted-body layer)."""
        return HPKE_SUITE.decrypt(ciphertext, self._hpke_key, info=info)

    # -- claims ------------------------------------------------------------------------------

    def claims(
        self,
        config: AgentConfig,
        *,
        model_digest: str | None = None,
        tpm_ak_sha256: bytes | None = None,
        hpke_public_key: bytes | None = None,
        now: datetime | None = None,
    ) -> bytes:
        """The ``cube-evidence/1`` claims bytes for one evidence request, naming this identity's
        certificate and ``hpke_public_key`` (default: this identity's)."""
        digest = model_digest or config.model_digest
        if digest is None:
            raise IdentityError("no model digest: the claims must name the model's weights")
        issued = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        claims: dict[str, object] = {
            "tls_cert_sha256": self.cert_sha256.hex(),
            "hpke_public_key": base64.b64encode(hpke_public_key or self.hpke_public_key).decode(),
            "model": {"name": config.model_name, "digest": digest},
            "config_digest": config.digest(),
            "agent_version": AGENT_VERSION,
            "issued_at": issued.isoformat().replace("+00:00", "Z"),
        }
        if tpm_ak_sha256 is not None:
            if len(tpm_ak_sha256) != 32:
                raise IdentityError("tpm_ak_sha256 must be 32 bytes")
            claims["tpm_ak_sha256"] = tpm_ak_sha256.hex()
        return encode_claims(claims)


def _new_certificate(
    names: Sequence[str], validity: timedelta, now: datetime | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if validity <= timedelta(0):
        raise IdentityError("certificate validity must be positive")
    now = now or datetime.now(UTC)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cube-agent")])
    public = tls_key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    return tls_key, certificate


def _load_chain_from_memory(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` from an anonymous memory file; the file is wiped and closed after."""
    if not hasattr(os, "memfd_create"):  # pragma: no cover - Linux only
        raise IdentityError("os.memfd_create is not available: refusing to put the key on disk")
    fd = os.memfd_create("cube-agent-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, bytes(len(pem)))
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
