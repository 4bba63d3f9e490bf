"""What the attested transport does with what it cannot trust: answers a relay changed (a sealed
answer relabelled as a plaintext error, retry headers it added), a credential HTTP cannot carry
(refused before anything is sent, never quoted), and large bodies (sealed and opened off the
event loop)."""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Iterator
from typing import Any

import httpcore2
import httpx2
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.errors import MalformedError
from cube_client import AsyncAttestedTransport, attested_http_client, e2e
from cube_client._transport import _Core
from tests.agent.backends import FakeOpenAI
from tests.agent.tokens import TokenIssuer
from tests.client.relay import RecordingRelay
from tests.client.servers import InProcessAgent, sim_policy
from tests.client.test_proxy import MESSAGES, deployed  # noqa: F401 - a fixture
from tests.client.test_transport import attestation_error
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Domain,
    ProxyServer,
    agents,
    directory,
    proxy,
)


def sealed_meta() -> e2e.RequestMeta:
    """The metadata of a request sealed to a fresh key (the request itself is not needed)."""
    key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    _, meta = e2e.seal_request(b"{}", key, method="POST", path="/v1/chat/completions", model=None)
    return meta


def answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> httpcore2.Response:
    return httpcore2.Response(status, headers=headers, content=body)


def header_names(response: httpx2.Response) -> set[str]:
    return {name.lower() for name in response.headers}


# -- a relay changing the answer -------------------------------------------------------------------


def test_a_sealed_answer_relabelled_as_a_plaintext_error_is_refused_not_retried(
    deployed: tuple[ProxyServer, Domain, RecordingRelay],  # noqa: F811
    fake_openai: FakeOpenAI,
) -> None:
    """The relay changes both the status (200 -> 503) and the content type: were it taken for a
    plaintext error, the SDK (default retries) would send it twice more, and the agent infer
    three times."""
    _, domain, relay = deployed
    url = f"{relay.url}/{domain.alias}"
    client = openai.OpenAI(  # the SDK's default max_retries (2)
        base_url=f"{url}/v1",
        api_key=domain.pat,
        http_client=attested_http_client(url, sim_policy()),
    )
    assert client.chat.completions.create(model="cube-tiny", messages=MESSAGES).choices
    before = len(fake_openai.requests_to("/v1/chat/completions"))
    relay.rewrite_to_client = lambda data: data.replace(
        b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 503 Service Unavailable\r\n"
    ).replace(b"application/cube-e2e", b"application/json\r\nX-P: ")
    with pytest.raises(Exception) as info:  # which one: checked below
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    error = attestation_error(info.value)
    assert getattr(error, "code", None) == "e2e_plaintext"
    assert "HTTP 503" in error.message and "changed on the way" in error.message
    assert len(fake_openai.requests_to("/v1/chat/completions")) == before + 1


@pytest.mark.parametrize(
    "body",
    [
        e2e.seal_whole(sealed_meta(), b"{}", "application/json"),
        e2e.stream_record(b"sealed record", "sse"),
        e2e.stream_record(b"sealed record", "ndjson"),
    ],
    ids=["whole", "sse", "ndjson"],
)
def test_a_sealed_body_is_never_taken_for_a_plaintext_error(body: bytes) -> None:
    relabelled = answer(500, [(b"Content-Type", b"text/plain")], body)
    with pytest.raises(e2e.EnvelopeError) as info:
        _Core.whole(relabelled, sealed_meta(), body)
    assert info.value.code == "e2e_plaintext"


def test_a_plaintext_error_to_a_sealed_request_is_not_retried_whatever_its_headers_say() -> None:
    relayed = answer(
        500,
        [
            (b"Content-Type", b"application/json"),
            (b"X-Should-Retry", b"true"),
            (b"Retry-After", b"0"),
            (b"Retry-After-Ms", b"1"),
        ],
        b'{"error": {"message": "agent failed"}}',
    )
    response = _Core.whole(relayed, sealed_meta(), b'{"error": {"message": "agent failed"}}')
    assert response.status_code == 500
    assert response.headers.get_list("x-should-retry") == ["false"]
    assert not header_names(response) & {"retry-after", "retry-after-ms"}


@pytest.mark.parametrize("status", [421, 429, 503])
def test_refusals_before_the_envelope_opens_keep_their_retry_semantics(status: int) -> None:
    """The proxy's rate limit (429) and "no agent available" (503), the agent's full replay
    cache (503): nothing was inferred, so the SDK may retry them, after their Retry-After."""
    refused = answer(
        status,
        [
            (b"Content-Type", b"application/json"),
            (b"Retry-After", b"1"),
            (b"X-Should-Retry", b"true"),
        ],
        b"{}",
    )
    response = _Core.whole(refused, sealed_meta(), b"{}")
    assert response.status_code == status
    assert response.headers.get("retry-after") == "1"
    assert "x-should-retry" not in header_names(response)


def test_retry_headers_on_sealed_answers_are_dropped() -> None:
    meta = sealed_meta()
    body = e2e.seal_whole(meta, b'{"error": "overloaded"}', "application/json", 500)
    retry = [(b"X-Should-Retry", b"true"), (b"Retry-After", b"0"), (b"Retry-After-Ms", b"1")]
    whole = answer(500, [(b"Content-Type", b"application/cube-e2e"), *retry], body)
    opened = _Core.whole(whole, meta, body)
    assert opened.content == b'{"error": "overloaded"}'
    assert not header_names(opened) & {"x-should-retry", "retry-after", "retry-after-ms"}
    streamed = answer(200, [(b"Content-Type", b"text/event-stream"), *retry], b"")
    kept = {k.decode().lower() for k, _ in _Core.stream_headers(streamed)}
    assert kept == {"content-type"}


# -- credentials HTTP cannot carry ---------------------------------------------------------------


def test_an_api_key_with_a_newline_is_refused_before_sending_and_never_quoted(
    agent: InProcessAgent, fake_openai: FakeOpenAI
) -> None:
    secret = "SECRET-KEY-abc123"
    client = openai.OpenAI(
        base_url=f"{agent.url}/v1",
        api_key=secret + "\n",  # read from a file, newline and all
        http_client=attested_http_client(agent.url, sim_policy()),
        max_retries=0,
    )
    with pytest.raises(Exception) as info:  # which one: checked below
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    error = attestation_error(info.value)
    assert isinstance(error, MalformedError) and error.check == "transport.credential"
    assert "newline" in error.message
    assert secret not in "".join(traceback.format_exception(info.value))
    assert fake_openai.requests_to("/v1/chat/completions") == []


def test_an_invalid_header_fails_without_its_value_in_the_error_chain(
    agent: InProcessAgent, issuer: TokenIssuer
) -> None:
    secret = "SECRET-HEADER-VALUE-9f1e"
    client = openai.OpenAI(
        base_url=f"{agent.url}/v1",
        api_key=issuer.token(),
        default_headers={"X-Upstream-Token": secret + "\n"},
        http_client=attested_http_client(agent.url, sim_policy()),
        max_retries=0,
    )
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert isinstance(info.value.__cause__, httpx2.LocalProtocolError)
    assert secret not in "".join(traceback.format_exception(info.value))


# -- large bodies off the event loop ---------------------------------------------------------------


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _SealedAnswerPool:
    """Stands in for the connection pool: answers every request with a sealed-type body of
    ``size`` bytes (its opening is stubbed: only where it runs is measured)."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        del request
        headers = [(b"Content-Type", e2e.CONTENT_TYPE.encode())]
        return httpcore2.Response(200, headers=headers, content=b"x" * self.size)

    async def aclose(self) -> None:
        pass


@pytest.fixture
def where_crypto_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """Records, for sealing the request and opening the answer, whether it ran on the loop."""
    seen: dict[str, bool] = {}
    seal = e2e.seal_request

    def recording_seal(*args: Any, **kwargs: Any) -> tuple[bytes, e2e.RequestMeta]:
        seen["seal"] = on_event_loop()
        return seal(*args, **kwargs)

    def recording_open(*args: Any, **kwargs: Any) -> tuple[bytes, str]:
        seen["open"] = on_event_loop()
        return b"{}", "application/json"

    monkeypatch.setattr(e2e, "seal_request", recording_seal)
    monkeypatch.setattr(e2e, "open_whole", recording_open)
    yield seen


@pytest.mark.parametrize(("size", "on_loop"), [(300 * 1024, False), (1024, True)])
def test_large_bodies_are_sealed_and_opened_off_the_event_loop(
    agent: InProcessAgent, where_crypto_runs: dict[str, bool], size: int, on_loop: bool
) -> None:
    async def exchange() -> None:
        transport = AsyncAttestedTransport(agent.url, sim_policy())
        await transport.verify()
        transport._pool = _SealedAnswerPool(size)  # type: ignore[assignment]
        body = json.dumps({"model": "cube-tiny", "input": "x" * size}).encode()
        request = httpx2.Request("POST", f"{agent.url}/v1/embeddings", content=body)
        response = await transport.handle_async_request(request)
        assert response.status_code == 200
        await transport.aclose()

    asyncio.run(exchange())
    assert where_crypto_runs == {"seal": on_loop, "open": on_loop}
