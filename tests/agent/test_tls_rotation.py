"""The agent replaces its TLS key and certificate every ``tls_rotate_seconds`` (agent.tls): new
connections get the new certificate, a connection keeps the one it was handshaken with, and
evidence names the certificate of the connection that asked for it, even across a rotation.
The HPKE key stays."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

import pytest

from agent.server import StartupError
from agent.tls import validity_for
from attestation.errors import BindingError
from tests.agent.conftest import RecordingBackend, RunningAgent, StartAgent
from tests.agent.test_server import ALLOW_SIMULATED, AttestingClient


def _peer_sha256(client: AttestingClient) -> bytes:
    assert client.conn.sock is not None
    der = client.conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).digest()


def _connected(agent: RunningAgent) -> AttestingClient:
    client = AttestingClient(agent.host, agent.port)
    client.conn.connect()
    return client


def test_a_rotation_moves_new_connections_to_a_new_certificate(
    start_agent: StartAgent, backend: RecordingBackend
) -> None:
    agent = start_agent({"backend_url": backend.url})
    first = agent.server.tls.current
    before = _connected(agent)
    try:
        assert _peer_sha256(before) == first.cert_sha256
        rotated = agent.call(agent.server.tls.rotate())
        assert rotated.cert_sha256 != first.cert_sha256
        assert rotated.hpke_public_key == first.hpke_public_key
        # The certificate is valid for two intervals from now (and backdated a little).
        lifetime = rotated.not_valid_after - rotated.certificate.not_valid_before_utc
        assert lifetime == validity_for(agent.config.tls_rotate_seconds) + timedelta(minutes=5)

        after = _connected(agent)
        try:
            assert _peer_sha256(after) == rotated.cert_sha256
            # Evidence names the certificate of the connection that asks: the new one here...
            assert after.attest(ALLOW_SIMULATED).claims.tls_cert_sha256 == rotated.cert_sha256
        finally:
            after.close()
        # ...and the old one on the connection made before the rotation, which keeps it: a
        # verifier's check (this connection's certificate = the claims') still holds there.
        verified = before.attest(ALLOW_SIMULATED)
        assert verified.claims.tls_cert_sha256 == first.cert_sha256
        assert verified.claims.hpke_public_key == first.hpke_public_key
        status, _ = before.chat(agent.token())
        assert status == 200
    finally:
        before.close()


def test_evidence_from_a_connection_with_the_other_certificate_does_not_bind(
    start_agent: StartAgent,
) -> None:
    """What the per-connection claims prevent: had the agent named its *current* certificate,
    a connection made before the rotation would get claims that do not match it."""
    agent = start_agent()
    before = _connected(agent)
    try:
        agent.call(agent.server.tls.rotate())
        with pytest.raises(BindingError):
            before.attest(ALLOW_SIMULATED, source=(agent.host, agent.port))  # a new connection
    finally:
        before.close()


def test_the_key_rotates_on_its_interval(start_agent: StartAgent) -> None:
    agent = start_agent({"tls_rotate_seconds": 1.0})
    first = agent.server.tls.current.cert_sha256
    deadline = time.monotonic() + 20
    while agent.server.tls.rotations < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.server.tls.rotations >= 2
    client = _connected(agent)
    try:
        assert _peer_sha256(client) != first
        assert client.attest(ALLOW_SIMULATED).claims.tls_cert_sha256 == _peer_sha256(client)
    finally:
        client.close()
    # /ready's trial collections name the current certificate too.
    assert agent.prepared.evidence.identity is agent.server.tls.current


@pytest.mark.parametrize("seconds", [0.0, 0.5, 91 * 86400.0])
def test_the_rotation_interval_is_bounded(start_agent: StartAgent, seconds: float) -> None:
    with pytest.raises(StartupError, match="tls_rotate_seconds"):
        start_agent({"tls_rotate_seconds": seconds})
