"""OpenAI-compatible forwarding, through the real agent (TLS, JWT auth) on loopback, to a fake
OpenAI-shaped backend (tests/agent/backends.py) that records what it received and fails on
demand."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest

from agent import forward
from agent.config import AgentConfig
from agent.forward import BackendError, _Framer, openai_usage, parse_body, upstream_headers
from agent.metrics import METRICS
from agent.principal import Principal
from tests.agent.backends import PROMPT_TOKENS, FakeOpenAI, Gate, serving
from tests.agent.conftest import RunningAgent, StartAgent
from tests.rawhttp import post_raw

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    backend = FakeOpenAI()
    with serving(backend):
        yield backend


@pytest.fixture
def backend(fake_openai: FakeOpenAI) -> Iterator[FakeOpenAI]:
    fake_openai.reset()
    yield fake_openai
    for gate in (fake_openai.gate, fake_openai.hold):
        if gate is not None:
            gate.open()  # free any handler still held


@pytest.fixture
def agent(start_agent: StartAgent, backend: FakeOpenAI) -> RunningAgent:
    return start_agent({"backend_url": backend.url})


def chat_body(**extra: Any) -> bytes:
    payload = {"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    return json.dumps(payload).encode()


def metric(agent: RunningAgent, name: str, labels: dict[str, str]) -> float:
    value = agent.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@asynccontextmanager
async def client(agent: RunningAgent) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=agent.ssl_context())
    async with aiohttp.ClientSession(agent.url, connector=connector) as session:
        yield session


async def read_event(content: aiohttp.StreamReader) -> bytes:
    """One SSE event (through its blank line)."""
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(content.readline(), 5)
        if not line:
            return b"".join(lines)
        lines.append(line)
        if line in (b"\n", b"\r\n"):
            return b"".join(lines)


def sse_data(stream: bytes) -> list[str]:
    return [line[6:] for line in stream.decode().splitlines() if line.startswith("data: ")]


def assert_openai_error(body: bytes, status_type: str | None = None) -> dict[str, Any]:
    data = json.loads(body)
    assert set(data) == {"error"}
    error: dict[str, Any] = data["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if status_type is not None:
        assert error["type"] == status_type
    return error


# ---------------------------------------------------------------------------------------------
# Pass-through


def test_chat_non_streaming(agent: RunningAgent, backend: FakeOpenAI) -> None:
    reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
    assert reply.status == 200, reply.body
    data = reply.json()
    assert data["choices"][0]["message"]["content"] == "Hello, world!"
    assert reply.headers["Content-Type"].startswith("application/json")
    assert len(backend.requests_to(CHAT)) == 1
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_requests_total", {"endpoint": "chat", "status": "200"}) == 1
        )
    )
    labels = {"model": "cube-tiny", "kind": "prompt"}
    assert metric(agent, "cube_agent_tokens_total", labels) == PROMPT_TOKENS
    labels["kind"] = "completion"
    assert metric(agent, "cube_agent_tokens_total", labels) == len(backend.tokens)
    assert metric(agent, "cube_agent_first_byte_seconds_count", {"endpoint": "chat"}) == 1


def test_body_and_unknown_fields_pass_through_byte_identical(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    # Unusual spacing, key order, escapes and vendor fields: anything re-serialised would differ.
    body = (
        b'{ "messages" : [ {"role":"user", "content":"caf\\u00e9 \xe2\x9c\x93"} ],\n'
        b'  "model":"cube-tiny", "guided_json": {"type": "object"}, "top_k" : 5,'
        b' "x_vendor_extension": [1, 2.50, null, true], "temperature": 1e-1 }'
    )
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 200, reply.body
    assert backend.requests_to(CHAT)[0].body == body


def test_ten_megabyte_body_is_delivered_byte_identical(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    filler = "x" * (10 * 1024 * 1024)
    body = json.dumps(
        {
            "model": "cube-tiny",
            "messages": [{"role": "user", "content": filler}],
            "unknown_field": {"nested": [1, 2, 3]},
        }
    ).encode()
    assert len(body) > 10 * 1024 * 1024
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 200, reply.body[:200]
    received = backend.requests_to(CHAT)[0].body
    assert len(received) == len(body)
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()


def test_body_over_the_limit_is_413_json(start_agent: StartAgent, backend: FakeOpenAI) -> None:
    agent = start_agent({"backend_url": backend.url, "max_body_bytes": 64 * 1024})
    body = chat_body(padding="y" * (64 * 1024))
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 413
    error = assert_openai_error(reply.body)
    assert error["code"] == "body_too_large"
    # Just under the limit is accepted.
    reply = agent.request("POST", CHAT, body=chat_body(padding="y" * 60_000), token=agent.token())
    assert reply.status == 200
    assert len(backend.requests_to(CHAT)) == 1


def test_headers_the_backend_must_not_see_are_stripped(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    headers = {
        "Cookie": "session=secret-cookie",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=203.0.113.7",
        "X-Real-IP": "203.0.113.7",
        "Api-Key": "secret-key",
        "Connection": "keep-alive, X-Hop-Secret",
        "X-Hop-Secret": "hop",
        "Keep-Alive": "timeout=5",
        "X-Trace-Id": "trace-123",
        "OpenAI-Beta": "assistants=v2",
    }
    token = agent.token()
    reply = agent.request("POST", CHAT, body=chat_body(), headers=headers, token=token)
    assert reply.status == 200
    seen = backend.requests_to(CHAT)[0].headers
    for name in (
        "Authorization",
        "Cookie",
        "Proxy-Authorization",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "Forwarded",
        "X-Real-IP",
        "Api-Key",
        "X-Hop-Secret",
        "Keep-Alive",
    ):
        assert name not in seen, name
    assert all(token not in value for value in seen.values())
    # Ordinary headers still reach the backend.
    assert seen["X-Trace-Id"] == "trace-123"
    assert seen["OpenAI-Beta"] == "assistants=v2"
    assert seen["Content-Type"] == "application/json"


def test_upstream_headers_unit() -> None:
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request(
        "POST",
        "/v1/chat/completions",
        headers={
            "Authorization": "Bearer t",
            "Connection": "X-A, x-b",
            "X-A": "1",
            "X-B": "2",
            "X-C": "3",
            "Proxy-Foo": "p",
            "Accept-Encoding": "gzip",
        },
    )
    out = upstream_headers(request, has_body=True)
    assert "Authorization" not in out and "X-A" not in out and "X-B" not in out
    assert "Proxy-Foo" not in out and "Connection" not in out
    assert out["X-C"] == "3"
    assert out["Accept-Encoding"] == "identity"
    assert out["Content-Type"] == "application/json"


# ---------------------------------------------------------------------------------------------
# Streaming


def test_streaming_is_relayed_chunk_by_chunk(agent: RunningAgent, backend: FakeOpenAI) -> None:
    backend.gate = Gate()  # the backend sends its first event, then waits

    async def main() -> None:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            async with session.post(CHAT, data=chat_body(stream=True), headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                first = await read_event(resp.content)
                # The client holds the first event while the backend has not sent the last one.
                assert first.startswith(b"data: ")
                assert backend.stream_started.is_set()
                assert not backend.last_sent.is_set()
                assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
                assert backend.gate is not None
                backend.gate.open()
                rest = await asyncio.wait_for(resp.content.read(), 5)
        data = sse_data(first + rest)
        assert data[-1] == "[DONE]"
        pieces = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1] if d]
        assert "".join(pieces) == "Hello, world!"

    asyncio.run(main())


def test_every_event_arrives_before_the_next_is_sent(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.delay = 0.2  # between events: each must reach the client on its own

    async def main() -> list[float]:
        arrivals = []
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            async with session.post(CHAT, data=chat_body(stream=True), headers=headers) as resp:
                while event := await read_event(resp.content):
                    if not event.startswith(b":"):  # the usage comment goes with [DONE]
                        arrivals.append(time.monotonic())
        return arrivals

    arrivals = asyncio.run(main())
    assert len(arrivals) == len(backend.tokens) + 3  # role, tokens, finish, [DONE]
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:])]
    assert all(gap > 0.05 for gap in gaps), gaps  # buffering would bunch them together


def test_stream_usage_is_metered_once(agent: RunningAgent, backend: FakeOpenAI) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 200
    usage = [json.loads(d)["usage"] for d in sse_data(reply.body) if d != "[DONE]"]
    assert usage[-1]["prompt_tokens"] == PROMPT_TOKENS
    labels = {"model": "cube-tiny", "kind": "prompt"}
    assert eventually(lambda: metric(agent, "cube_agent_tokens_total", labels) == PROMPT_TOKENS)
    labels["kind"] = "completion"
    assert metric(agent, "cube_agent_tokens_total", labels) == len(backend.tokens)


@pytest.mark.parametrize("asked", [False, True])
def test_stream_usage_is_reported_whether_or_not_the_client_asked(
    agent: RunningAgent, backend: FakeOpenAI, asked: bool
) -> None:
    """The agent always asks the backend for a stream's usage (the proxy meters and charges
    token limits from it); the client gets the usage chunk only if it asked, and in any case
    an SSE comment with the counts just before [DONE], which SSE clients skip."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    reply = agent.request("POST", CHAT, body=chat_body(stream=True, **extra), token=agent.token())
    assert reply.status == 200
    sent = backend.requests_to(CHAT)[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    chunks = [json.loads(d) for d in sse_data(reply.body) if d != "[DONE]"]
    usage_chunks = [c for c in chunks if c["choices"] == []]
    assert len(usage_chunks) == (1 if asked else 0)
    records = [r for r in reply.body.split(b"\n\n") if r]
    assert records[-1] == b"data: [DONE]"
    counts = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(backend.tokens)}
    assert records[-2] == b": cube-usage " + json.dumps(counts).encode()


def test_asking_for_stream_usage_keeps_the_clients_bytes(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    """The usage request is inserted, not re-encoded: the client's own bytes (spacing, key
    order, escapes) reach the backend unchanged after it. (Re-encoding a large body held the
    agent's event loop for as long as json.dumps took.)"""
    body = (
        b' {"model" : "cube-tiny",  "stream":true, '
        b'"messages":[{"role":"user","content":"caf\\u00e9"}]}'
    )
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 200
    sent = backend.requests_to(CHAT)[-1].body
    assert sent == b' {"stream_options":{"include_usage":true},' + body[2:]
    # With stream_options there already (but no usage asked), it is re-encoded with both.
    extra = chat_body(stream=True, stream_options={"include_usage": False})
    assert agent.request("POST", CHAT, body=extra, token=agent.token()).status == 200
    assert backend.requests_to(CHAT)[-1].json()["stream_options"] == {"include_usage": True}


def test_text_completions_stream(agent: RunningAgent, backend: FakeOpenAI) -> None:
    body = json.dumps({"model": "cube-tiny", "prompt": "Once", "stream": True}).encode()
    reply = agent.request("POST", "/v1/completions", body=body, token=agent.token())
    assert reply.status == 200
    data = sse_data(reply.body)
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == "Hello, world!"


def test_client_disconnect_cancels_the_upstream_request(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.gate = Gate()  # never opened: the backend would wait forever

    async def main() -> None:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            resp = await session.post(CHAT, data=chat_body(stream=True), headers=headers)
            assert resp.status == 200
            await read_event(resp.content)
            resp.close()  # the client goes away mid-stream (its connection is closed)
        # The backend sees its own connection closed, while it is silent (nothing for the agent
        # to write): the agent noticed the disconnect by itself.
        assert await backend.cancelled.wait_async(5), "the backend was not told"

    asyncio.run(main())
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_requests_total", {"endpoint": "chat", "status": "499"}) == 1
        )
    )


def test_client_disconnect_before_the_response_starts(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    # A non-streamed request the backend is still working on: nothing has been relayed yet.
    backend.hold = Gate()

    async def main() -> None:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            task = asyncio.ensure_future(session.post(CHAT, data=chat_body(), headers=headers))
            assert await backend.held.wait_async(5)
            task.cancel()  # the client gives up; its connection closes
            with suppress(asyncio.CancelledError):
                await task
        assert await backend.cancelled.wait_async(5), "the backend was not told"

    asyncio.run(main())
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_requests_total", {"endpoint": "chat", "status": "499"}) == 1
        )
    )


# ---------------------------------------------------------------------------------------------
# Failures


def test_backend_down_is_503_quickly(start_agent: StartAgent) -> None:
    agent = start_agent()  # nothing listens on its backend port
    started = time.monotonic()
    reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
    assert reply.status == 503
    assert time.monotonic() - started < 2
    error = assert_openai_error(reply.body)
    assert error["code"] == "backend_unavailable"
    assert "x-should-retry" not in reply.headers  # nothing reached it: a retry is safe
    reply = agent.get("/v1/models", token=agent.token())
    assert reply.status == 503


def test_backend_that_never_accepts_is_503_after_the_connect_timeout(
    start_agent: StartAgent,
) -> None:
    # A listener whose backlog is full: the kernel drops new SYNs, so connect() hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        agent = start_agent(
            {"backend_url": f"http://127.0.0.1:{port}", "backend_connect_timeout": 0.5}
        )
        started = time.monotonic()
        reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
        elapsed = time.monotonic() - started
        assert reply.status == 503, reply.body
        assert elapsed < 3, elapsed  # the connect timeout (0.5 s) ended it, not a hang
        assert_openai_error(reply.body)
    finally:
        for s in (*fillers, blackhole):
            s.close()


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (
            400,
            b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError",'
            b' "param": null, "code": 400}}',
            "application/json",
            "max_tokens is too large",
        ),
        (  # older vLLM: the error fields at the top level
            400,
            b'{"object": "error", "message": "bad prompt", "type": "BadRequestError", "code": 400}',
            "application/json",
            "bad prompt",
        ),
        (422, b'{"detail": "field required"}', "application/json", "field required"),
        (429, b'{"error": "too many requests"}', "application/json", "too many requests"),
        (
            500,
            b"<html><body><h1>500 Internal Server Error</h1>Traceback (most recent call last)"
            b"</body></html>",
            "text/html",
            "the backend answered HTTP 500",
        ),
        (503, b"Service Unavailable", "text/plain", "the backend answered HTTP 503"),
        # JSON nested past Python's recursion limit: unreadable, so the generic message.
        (400, b"[" * 5000, "application/json", "the backend answered HTTP 400"),
    ],
)
def test_backend_http_errors_are_clean_json_with_the_backend_status(
    agent: RunningAgent,
    backend: FakeOpenAI,
    status: int,
    body: bytes,
    content_type: str,
    message: str,
) -> None:
    backend.error = (status, body, content_type)
    reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
    assert reply.status == status
    assert reply.headers["Content-Type"].startswith("application/json")
    error = assert_openai_error(reply.body)
    assert error["message"] == message
    assert b"<html" not in reply.body and b"Traceback" not in reply.body


def test_backend_redirect_is_502(agent: RunningAgent, backend: FakeOpenAI) -> None:
    backend.error = (302, b"", "text/html")
    reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
    assert reply.status == 502
    assert assert_openai_error(reply.body, "server_error")["code"] == "backend_invalid"


def test_unknown_model_is_the_backends_404(agent: RunningAgent, backend: FakeOpenAI) -> None:
    body = json.dumps({"model": "no-such-model", "messages": []}).encode()
    reply = agent.request("POST", CHAT, body=body, token=agent.token())
    assert reply.status == 404
    error = assert_openai_error(reply.body)
    assert "no-such-model" in error["message"]


def test_backend_dying_mid_stream_ends_the_stream_cleanly(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.die_after = 3

    async def main() -> bytes:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            async with session.post(CHAT, data=chat_body(stream=True), headers=headers) as resp:
                assert resp.status == 200
                # Reads to a clean end: no payload error, the chunked stream is terminated.
                return await asyncio.wait_for(resp.content.read(), 5)

    stream = asyncio.run(main())
    events = [e for e in stream.split(b"\n\n") if e]
    assert len(events) == 4  # three relayed events, then the error
    assert events[-1].startswith(b"event: error\ndata: ")
    error = json.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "backend_stream_error"
    for event in events[:-1]:
        json.loads(event[len(b"data: ") :])  # whole events only
    assert len(backend.requests_to(CHAT)) == 1  # never retried once the response began
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_requests_total", {"endpoint": "chat", "status": "502"}) == 1
        )
    )


def test_a_torn_event_is_never_relayed(agent: RunningAgent, backend: FakeOpenAI) -> None:
    backend.die_after = 2
    backend.die_mid_record = True  # the backend sends half an event, then dies
    reply = agent.request("POST", CHAT, body=chat_body(stream=True), token=agent.token())
    events = [e for e in reply.body.split(b"\n\n") if e]
    assert len(events) == 3
    for event in events[:-1]:
        json.loads(event[len(b"data: ") :])
    assert events[-1].startswith(b"event: error\n")


def test_backend_dying_before_answering_is_502_after_one_retry(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.die_before_response = True
    reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
    assert reply.status == 502
    assert assert_openai_error(reply.body)["code"] == "backend_disconnected"
    assert backend.resets == 2  # the first try and exactly one retry
    # The backend had it: the openai SDK must not send it twice more.
    assert reply.headers.get("x-should-retry") == "false"


def test_stale_kept_alive_connection_is_retried_once_on_a_fresh_one(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.reset_reused = True
    for _ in range(3):
        reply = agent.request("POST", CHAT, body=chat_body(), token=agent.token())
        assert reply.status == 200, reply.body
    assert backend.resets >= 1  # a pooled connection was reset, and the request still served
    assert len(backend.requests_to(CHAT)) == 3 + backend.resets


def test_server_closing_after_each_stream_despite_keep_alive(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    backend.close_after_stream = True  # llama-server's behaviour

    async def main() -> None:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            for _ in range(25):
                async with session.post(CHAT, data=chat_body(stream=True), headers=headers) as resp:
                    assert resp.status == 200
                    body = await resp.read()
                    assert sse_data(body)[-1] == "[DONE]"

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Scopes and request validation


def test_model_outside_the_tokens_scope_is_403(agent: RunningAgent, backend: FakeOpenAI) -> None:
    token = agent.token(scope="inference model:other-model")
    reply = agent.request("POST", CHAT, body=chat_body(), token=token)
    assert reply.status == 403
    assert assert_openai_error(reply.body, "permission_error")["code"] == "model_not_allowed"
    # No model named: the backend would serve the configured one, which is out of scope too.
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = agent.request("POST", CHAT, body=body, token=token)
    assert reply.status == 403
    assert backend.requests_to(CHAT) == []
    body = json.dumps({"model": "other-model", "messages": []}).encode()
    reply = agent.request("POST", CHAT, body=body, token=token)
    assert reply.status == 200
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_requests_total", {"endpoint": "chat", "status": "403"}) == 2
        )
    )


def test_endpoint_outside_the_tokens_scope_is_403(agent: RunningAgent, backend: FakeOpenAI) -> None:
    token = agent.token(scope="inference endpoint:embeddings")
    reply = agent.request("POST", CHAT, body=chat_body(), token=token)
    assert reply.status == 403
    assert assert_openai_error(reply.body, "permission_error")["code"] == "endpoint_not_allowed"
    reply = agent.get("/v1/models", token=token)
    assert reply.status == 403
    body = json.dumps({"model": "cube-tiny", "input": "x"}).encode()
    reply = agent.request("POST", "/v1/embeddings", body=body, token=token)
    assert reply.status == 200
    assert backend.requests_to(CHAT) == [] and backend.requests_to("/v1/models") == []


def test_model_list_is_filtered_to_the_tokens_models(
    agent: RunningAgent, backend: FakeOpenAI
) -> None:
    reply = agent.get("/v1/models", token=agent.token(scope="inference model:cube-tiny"))
    assert reply.status == 200
    assert [m["id"] for m in reply.json()["data"]] == ["cube-tiny"]
    reply = agent.get("/v1/models", token=agent.token())
    assert [m["id"] for m in reply.json()["data"]] == ["cube-tiny", "other-model"]
    reply = agent.get("/v1/models", token=agent.token(scope="inference model:nothing-served"))
    assert reply.json()["data"] == []


def test_no_token_forwards_nothing(agent: RunningAgent, backend: FakeOpenAI) -> None:
    reply = agent.request("POST", CHAT, body=chat_body())
    assert reply.status == 401
    assert_openai_error(reply.body)
    assert backend.received == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "other-model", "model": "cube-tiny", "messages": []}', "duplicate_key"),
        (b'{"Model": "other-model", "model": "cube-tiny", "messages": []}', "ambiguous_field"),
        (b'{"MODEL": "other-model", "messages": []}', "ambiguous_field"),
        (b'{"model": 7, "messages": []}', "invalid_model"),
        (b'{"model": "cube-tiny", "messages": [', "invalid_json"),
        (b'["model", "cube-tiny"]', "invalid_json"),
        (b'{"model": "cube-tiny\xff"}', "invalid_body"),
        ('{"model": "cube-tiny"}'.encode("utf-16"), "invalid_body"),
        # vLLM streams for these too, and the stream would not be metered.
        (b'{"model": "cube-tiny", "messages": [], "stream": "true"}', "invalid_stream"),
        (b'{"model": "cube-tiny", "messages": [], "stream": 1}', "invalid_stream"),
        (b'{"model": "cube-tiny", "messages": [], "Stream": true}', "ambiguous_field"),
        (
            b'{"model": "cube-tiny", "messages": [], "stream": true, "STREAM_OPTIONS": {}}',
            "ambiguous_field",
        ),
    ],
)
def test_bodies_the_backend_could_read_differently_are_400(
    agent: RunningAgent, backend: FakeOpenAI, body: bytes, code: str
) -> None:
    token = agent.token(scope="inference model:cube-tiny")
    reply = agent.request("POST", CHAT, body=body, token=token)
    assert reply.status == 400
    assert assert_openai_error(reply.body, "invalid_request_error")["code"] == code
    assert backend.requests_to(CHAT) == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "x-unknown"])
def test_a_content_encoded_request_body_is_refused(
    agent: RunningAgent, backend: FakeOpenAI, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Decoded, it reached the backend still labelled encoded (llama-server answered 415);
    not decodable, it was a 500 with a traceback; an encoding aiohttp cannot decode (br
    without brotli) was its own plain-text 400 and an ERROR log line. Nobody's client
    compresses these."""
    import gzip

    reply = agent.request(
        "POST",
        CHAT,
        body=gzip.compress(chat_body()) if encoding == "gzip" else b"\x00\x01not-compressed",
        token=agent.token(),
        headers={"Content-Encoding": encoding},
    )
    assert reply.status == 415
    assert assert_openai_error(reply.body)["code"] == "unsupported_content_encoding"
    assert backend.requests_to(CHAT) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_every_content_encoding_header_counts(agent: RunningAgent, backend: FakeOpenAI) -> None:
    """``identity`` then ``gzip`` in two headers is an encoded body (only the first was read,
    and the second reached the backend)."""
    body = chat_body()
    status, answer = post_raw(
        agent.connection(),
        CHAT,
        [
            ("Authorization", f"Bearer {agent.token()}"),
            ("Content-Type", "application/json"),
            ("Content-Encoding", "identity"),
            ("Content-Encoding", "gzip"),
        ],
        body,
    )
    assert status == 415, answer
    assert backend.requests_to(CHAT) == []
    # "identity" is no encoding: served, and no Content-Encoding reaches the backend.
    ok = agent.request(
        "POST", CHAT, body=body, token=agent.token(), headers={"Content-Encoding": "Identity"}
    )
    assert ok.status == 200
    (sent,) = backend.requests_to(CHAT)
    assert "content-encoding" not in {name.lower() for name in sent.headers}


def test_no_prompt_or_token_in_logs_or_metrics(
    agent: RunningAgent, backend: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    secret_prompt = "the launch code is 0000-SECRET-PROMPT"
    token = agent.token()
    body = json.dumps(
        {"model": "cube-tiny", "messages": [{"role": "user", "content": secret_prompt}]}
    )
    agent.request("POST", CHAT, body=body.encode(), token=token)
    backend.error = (
        500,
        b'{"error": {"message": "failed on 0000-SECRET-PROMPT"}}',
        "application/json",
    )
    agent.request("POST", CHAT, body=body.encode(), token=token)
    backend.error = None
    backend.die_after = 2
    agent.request("POST", CHAT, body=chat_body(stream=True, note=secret_prompt), token=token)
    metrics = agent.get("/metrics").body.decode()
    assert "cube_agent_requests_total" in metrics
    for text in (caplog.text, metrics):
        assert "SECRET-PROMPT" not in text
        assert token not in text
        assert "Hello, world" not in text


# ---------------------------------------------------------------------------------------------
# Readiness


def test_backend_ready(start_agent: StartAgent, backend: FakeOpenAI) -> None:
    agent = start_agent({"backend_url": backend.url})
    assert agent.call(forward.backend_ready(agent.app)) == (
        True,
        "the backend serves the model 'cube-tiny'",
    )
    other = start_agent({"backend_url": backend.url, "model_name": "absent-model"})
    ok, detail = other.call(forward.backend_ready(other.app))
    assert not ok and "absent-model" in detail
    down = start_agent()
    ok, detail = down.call(forward.backend_ready(down.app))
    assert (ok, detail) == (False, "the backend is unreachable")
    backend.error = (503, b'{"error": "loading model"}', "application/json")
    ok, detail = agent.call(forward.backend_ready(agent.app))
    assert (ok, detail) == (False, "the backend answered HTTP 503")


def test_ready_endpoint_reports_the_backend(start_agent: StartAgent, backend: FakeOpenAI) -> None:
    agent = start_agent({"backend_url": backend.url})
    reply = agent.get("/ready")
    assert reply.status == 200, reply.body
    assert reply.json()["checks"]["backend"]["ok"] is True
    down = start_agent()
    reply = down.get("/ready")
    assert reply.status == 503
    assert reply.json()["checks"]["backend"] == {
        "ok": False,
        "detail": "the backend is unreachable",
    }


# ---------------------------------------------------------------------------------------------
# Units: body inspection, framing, usage


def test_parse_body_unit() -> None:
    assert parse_body(b'{"model": "m", "x": {"model": 1, "model": 2}}')["model"] == "m"
    with pytest.raises(BackendError) as err:
        parse_body(b'{"a": 1, "a": 2}')
    assert err.value.status == 400
    with pytest.raises(BackendError):
        parse_body(b'{"NAME": "x"}', ("model", "name"))
    assert parse_body(b'{"messages": []}') == {"messages": []}
    with pytest.raises(BackendError):
        parse_body(b"[" * 100_000)  # deep nesting: refused, not a RecursionError


def test_framer_holds_only_an_unfinished_record() -> None:
    framer = _Framer("sse")
    assert framer.feed(b"data: 1\n\n") == b"data: 1\n\n"
    assert framer.feed(b"data: 2\n\ndata: 3") == b"data: 2\n\n"
    assert framer.mid_record
    assert framer.feed(b"\n") == b""
    assert framer.feed(b"\n") == b"data: 3\n\n"
    assert framer.feed(b"data: 4\r\n\r\n") == b"data: 4\r\n\r\n"
    assert framer.feed(b"data: 5") == b""
    assert framer.flush() == b"data: 5"
    ndjson = _Framer("ndjson")
    assert ndjson.feed(b'{"a":1}\n{"b"') == b'{"a":1}\n'
    assert ndjson.feed(b":2}\n") == b'{"b":2}\n'


def test_openai_usage_unit() -> None:
    assert openai_usage(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == (3, 4)
    assert openai_usage(b'data: {"usage": null}\n\n') is None
    # Text that talks about usage is escaped JSON and does not count.
    assert openai_usage(b'{"content": "\\"usage\\": {\\"prompt_tokens\\": 99}"}') is None
    events = (
        b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
        b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    )
    assert openai_usage(events) == (3, 2)


def test_model_allowed_unit() -> None:
    config = AgentConfig(backend="vllm")
    anyone = Principal("u", None, None)
    limited = Principal("u", frozenset({"cube-tiny"}), None)
    assert forward.model_allowed(config, anyone, "whatever")
    assert forward.model_allowed(config, limited, "cube-tiny")
    assert not forward.model_allowed(config, limited, "cube-tiny:latest")


def test_metric_model_labels_are_bounded() -> None:
    # llama-server ignores the request's model name: any name would become a new label.
    assert forward.metric_model(AgentConfig(backend="openai"), "made-up-1") == "cube-tiny"
    assert forward.metric_model(AgentConfig(backend="vllm"), "cube-tiny") == "cube-tiny"
    ollama = AgentConfig(backend="ollama")
    assert forward.metric_model(ollama, "library/llama3.2") == "llama3.2:latest"
