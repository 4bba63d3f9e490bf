"""The agent replaces its TLS and HPKE keys every ``key_rotate_seconds`` (agent.rotation): new
connections get the new certificate, a connection keeps the one it was handshaken with, and
evidence names the certificate of the connection that asked for it, even across a rotation,
and always the current HPKE key. A request sealed to the key before the current one still
opens; an older one is refused with 421 (the client verifies again). Every test runs on asyncio's
loop (``cube-agent``'s default) and on uvloop (``--event-loop uvloop``)."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from agent.rotation import validity_for
from agent.server import StartupError
from attestation.errors import BindingError
from cube_client import e2e
from tests.agent.conftest import RecordingBackend, RunningAgent, StartAgent
from tests.agent.test_server import ALLOW_SIMULATED, AttestingClient


@pytest.fixture(params=["asyncio", "uvloop"])
def start_agent(request: pytest.FixtureRequest, start_agent: StartAgent) -> StartAgent:
    """Each test on both event loops: the per-connection identity relies on the loop's TLS
    calling the context's ``sni_callback`` (uvloop's own TLS code, and asyncio's)."""

    def start(config_overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> RunningAgent:
        overrides = {"event_loop": request.param, **dict(config_overrides or {})}
        return start_agent(overrides, **kwargs)

    return start


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
    first = agent.server.rotation.current
    before = _connected(agent)
    try:
        assert _peer_sha256(before) == first.cert_sha256
        rotated = agent.call(agent.server.rotation.rotate())
        assert rotated.cert_sha256 != first.cert_sha256
        assert rotated.hpke_public_key != first.hpke_public_key
        # The certificate is valid for two intervals from now (and backdated a little).
        lifetime = rotated.not_valid_after - rotated.certificate.not_valid_before_utc
        assert lifetime == validity_for(agent.config.key_rotate_seconds) + timedelta(minutes=5)

        after = _connected(agent)
        try:
            assert _peer_sha256(after) == rotated.cert_sha256
            # Evidence names the certificate of the connection that asks: the new one here...
            assert after.attest(ALLOW_SIMULATED).claims.tls_cert_sha256 == rotated.cert_sha256
        finally:
            after.close()
        # ...and the old one on the connection made before the rotation, which keeps it: a
        # verifier's check (this connection's certificate = the claims') still holds there.
        # The HPKE key named is the current one on either connection.
        verified = before.attest(ALLOW_SIMULATED)
        assert verified.claims.tls_cert_sha256 == first.cert_sha256
        assert verified.claims.hpke_public_key == rotated.hpke_public_key
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
        agent.call(agent.server.rotation.rotate())
        with pytest.raises(BindingError):
            before.attest(ALLOW_SIMULATED, source=(agent.host, agent.port))  # a new connection
    finally:
        before.close()


def test_the_key_rotates_on_its_interval(start_agent: StartAgent) -> None:
    agent = start_agent({"key_rotate_seconds": 1.0})
    first = agent.server.rotation.current.cert_sha256
    deadline = time.monotonic() + 20
    while agent.server.rotation.rotations < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.server.rotation.rotations >= 2
    client = _connected(agent)
    try:
        assert _peer_sha256(client) != first
        assert client.attest(ALLOW_SIMULATED).claims.tls_cert_sha256 == _peer_sha256(client)
    finally:
        client.close()
    # /ready's trial collections name the current certificate too.
    assert agent.prepared.evidence.identity is agent.server.rotation.current


@pytest.mark.parametrize("seconds", [0.0, 0.5, 91 * 86400.0])
def test_the_rotation_interval_is_bounded(start_agent: StartAgent, seconds: float) -> None:
    with pytest.raises(StartupError, match="key_rotate_seconds"):
        start_agent({"key_rotate_seconds": seconds})


def _sealed_chat(agent: RunningAgent, recipient: bytes) -> tuple[int, str]:
    """A chat sealed to ``recipient``: the status and, refused, the error code."""
    body = json.dumps({"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}]})
    envelope, meta = e2e.seal_request(
        body.encode(), recipient, method="POST", path="/v1/chat/completions", model="cube-tiny"
    )
    reply = agent.request(
        "POST",
        "/v1/chat/completions",
        body=envelope,
        headers={"Content-Type": e2e.CONTENT_TYPE, e2e.MODEL_HEADER: "cube-tiny"},
        token=agent.token(),
    )
    if reply.status != 200:
        return reply.status, json.loads(reply.body)["error"]["code"]
    plain, _ = e2e.open_whole(meta, reply.body)
    assert json.loads(plain)["choices"]
    return reply.status, ""


def test_a_request_sealed_to_the_previous_hpke_key_still_opens(
    start_agent: StartAgent, backend: RecordingBackend
) -> None:
    agent = start_agent({"backend_url": backend.url})
    first = agent.server.rotation.current.hpke_public_key
    assert _sealed_chat(agent, first) == (200, "")
    second = agent.call(agent.server.rotation.rotate()).hpke_public_key
    assert _sealed_chat(agent, first) == (200, "")  # sealed just before the rotation
    assert _sealed_chat(agent, second) == (200, "")
    agent.call(agent.server.rotation.rotate())
    # Two rotations later the first key is gone: nothing sealed to it opens any more.
    assert _sealed_chat(agent, first) == (421, "e2e_wrong_recipient")
    assert _sealed_chat(agent, second) == (200, "")
    assert len(backend.requests) == 4


def test_no_session_resumes_across_a_rotation(start_agent: StartAgent) -> None:
    """A resumed session would show the client its first handshake's certificate while this
    connection's evidence names the current one; the agent offers no resumption at all."""
    agent = start_agent()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def connect(session: ssl.SSLSession | None = None) -> tuple[bytes, ssl.SSLSession | None, bool]:
        with (
            socket.create_connection((agent.host, agent.port), timeout=10) as raw,
            context.wrap_socket(raw, session=session) as tls,
        ):
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            while tls.recv(4096):
                pass
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).digest(), tls.session, tls.session_reused

    first, session, _ = connect()
    assert first == agent.server.rotation.current.cert_sha256
    rotated = agent.call(agent.server.rotation.rotate())
    presented, _, reused = connect(session)
    assert not reused and presented == rotated.cert_sha256
