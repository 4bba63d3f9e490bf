"""The agent's side of ``cube-e2e/1`` (agent.e2e, hooked into agent.forward), over real HTTPS to an
in-process agent with the fake OpenAI backend: sealed requests open and answers come back sealed
(whole, streamed, errors); plain requests are untouched; every malformed, misdirected, replayed,
stale or inconsistent sealed request is refused with a JSON error before the backend sees it."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
from typing import Any

import pytest

from cube_client import e2e
from tests.agent.backends import FakeOpenAI
from tests.agent.tokens import TokenIssuer
from tests.client.conftest import PROMPT, RESPONSE
from tests.client.servers import InProcessAgent

CHAT = "/v1/chat/completions"


def body(**extra: Any) -> bytes:
    payload = {"model": "cube-tiny", "messages": [{"role": "user", "content": PROMPT}], **extra}
    return json.dumps(payload).encode()


class Raw:
    status: int
    headers: dict[str, str]
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


def post(
    agent: InProcessAgent,
    data: bytes,
    headers: dict[str, str],
    path: str = CHAT,
) -> Raw:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=data, headers=headers)
        response = conn.getresponse()
        out = Raw()
        out.status = response.status
        out.headers = {k.lower(): v for k, v in response.getheaders()}
        out.data = response.read()
        return out
    finally:
        conn.close()


def hpke_key(agent: InProcessAgent) -> bytes:
    return agent.server.prepared.identity.hpke_public_key


def sealed(
    agent: InProcessAgent,
    data: bytes,
    *,
    path: str = CHAT,
    model: str | None = "cube-tiny",
    **kw: Any,
) -> tuple[bytes, e2e.RequestMeta]:
    return e2e.seal_request(data, hpke_key(agent), method="POST", path=path, model=model, **kw)


def headers(issuer: TokenIssuer, model: str | None = "cube-tiny") -> dict[str, str]:
    out = {"Content-Type": e2e.CONTENT_TYPE, **issuer.bearer()}
    if model is not None:
        out[e2e.MODEL_HEADER] = model
    return out


def test_a_sealed_chat_is_answered_sealed(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, meta = sealed(agent, body())
    reply = post(agent, envelope, headers(issuer))
    assert reply.status == 200, reply.data
    assert reply.headers["content-type"] == e2e.CONTENT_TYPE
    assert reply.headers[e2e.USAGE_HEADER.lower()] == "prompt_tokens=11, completion_tokens=4"
    assert RESPONSE.encode() not in reply.data
    plain, content_type = e2e.open_whole(meta, reply.data)
    assert content_type.startswith("application/json")
    assert json.loads(plain)["choices"][0]["message"]["content"] == RESPONSE
    # The backend received the plaintext body, as JSON, without the e2e headers.
    received = fake_openai.requests_to(CHAT)[-1]
    assert received.body == body()
    assert received.headers["Content-Type"] == "application/json"
    assert not [h for h in received.headers if h.lower().startswith("cube-e2e")]


def test_a_sealed_stream_is_sealed_event_by_event(
    agent: InProcessAgent, issuer: TokenIssuer
) -> None:
    envelope, meta = sealed(agent, body(stream=True, stream_options={"include_usage": True}))
    reply = post(agent, envelope, headers(issuer))
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert RESPONSE_PART not in reply.data and b"[DONE]" not in reply.data
    events = [e for e in reply.data.split(b"\n\n") if e]
    names = [e.split(b"\n")[0] for e in events]
    assert set(names) == {b"event: cube-e2e", b"event: cube-usage"}
    usage_events = [e for e in events if e.startswith(b"event: cube-usage")]
    assert usage_events == [
        b'event: cube-usage\ndata: {"prompt_tokens": 11, "completion_tokens": 4}'
    ]
    assert events[-1].startswith(b"event: cube-e2e")  # the end marker comes last
    decoder = e2e.StreamDecoder(meta, "sse")
    plain = decoder.feed(reply.data)
    decoder.finish()
    text = "".join(
        (json.loads(line[6:])["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
        for line in plain.split(b"\n")
        if line.startswith(b"data: {")
    )
    assert text == RESPONSE
    assert plain.rstrip().endswith(b"data: [DONE]")


RESPONSE_PART = b"SECRET"


def test_a_backend_error_is_sealed_too(agent: InProcessAgent, issuer: TokenIssuer) -> None:
    envelope, meta = sealed(agent, body(model="no-such-model"), model="no-such-model")
    reply = post(agent, envelope, headers(issuer, "no-such-model"))
    assert reply.status == 404
    assert reply.headers["content-type"] == e2e.CONTENT_TYPE
    plain, _ = e2e.open_whole(meta, reply.data)
    assert "does not exist" in json.loads(plain)["error"]["message"]


def test_plain_requests_are_untouched(agent: InProcessAgent, issuer: TokenIssuer) -> None:
    reply = post(agent, body(), {"Content-Type": "application/json", **issuer.bearer()})
    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == RESPONSE
    assert e2e.USAGE_HEADER.lower() not in reply.headers


def expect_refusal(
    agent: InProcessAgent, fake_openai: FakeOpenAI, reply: Raw, status: int, code: str
) -> None:
    assert reply.status == status, reply.data
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code
    assert PROMPT not in error["message"]
    assert not fake_openai.requests_to(CHAT)  # nothing reached the backend


def test_a_plain_body_with_the_e2e_content_type_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    reply = post(agent, body(), headers(issuer))
    expect_refusal(agent, fake_openai, reply, 400, "e2e_malformed")


def test_a_tampered_envelope_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, _ = sealed(agent, body())
    tampered = envelope[:-1] + bytes([envelope[-1] ^ 1])
    expect_refusal(
        agent, fake_openai, post(agent, tampered, headers(issuer)), 400, "e2e_undecryptable"
    )


def test_an_envelope_for_another_key_is_421(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    other = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    envelope, _ = e2e.seal_request(body(), other, method="POST", path=CHAT, model="cube-tiny")
    expect_refusal(
        agent, fake_openai, post(agent, envelope, headers(issuer)), 421, "e2e_wrong_recipient"
    )


def test_a_replay_is_409(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, _ = sealed(agent, body())
    assert post(agent, envelope, headers(issuer)).status == 200
    fake_openai.received.clear()
    # The same bytes again (a fresh token, as a replaying proxy would mint): refused.
    expect_refusal(agent, fake_openai, post(agent, envelope, headers(issuer)), 409, "e2e_replay")


def test_a_stale_request_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, _ = sealed(agent, body(), now=time.time() - 3600)
    expect_refusal(agent, fake_openai, post(agent, envelope, headers(issuer)), 400, "e2e_stale")


def test_a_request_sealed_for_another_path_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, _ = sealed(agent, body(), path="/v1/completions")
    expect_refusal(
        agent, fake_openai, post(agent, envelope, headers(issuer)), 400, "e2e_wrong_target"
    )


@pytest.mark.parametrize("header", ["other-model", None])
def test_the_model_header_must_name_the_sealed_model(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI, header: str | None
) -> None:
    envelope, _ = sealed(agent, body())
    expect_refusal(
        agent,
        fake_openai,
        post(agent, envelope, headers(issuer, header)),
        400,
        "e2e_model_mismatch",
    )


def test_authentication_comes_first(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    envelope, _ = sealed(agent, body())
    reply = post(agent, envelope, {"Content-Type": e2e.CONTENT_TYPE, e2e.MODEL_HEADER: "cube-tiny"})
    assert reply.status == 401
    assert not fake_openai.received
    # Refused before opening: the envelope was not spent, so the real client can still send it.
    assert post(agent, envelope, headers(issuer)).status == 200


@pytest.mark.parametrize("mid_record", [False, True])
def test_a_backend_dying_mid_stream_ends_the_sealed_stream_with_an_error(
    agent: InProcessAgent,
    issuer: TokenIssuer,
    fake_openai: FakeOpenAI,
    mid_record: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cube.agent")
    fake_openai.die_after = 2
    fake_openai.die_mid_record = mid_record
    envelope, meta = sealed(agent, body(stream=True))
    reply = post(agent, envelope, headers(issuer))
    assert reply.status == 200
    decoder = e2e.StreamDecoder(meta, "sse")
    plain = decoder.feed(reply.data)
    decoder.finish()  # sealed to the end: the agent says the stream ended, with an error
    assert b"event: error" in plain and b"backend_stream_error" in plain
    assert plain.count(b"data: {") == 3  # two events, then the error record
    assert "backend failed mid-stream" in caplog.text
    assert "forwarding failed" not in caplog.text  # nothing more was written after the end


def test_a_sealed_streams_last_event_goes_out_with_the_end_marker(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    # The backend keeps its stream open after [DONE] for a while: the sealed [DONE] must not
    # reach the client before the end marker does (a client that closes at [DONE] would leave
    # the proxy, which cannot read it, seeing an unfinished stream).
    fake_openai.linger = 0.5
    envelope, meta = sealed(agent, body(stream=True))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=ctx, timeout=30)
    try:
        conn.request("POST", CHAT, body=envelope, headers=headers(issuer))
        response = conn.getresponse()
        assert response.status == 200
        decoder = e2e.StreamDecoder(meta, "sse")
        plain = b""
        done_at = ended_at = None
        while chunk := response.read1(65536):
            plain += decoder.feed(chunk)
            now = time.monotonic()
            if done_at is None and decoder.last_event_seen:
                done_at = now
            if ended_at is None and decoder.ended:
                ended_at = now
        decoder.finish()
    finally:
        conn.close()
    assert plain.rstrip().endswith(b"data: [DONE]")
    assert plain.count(b"data: {") >= 3  # the events before it came through too
    assert done_at is not None and ended_at is not None
    assert ended_at - done_at < 0.25  # together, not [DONE] then the 0.5 s linger
