"""The agent's keys: a self-signed TLS certificate and an HPKE key, born and kept in memory."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import ssl
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig
from agent.identity import (
    AGENT_VERSION,
    DEFAULT_VALIDITY,
    HPKE_SUITE,
    AgentIdentity,
    IdentityError,
)
from attestation.evidence import Claims

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def identity() -> AgentIdentity:
    return AgentIdentity.generate(["agent.cube.example", "10.1.2.3"])


def config(**overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "jwt_issuer": "https://issuer.test",
        "jwt_audience": "domain-a",
        "jwks_file": "/jwks.json",
        "model_dir": "/m",
        "model_digest": DIGEST,
        "model_name": "cube-tiny",
    }
    values.update(overrides)
    return AgentConfig(**values)


def test_certificate_is_a_short_lived_self_signed_p256_server_certificate(
    identity: AgentIdentity,
) -> None:
    cert = x509.load_der_x509_certificate(identity.cert_der)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cube-agent"
    assert cert.issuer == cert.subject
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
    )  # self-signed by its own key
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "agent.cube.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= DEFAULT_VALIDITY + timedelta(minutes=5)
    assert cert.not_valid_before_utc <= datetime.now(UTC) < cert.not_valid_after_utc
    assert identity.cert_sha256 == hashlib.sha256(identity.cert_der).digest()
    assert identity.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_every_identity_is_new() -> None:
    a, b = AgentIdentity.generate(), AgentIdentity.generate()
    assert a.cert_sha256 != b.cert_sha256
    assert a.hpke_public_key != b.hpke_public_key


@pytest.mark.parametrize("name", ["bad name", "a/b", "user@host", "x" * 300])
def test_bad_certificate_names_are_refused(name: str) -> None:
    with pytest.raises(IdentityError):
        AgentIdentity.generate([name])


def test_validity_must_be_positive() -> None:
    with pytest.raises(IdentityError):
        AgentIdentity.generate(validity=timedelta(0))


def test_hpke_key_opens_what_is_sealed_to_its_public_key(identity: AgentIdentity) -> None:
    assert len(identity.hpke_public_key) == 32
    public = x25519.X25519PublicKey.from_public_bytes(identity.hpke_public_key)
    sealed = HPKE_SUITE.encrypt(b"a prompt", public, info=b"cube")
    assert identity.hpke_decrypt(sealed, info=b"cube") == b"a prompt"
    other = AgentIdentity.generate()
    with pytest.raises(Exception):
        other.hpke_decrypt(sealed, info=b"cube")


def test_repr_shows_no_key_material(identity: AgentIdentity) -> None:
    text = repr(identity)
    assert "PRIVATE" not in text and identity.cert_sha256.hex() in text


def _serve_once(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener, ctx.wrap_socket(listener, server_side=True) as tls:
            try:
                conn, _ = tls.accept()
            except (ssl.SSLError, OSError):
                return  # a handshake the server refused (the old-TLS test)
            with conn:
                conn.sendall(b"hello")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_ssl_context_serves_the_certificate(identity: AgentIdentity) -> None:
    port, thread = _serve_once(identity.ssl_context())
    client = ssl.create_default_context(cadata=identity.cert_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.getpeercert(binary_form=True) == identity.cert_der
        assert tls.recv(5) == b"hello"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    thread.join(10)


def test_ssl_context_allows_only_tls13_without_resumption(identity: AgentIdentity) -> None:
    ctx = identity.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    port, thread = _serve_once(ctx)
    client = ssl.create_default_context(cadata=identity.cert_pem.decode())
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        client.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(10)
    # TLS 1.3, and no session ticket that could resume a session (see agent.rotation).
    port, thread = _serve_once(ctx)
    client = ssl.create_default_context(cadata=identity.cert_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.recv(5) == b"hello"
        assert tls.session is None or not tls.session.has_ticket
    thread.join(10)


def test_private_key_never_goes_through_a_file(tmp_path: Path) -> None:
    """Audit every open() while the keys are made and loaded: none writes, and the only read
    is the anonymous memory file through /proc/self/fd; no descriptor is left behind."""
    events: list[tuple[str, Any]] = []
    active = threading.Event()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if active.is_set() and event in ("open", "os.rename", "os.link", "shutil.copyfile"):
            events.append((event, args))

    sys.addaudithook(hook)
    fds_before = set(os.listdir("/proc/self/fd"))
    active.set()
    try:
        ctx = AgentIdentity.generate().ssl_context()
    finally:
        active.clear()
    assert isinstance(ctx, ssl.SSLContext)
    opened = [args for event, args in events if event == "open"]
    others = [e for e in events if e[0] != "open"]
    assert not others
    for path, mode, _flags in opened:
        assert str(path).startswith("/proc/self/fd/"), f"opened {path!r}"
        assert mode in (None, "r", "rb"), f"opened {path!r} for {mode!r}"
    # Python's ssl module opens the file inside OpenSSL (no audit event); the memfd must be
    # closed again either way.
    leftover = set(os.listdir("/proc/self/fd")) - fds_before
    for fd in leftover:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        assert "memfd:cube-agent-tls" not in target


def test_claims_name_the_keys_model_and_configuration(identity: AgentIdentity) -> None:
    cfg = config()
    now = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    raw = identity.claims(cfg, now=now)
    claims = Claims.parse(raw)
    assert claims.raw == raw
    assert claims.tls_cert_sha256 == identity.cert_sha256
    assert claims.hpke_public_key == identity.hpke_public_key
    assert claims.model_name == "cube-tiny"
    assert claims.model_digest == DIGEST
    assert claims.config_digest == cfg.digest()
    assert claims.agent_version == AGENT_VERSION
    assert claims.issued_at == now.replace(microsecond=0)
    assert claims.tpm_ak_sha256 is None
    assert b"tpm_ak_sha256" not in raw
    # Canonical bytes: sorted keys, no spaces.
    assert raw.startswith(b'{"agent_version":')
    assert b" " not in raw


def test_claims_carry_the_ak_when_a_vtpm_quotes(identity: AgentIdentity) -> None:
    ak = hashlib.sha256(b"ak public").digest()
    claims = Claims.parse(identity.claims(config(), tpm_ak_sha256=ak))
    assert claims.tpm_ak_sha256 == ak
    with pytest.raises(IdentityError):
        identity.claims(config(), tpm_ak_sha256=b"short")


def test_claims_are_rebuilt_with_the_time_of_each_request(identity: AgentIdentity) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    first = identity.claims(config(), now=t0)
    second = identity.claims(config(), now=t0 + timedelta(seconds=1))
    assert first != second
    assert Claims.parse(second).issued_at - Claims.parse(first).issued_at == timedelta(seconds=1)


def test_claims_follow_the_measured_model_digest(identity: AgentIdentity) -> None:
    other = "sha256:" + "cd" * 32
    assert Claims.parse(identity.claims(config(), model_digest=other)).model_digest == other
    with pytest.raises(IdentityError):
        identity.claims(config(model_digest=None))


def test_hpke_public_key_is_standard_base64_in_the_claims(identity: AgentIdentity) -> None:
    import json

    doc = json.loads(identity.claims(config()))
    assert base64.b64decode(doc["hpke_public_key"], validate=True) == identity.hpke_public_key
