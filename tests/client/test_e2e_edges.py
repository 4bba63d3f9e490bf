# ruff: noqa: F811 - the harness fixtures imported below are parameters
"""Edges of ``cube-e2e/1`` a review found: an ``issued_at`` no clock arithmetic can hold, a forged
plaintext 421 that made the transport send a request twice, a query string that was neither
sealed nor refused, a sealed NDJSON line that is not ASCII, and Ollama's ``/api/show`` naming its
model in ``name``. Each is refused with an e2e error (or, the last, works), never a traceback or
a second inference."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

import httpcore2
import httpx2
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from agent.e2e import ReplayCache
from attestation.errors import AttestationError
from cube_client import (
    AsyncAttestedTransport,
    AttestedTransport,
    PlaintextRefusedError,
    attested_http_client,
    e2e,
)
from cube_client._transport import _DecryptedStream
from cube_client.e2e import EnvelopeError
from tests.agent.backends import FakeOpenAI
from tests.agent.tokens import TokenIssuer
from tests.client.relay import RecordingRelay
from tests.client.servers import InProcessAgent, sim_policy
from tests.client.test_agent_e2e import (
    CHAT,
    body,
    expect_refusal,
    headers,
    hpke_key,
    post,
    sealed,
)
from tests.client.test_proxy import MESSAGES, client_for, deployed  # noqa: F401 - a fixture
from tests.client.test_transport import attestation_error, requests_seen
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    Domain,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    ollama,
    ollama_domain,
    proxy,
)

# -- issued_at out of range ------------------------------------------------------------------------


def seal_with_meta(public_key: bytes, meta: dict[str, Any], plain: bytes) -> bytes:
    """A request envelope with metadata of our choosing (HPKE Base: anyone can seal to a key)."""
    recipient = e2e.key_id(public_key)
    encoded = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    sealed_body = e2e.HPKE_SUITE.encrypt(
        struct.pack(">I", len(encoded)) + encoded + plain,
        x25519.X25519PublicKey.from_public_bytes(public_key),
        info=b"cube-e2e/1 request\x00" + recipient,
    )
    return e2e.MAGIC + b"\x01" + recipient + sealed_body


def meta_json(issued_at: int, path: str = CHAT) -> dict[str, Any]:
    return {
        "request_id": "00" * 16,
        "issued_at": issued_at,
        "method": "POST",
        "path": path,
        "model": "cube-tiny",
        "response_key": "A" * 43 + "=",
    }


OUT_OF_RANGE = [
    pytest.param(-1, id="-1"),
    pytest.param(2**40, id="2**40"),
    pytest.param(10**400, id="10**400"),
    pytest.param(-(10**400), id="-10**400"),
]


@pytest.mark.parametrize("issued_at", [*OUT_OF_RANGE, 0, pytest.param(2**40 - 1, id="2**40-1")])
def test_issued_at_must_be_within_0_and_2_to_the_40(issued_at: int) -> None:
    private = x25519.X25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    envelope = seal_with_meta(public, meta_json(issued_at), b"{}")

    def open_it() -> e2e.OpenedRequest:
        return e2e.open_request(
            envelope,
            recipient_key_id=e2e.key_id(public),
            decrypt=lambda ct, info: e2e.HPKE_SUITE.decrypt(ct, private, info=info),
        )

    if 0 <= issued_at < 2**40:  # the bounds themselves
        assert open_it().meta.issued_at == issued_at
        return
    with pytest.raises(EnvelopeError) as info:
        open_it()
    assert info.value.code == "e2e_malformed"


@pytest.mark.parametrize("issued_at", OUT_OF_RANGE)
def test_the_replay_window_arithmetic_cannot_overflow(issued_at: int) -> None:
    # Even without RequestMeta's bounds: no float conversion of issued_at (it overflowed).
    with pytest.raises(EnvelopeError) as info:
        ReplayCache().admit(b"e" * 32, issued_at)
    assert info.value.code == "e2e_stale"


@pytest.mark.parametrize("issued_at", OUT_OF_RANGE)
def test_an_absurd_issued_at_is_a_400_not_a_500(
    agent: InProcessAgent,
    issuer: TokenIssuer,
    fake_openai: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    issued_at: int,
) -> None:
    caplog.set_level(logging.ERROR)
    envelope = seal_with_meta(hpke_key(agent), meta_json(issued_at), body())
    reply = post(agent, envelope, headers(issuer))
    expect_refusal(agent, fake_openai, reply, 400, "e2e_malformed")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- a forged plaintext 421 ------------------------------------------------------------------------

FORGED_421 = json.dumps(
    {"error": {"message": "x", "type": "x", "code": "e2e_wrong_recipient"}}
).encode()


def test_a_forged_421_after_the_agent_answered_is_not_sent_again(
    deployed: tuple[ProxyServer, Domain, RecordingRelay], fake_openai: FakeOpenAI
) -> None:
    """The relay lets the agent infer, then swaps its sealed answer for a plaintext 421: the
    client verifies again, finds the key it sealed to, and returns the 421 (with max_retries=0,
    one inference, as the docs promise), instead of sending the request a second time."""
    _, domain, relay = deployed
    client = client_for(relay, domain, sim_policy())  # max_retries=0
    forged = {"n": 0}

    def rewrite(data: bytes) -> bytes:
        if forged["n"] == 0 and data.startswith(b"HTTP/1.1 200") and b"cube-e2e" in data:
            forged["n"] += 1
            return (
                b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: "
                + str(len(FORGED_421)).encode()
                + b"\r\n\r\n"
                + FORGED_421
            )
        return data

    relay.rewrite_to_client = rewrite
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert info.value.status_code == 421
    assert forged["n"] == 1
    assert len(fake_openai.requests_to(CHAT)) == 1  # one inference
    posts = [x for x in requests_seen(relay) if x.startswith(b"POST")]
    assert len(posts) == 1
    assert len([x for x in requests_seen(relay) if x.startswith(b"GET")]) == 2  # verified again


class _Misdirected:
    """Stands in for the connection pool: answers every request with a plaintext 421
    ``e2e_wrong_recipient``, counting them."""

    def __init__(self) -> None:
        self.sent = 0

    def _answer(self) -> httpcore2.Response:
        self.sent += 1
        headers = [(b"Content-Type", b"application/json")]
        return httpcore2.Response(421, headers=headers, content=FORGED_421)

    def handle_request(self, request: httpcore2.Request) -> httpcore2.Response:
        del request
        return self._answer()

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        del request
        return self._answer()

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_a_421_from_the_verified_key_is_returned_sync(agent: InProcessAgent) -> None:
    transport = AttestedTransport(agent.url, sim_policy())
    first = transport.verify()
    pool = _Misdirected()
    transport._pool = pool  # type: ignore[assignment]
    request = httpx2.Request("POST", f"{agent.url}{CHAT}", content=body())
    response = transport.handle_request(request)
    assert response.status_code == 421
    assert pool.sent == 1  # verified again (same key, same agent): not sent a second time
    assert transport.attested is not first
    transport.close()


def test_a_421_from_the_verified_key_is_returned_async(agent: InProcessAgent) -> None:
    async def exchange() -> int:
        transport = AsyncAttestedTransport(agent.url, sim_policy())
        first = await transport.verify()
        pool = _Misdirected()
        transport._pool = pool  # type: ignore[assignment]
        request = httpx2.Request("POST", f"{agent.url}{CHAT}", content=body())
        response = await transport.handle_async_request(request)
        assert response.status_code == 421
        assert transport.attested is not first
        await transport.aclose()
        return pool.sent

    assert asyncio.run(exchange()) == 1


def test_a_421_is_sent_again_only_to_another_key_or_agent(agent: InProcessAgent) -> None:
    from dataclasses import replace

    from cube_client._transport import _Core

    attested = AttestedTransport(agent.url, sim_policy()).verify()
    assert not _Core.resend_helps(attested, attested)
    assert _Core.resend_helps(attested, replace(attested, hpke_public_key=b"k" * 32))
    assert _Core.resend_helps(attested, replace(attested, agent_id="another-agent"))


# -- query strings ---------------------------------------------------------------------------------


def test_a_sealed_request_with_a_query_string_is_refused_by_the_agent(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    """The query is not sealed: a relay that appends one must not get it to the backend."""
    envelope, _ = sealed(agent, body())
    reply = post(agent, envelope, headers(issuer), path=CHAT + "?injected=by-relay")
    expect_refusal(agent, fake_openai, reply, 400, "e2e_wrong_target")


def test_the_client_refuses_to_seal_a_request_with_a_query_string(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    client = openai.OpenAI(
        base_url=f"{agent.url}/v1",
        api_key=issuer.token(),
        http_client=attested_http_client(agent.url, sim_policy()),
        max_retries=0,
    )
    with pytest.raises(Exception) as info:  # which one: checked below
        client.chat.completions.create(
            model="cube-tiny", messages=MESSAGES, extra_query={"api-version": "1"}
        )
    error = attestation_error(info.value)
    assert isinstance(error, PlaintextRefusedError)
    assert error.check == "transport.query" and "query string" in error.message
    assert not fake_openai.requests_to(CHAT)
    # Without one, the same client goes on.
    assert client.chat.completions.create(model="cube-tiny", messages=MESSAGES).choices


# -- a sealed NDJSON line that is not ASCII --------------------------------------------------------

SURROGATE_LINE = b'{"cube-e2e":"\\ud800"}\n'


def stream_meta() -> e2e.RequestMeta:
    key = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    _, meta = e2e.seal_request(b"{}", key, method="POST", path="/api/chat", model="m")
    return meta


def test_a_sealed_ndjson_line_with_a_lone_surrogate_is_malformed() -> None:
    with pytest.raises(EnvelopeError) as info:
        e2e.StreamDecoder(stream_meta(), "ndjson").feed(SURROGATE_LINE)
    assert info.value.code == "e2e_malformed"


def test_the_transport_stream_raises_an_attestation_error_for_it() -> None:
    decoder = e2e.StreamDecoder(stream_meta(), "ndjson")
    response = httpx2.Response(
        200,
        headers={"content-type": "application/x-ndjson"},
        stream=_DecryptedStream([SURROGATE_LINE], decoder),
    )
    with pytest.raises(AttestationError):
        list(response.iter_lines())


# -- Ollama's "name" -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "path", "expected"),
    [
        ({"model": "a", "name": "b"}, "/api/show", "a"),
        ({"name": "b"}, "/api/show", "b"),
        ({"model": None, "name": "b"}, "/api/pull", "b"),
        ({"name": "b"}, "/v1/chat/completions", None),  # only Ollama's routes
        ({"model": 5, "name": "b"}, "/api/show", None),  # the agent refuses a non-string model
        ({"name": 5}, "/api/show", None),
        ([], "/api/show", None),
    ],
)
def test_body_model(payload: Any, path: str, expected: str | None) -> None:
    assert e2e.body_model(json.dumps(payload).encode(), path) == expected


def test_a_sealed_api_show_naming_its_model_in_name_passes_the_proxy(
    directory: Any, agents: Agents, ollama: Any, proxy: ProxyFactory
) -> None:
    server = proxy()
    domain = ollama_domain(directory, agents, ollama)
    relay = RecordingRelay("127.0.0.1", server.port).start()
    try:
        url = f"{relay.url}/{domain.alias}"
        client = attested_http_client(url, sim_policy())
        auth = {"Authorization": f"Bearer {domain.pat}"}
        by_name = client.post(f"{url}/api/show", json={"name": "llama3.2"}, headers=auth)
        assert by_name.status_code == 200, by_name.text
        by_model = client.post(f"{url}/api/show", json={"model": "llama3.2"}, headers=auth)
        assert by_model.status_code == 200, by_model.text
        assert by_name.json() == by_model.json()
        sent = bytes(relay.to_upstream)
        assert sent.count(b"Cube-E2E-Model: llama3.2") == 2
    finally:
        relay.stop()
