"""The client's check of the HPKE key an agent's claims name: genuine evidence (right nonce,
right certificate) whose key is not a 32-byte X25519 key is malformed, refused with a
MalformedError naming the check, never accepted to fail later when bodies are sealed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from aiohttp import web

from attestation.errors import MalformedError
from attestation.evidence import parse_nonce
from attestation.policy import Policy
from cube_client import verify_endpoint
from tests.agent.backends import BackgroundLoop
from tests.proxy.stubs import StubAgent

POLICY = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})


@dataclass
class KeyedStub(StubAgent):
    """Genuine simulated evidence naming this server's certificate and ``hpke_key``."""

    hpke_key: bytes | None = None

    async def _attestation(self, request: web.Request) -> web.Response:
        self.evidence_requests += 1
        nonce = parse_nonce(request.query["nonce"])
        claims = self.identity.claims(
            self.config, hpke_public_key=self.hpke_key, now=datetime.now(UTC)
        )
        document = await self.collector.acollect(nonce, claims)
        return web.Response(body=document, content_type="application/json")


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    yield background
    background.close()


def _serving(loop: BackgroundLoop, key: bytes | None) -> KeyedStub:
    stub = KeyedStub(loop, hpke_key=key)
    stub.start()
    return stub


def test_a_32_byte_key_is_accepted(loop: BackgroundLoop) -> None:
    stub = _serving(loop, None)  # the identity's own X25519 key
    try:
        attested = verify_endpoint(stub.url, POLICY)
        assert attested.hpke_public_key == stub.identity.hpke_public_key
        assert len(attested.hpke_public_key) == 32
    finally:
        stub.stop()


@pytest.mark.parametrize("length", [31, 33, 64])
def test_a_key_of_another_length_is_malformed(loop: BackgroundLoop, length: int) -> None:
    stub = _serving(loop, b"\x07" * length)
    try:
        with pytest.raises(MalformedError) as refused:
            verify_endpoint(stub.url, POLICY)
        assert refused.value.exit_code == 3
        assert refused.value.check == "claims.hpke_public_key"
        assert "32-byte X25519 HPKE key" in refused.value.message
        assert stub.evidence_requests == 1
    finally:
        stub.stop()
