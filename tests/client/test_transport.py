"""The attested transport with the ``openai`` SDK, directly against an agent (in process, simulated
SEV-SNP, fake backend), behind a TLS-terminating relay that records every byte the agent (or an
interceptor in its place) receives.

Proved here: with encryption on, neither prompt nor answer crosses the wire in plaintext; when
verification fails (policy mismatch, simulated evidence without allow_simulated, a certificate
that is not the attested one, before or after a first verification) nothing but the evidence
request leaves the process; a restarted agent (new certificate, new keys) is verified again and
used; evidence is verified again at its maximum age.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest

from agent.identity import AgentIdentity
from attestation._checks import Checks
from attestation.errors import (
    AttestationError,
    BindingError,
    PolicyError,
    SimulatedEvidenceError,
    ValidityError,
)
from attestation.policy import Policy
from cube_client import (
    AttestedClient,
    PlaintextRefusedError,
    attested_async_http_client,
    attested_http_client,
    verify_endpoint,
)
from tests.agent.backends import FakeOpenAI
from tests.agent.conftest import ModelDir
from tests.agent.tokens import TokenIssuer
from tests.client.conftest import PROMPT, RESPONSE
from tests.client.relay import RecordingRelay
from tests.client.servers import InProcessAgent, sim_policy, start_plain_agent

MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]
Windowed = tuple[InProcessAgent, RecordingRelay]


def sdk(url: str, issuer: TokenIssuer, policy: Policy, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=issuer.token(),
        http_client=attested_http_client(url, policy, **kw),
        max_retries=0,
    )


def chat(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    return reply.choices[0].message.content or ""


def stream(client: openai.OpenAI) -> str:
    chunks = client.chat.completions.create(model="cube-tiny", messages=MESSAGES, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def attestation_error(exc: BaseException) -> AttestationError:
    """The AttestationError behind what the SDK raised (itself, or its cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AttestationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"not an attestation failure: {exc!r}")


def requests_seen(relay: RecordingRelay) -> list[bytes]:
    """The request lines the agent side received."""
    return [
        m.group(0)[:-2]
        for m in re.finditer(rb"(GET|POST|PUT|DELETE) /\S* HTTP/1\.1\r\n", relay.to_upstream)
    ]


def assert_only_evidence_requests(relay: RecordingRelay) -> None:
    lines = requests_seen(relay)
    assert lines, "the evidence request itself should have been seen"
    assert all(line.startswith(b"GET /attestation?nonce=") for line in lines), lines
    assert PROMPT.encode() not in relay.to_upstream
    assert b"cube-tiny" not in relay.to_upstream  # not even the model name


# -- happy paths ----------------------------------------------------------------------------------


def test_sdk_chats_with_encryption_and_nothing_readable_crosses(
    windowed_agent: Windowed, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    _, relay = windowed_agent
    client = sdk(relay.url, issuer, sim_policy())
    assert chat(client) == RESPONSE
    assert stream(client) == RESPONSE
    # What the agent received was sealed; what it sent back too.
    assert PROMPT.encode() not in relay.to_upstream
    assert b"SECRET" not in relay.to_client
    assert b"application/cube-e2e" in relay.to_upstream
    posts = [line for line in requests_seen(relay) if line.startswith(b"POST")]
    assert posts == [b"POST /v1/chat/completions HTTP/1.1"] * 2
    # One verification served both requests; the backend got the plaintext.
    assert len([x for x in requests_seen(relay) if x.startswith(b"GET /attestation")]) == 1
    assert fake_openai.requests_to("/v1/chat/completions")[-1].json()["messages"] == MESSAGES


def test_the_relay_would_have_seen_plaintext(windowed_agent: Windowed, issuer: TokenIssuer) -> None:
    # Control: the same exchange without encryption is readable where the relay sits, so the
    # assertions above can fail.
    _, relay = windowed_agent
    client = sdk(relay.url, issuer, sim_policy(), encrypt=False)
    assert chat(client) == RESPONSE
    assert PROMPT.encode() in relay.to_upstream
    assert b"SECRET" in relay.to_client


def test_async_sdk_chats_with_encryption(windowed_agent: Windowed, issuer: TokenIssuer) -> None:
    _, relay = windowed_agent

    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(
            base_url=f"{relay.url}/v1",
            api_key=issuer.token(),
            http_client=attested_async_http_client(relay.url, sim_policy()),
            max_retries=0,
        )
        async with client:
            reply = await client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
            chunks = await client.chat.completions.create(
                model="cube-tiny", messages=MESSAGES, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            return reply.choices[0].message.content or "", text

    assert asyncio.run(main()) == (RESPONSE, RESPONSE)
    assert PROMPT.encode() not in relay.to_upstream
    assert b"SECRET" not in relay.to_client


def test_verify_endpoint_reports_the_binding(windowed_agent: Windowed) -> None:
    agent, relay = windowed_agent
    attested = verify_endpoint(relay.url, sim_policy())
    identity = agent.server.prepared.identity
    assert attested.tls_bound
    assert attested.cert_sha256 == identity.cert_sha256
    assert attested.hpke_public_key == identity.hpke_public_key
    assert attested.evidence.platform == "sim-sev-snp"
    names = [c.name for c in attested.checks]
    assert names[0] == "evidence.fetch"
    assert {"tls.connection", "evidence.nonce", "tls.certificate", "claims.hpke_public_key"} <= set(
        names
    )
    assert all(c.passed for c in attested.checks)
    assert attested.expires_at - attested.verified_at == timedelta(seconds=300)


# -- refusals: not a byte of the request leaves ---------------------------------------------------


def refused(client: openai.OpenAI, call: Callable[[openai.OpenAI], str]) -> AttestationError:
    with pytest.raises(Exception) as info:
        call(client)
    return attestation_error(info.value)


@pytest.mark.parametrize("call", [chat, stream])
def test_policy_mismatch_sends_nothing(
    windowed_agent: Windowed, issuer: TokenIssuer, call: Callable[[openai.OpenAI], str]
) -> None:
    _, relay = windowed_agent
    policy = sim_policy(model_digests=["sha256:" + "00" * 32])
    error = refused(sdk(relay.url, issuer, policy), call)
    assert isinstance(error, PolicyError) and error.check == "policy.model_digest"
    assert_only_evidence_requests(relay)


def test_simulated_evidence_without_allow_simulated_sends_nothing(
    windowed_agent: Windowed, issuer: TokenIssuer
) -> None:
    _, relay = windowed_agent
    error = refused(sdk(relay.url, issuer, Policy()), chat)
    assert isinstance(error, SimulatedEvidenceError)
    assert_only_evidence_requests(relay)


def test_an_interceptor_with_its_own_certificate_gets_nothing(
    model: ModelDir, tmp_path: Any, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    # A TLS terminator in front of a genuine agent: it relays the genuine evidence, but the
    # certificate the client sees is its own, which the evidence does not name.
    agent = start_plain_agent(model, tmp_path, issuer, fake_openai.url)
    interceptor = AgentIdentity.generate()
    relay = RecordingRelay("127.0.0.1", agent.port, server_ssl=interceptor.ssl_context()).start()
    try:
        error = refused(sdk(relay.url, issuer, sim_policy()), chat)
        assert isinstance(error, BindingError) and error.check == "tls.certificate"
        assert_only_evidence_requests(relay)
        assert not fake_openai.requests_to("/v1/chat/completions")
    finally:
        relay.stop()
        agent.stop()


def test_a_certificate_swapped_after_verification_gets_nothing(
    windowed_agent: Windowed, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    _, relay = windowed_agent
    client = sdk(relay.url, issuer, sim_policy())
    assert chat(client) == RESPONSE
    # Now an interceptor takes the address (same port, its own certificate).
    relay.restart(AgentIdentity.generate().ssl_context())
    relay.clear()
    fake_openai.received.clear()
    error = refused(client, chat)
    assert isinstance(error, BindingError) and error.check == "tls.certificate"
    # The pinned connection was refused before the request; the re-verification saw the
    # mismatch; nothing else was sent.
    assert_only_evidence_requests(relay)
    assert not fake_openai.received


def test_a_restarted_agent_is_verified_again_and_used(
    windowed_agent: Windowed,
    model: ModelDir,
    tmp_path: Any,
    issuer: TokenIssuer,
    fake_openai: FakeOpenAI,
) -> None:
    first, relay = windowed_agent
    client = sdk(relay.url, issuer, sim_policy())
    assert chat(client) == RESPONSE
    http = client._client
    assert isinstance(http, AttestedClient)
    before = http.attested
    assert before is not None
    # The agent restarts with new keys (new certificate, new HPKE key) at the same address.
    (tmp_path / "second").mkdir()
    second = start_plain_agent(model, tmp_path / "second", issuer, fake_openai.url)
    try:
        relay.upstream = ("127.0.0.1", second.port)
        relay.restart(second.tls_context())
        relay.clear()
        assert stream(client) == RESPONSE
        after = http.attested
        assert after is not None
        assert after.cert_sha256 != before.cert_sha256
        assert after.hpke_public_key != before.hpke_public_key
        lines = requests_seen(relay)
        assert lines[0].startswith(b"GET /attestation?nonce=")
        assert lines[1:] == [b"POST /v1/chat/completions HTTP/1.1"]
    finally:
        second.stop()
    del first


def test_evidence_is_verified_again_at_its_maximum_age(
    windowed_agent: Windowed, issuer: TokenIssuer
) -> None:
    _, relay = windowed_agent
    # The client's clock, moved by the test (the agent's is not: fresh evidence must still
    # verify, so the first verification runs 50 s "early", within the allowed clock skew).
    offset = timedelta(seconds=-50)

    def now() -> datetime:
        return datetime.now(UTC) + offset

    client = sdk(relay.url, issuer, sim_policy(max_evidence_age_seconds=60), now=now)

    def verifications() -> int:
        return len([x for x in requests_seen(relay) if x.startswith(b"GET /attestation")])

    assert chat(client) == RESPONSE
    assert chat(client) == RESPONSE
    assert verifications() == 1
    offset = timedelta(seconds=15)  # 65 s after the first verification: past the maximum age
    assert chat(client) == RESPONSE
    assert verifications() == 2
    assert chat(client) == RESPONSE
    assert verifications() == 2


def test_requests_elsewhere_are_refused(windowed_agent: Windowed, issuer: TokenIssuer) -> None:
    _, relay = windowed_agent
    http = attested_http_client(relay.url, sim_policy())
    with pytest.raises(PlaintextRefusedError):
        http.post("https://127.0.0.1:1/v1/chat/completions", content=json.dumps({}).encode())
    assert not requests_seen(relay)


# -- Ollama's native API (NDJSON streams) ---------------------------------------------------------


def test_ollama_chat_is_sealed_too(model: ModelDir, tmp_path: Any, issuer: TokenIssuer) -> None:
    from tests.agent.backends import OllamaStandIn, serving

    ollama = OllamaStandIn()
    with serving(ollama):
        agent = start_plain_agent(
            model, tmp_path, issuer, ollama.url, backend="ollama", model_name="llama3.2"
        )
        relay = RecordingRelay("127.0.0.1", agent.port, server_ssl=agent.tls_context()).start()
        try:
            http = attested_http_client(relay.url, sim_policy())
            payload = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]}
            with http.stream(
                "POST", f"{relay.url}/api/chat", json=payload, headers=issuer.bearer()
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) for line in response.iter_lines() if line]
            assert lines[-1]["done"] is True
            text = "".join(line["message"]["content"] for line in lines)
            assert text
            whole = http.post(
                f"{relay.url}/api/chat", json={**payload, "stream": False}, headers=issuer.bearer()
            )
            assert whole.status_code == 200 and whole.json()["done"] is True
            # The backend got the plaintext; the wire carried sealed lines only.
            assert ollama.requests_to("/api/chat")[-1].json()["messages"] == payload["messages"]
            assert PROMPT.encode() not in relay.to_upstream
            assert text.encode() not in relay.to_client
            assert b'{"cube-e2e":"' in relay.to_client
        finally:
            relay.stop()
            agent.stop()


def test_the_client_shows_its_verification(windowed_agent: Windowed, issuer: TokenIssuer) -> None:
    _, relay = windowed_agent
    http = attested_http_client(relay.url, sim_policy())
    assert http.attested is None
    attested = http.verify()
    assert http.attested is attested and attested.tls_bound
    client = openai.OpenAI(
        base_url=f"{relay.url}/v1", api_key=issuer.token(), http_client=http, max_retries=0
    )
    assert chat(client) == RESPONSE
    # The verification shown is the one that served the chat: no second evidence request.
    assert len([x for x in requests_seen(relay) if x.startswith(b"GET /attestation")]) == 1

    async def averify() -> bool:
        ahttp = attested_async_http_client(relay.url, sim_policy())
        async with ahttp:
            first = await ahttp.verify()
            return ahttp.attested is first and first.tls_bound

    assert asyncio.run(averify())


def test_an_expired_agent_certificate_is_refused(
    model: ModelDir, tmp_path: Path, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    """The attested certificate bounds how long its key is relied on: a verification expires
    with it, and a certificate past its end is refused (agents replace theirs in time)."""
    running = start_plain_agent(model, tmp_path, issuer, fake_openai.url, key_rotate_seconds=1.0)
    relay = RecordingRelay("127.0.0.1", running.port, server_ssl=running.tls_context()).start()
    try:
        asyncio.run_coroutine_threadsafe(running.server.rotation.close(), running.loop).result(30)
        identity = running.server.prepared.identity
        attested = verify_endpoint(relay.url, sim_policy())
        assert attested.cert_sha256 == identity.cert_sha256
        assert attested.expires_at == identity.not_valid_after  # before the evidence's 300 s
        time.sleep(max(0.0, (identity.not_valid_after - datetime.now(UTC)).total_seconds()) + 0.2)
        checks = Checks()
        with pytest.raises(ValidityError, match="not valid now"):
            verify_endpoint(relay.url, sim_policy(), checks=checks)
        assert [c.name for c in checks if not c.passed] == ["tls.validity"]
    finally:
        relay.stop()
        running.stop()


def test_the_sdk_follows_an_agent_rotating_its_keys(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    """Direct to an agent that rotates its keys (agent.rotation): its kept-alive connection
    keeps the certificate it was verified with; once the HPKE key it sealed to is dropped (two
    rotations), the agent answers 421, and the client verifies again and goes on."""
    client = sdk(agent.url, issuer, sim_policy())
    assert chat(client) == RESPONSE
    http = client._client
    assert isinstance(http, AttestedClient)
    first = http.attested
    assert first is not None

    def rotate() -> None:
        asyncio.run_coroutine_threadsafe(agent.server.rotation.rotate(), agent.loop).result(30)

    rotate()
    assert chat(client) == RESPONSE  # sealed to the previous key: still opens
    assert http.attested is first
    rotate()
    assert stream(client) == RESPONSE  # 421, verified again, sent again
    again = http.attested
    assert again is not None and again is not first
    assert again.hpke_public_key == agent.server.rotation.current.hpke_public_key
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 3


def test_a_stream_in_flight_survives_another_requests_reverification(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    """One thread streams while another meets the agent's new certificate (a key rotation)
    and verifies again: the new certificate gets a new pool, and the stream on a connection
    of the old one reads on to its end (closing the old pool whole would have frozen it)."""
    import threading

    from tests.agent.backends import Gate

    client = sdk(agent.url, issuer, sim_policy(), timeout=20)
    gate = fake_openai.gate = Gate()
    result: dict[str, Any] = {}

    def run_stream() -> None:
        try:
            result["text"] = stream(client)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    streaming = threading.Thread(target=run_stream)
    streaming.start()
    assert fake_openai.stream_started.wait(20)  # held by the backend after its first event
    fake_openai.gate = None
    asyncio.run_coroutine_threadsafe(agent.server.rotation.rotate(), agent.loop).result(30)
    first = client._client.attested  # type: ignore[attr-defined]
    assert [m.id for m in client.models.list().data]  # a new connection: verified again
    assert client._client.attested is not first  # type: ignore[attr-defined]
    gate.open()
    streaming.join(15)
    assert not streaming.is_alive(), "the stream froze"
    assert result == {"text": RESPONSE}
