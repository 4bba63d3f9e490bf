# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Streams through the proxy: chunk by chunk as the backend produces them, no write timeout,
the client's disconnect stopping the backend, usage counted from streamed records, Ollama's
NDJSON, and unit tests of the usage scanner."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cube_client.e2e import RequestMeta, ResponseSealer, usage_record
from proxy.gateway import edge
from proxy.gateway.forward import stream_ended
from proxy.gateway.metering import UsageScanner, estimated_prompt_tokens
from tests.agent.backends import (
    OLLAMA_FINAL_STATS,
    OLLAMA_TOKENS,
    FakeOpenAI,
    Gate,
    OllamaStandIn,
    serving,
)
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
)


def open_stream(
    server: ProxyServer, path: str, token: str, payload: dict[str, object]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        path,
        body=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def sse_events(response: http.client.HTTPResponse) -> Iterator[bytes]:
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield event


CHAT = {"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_stream_arrives_chunk_by_chunk(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.gate = Gate()
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, CHAT)
    try:
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        assert response.getheader("X-Cube-Proxy-Ms") is not None
        events = sse_events(response)
        first = next(events)  # arrives while the backend is still holding the rest
        assert b'"role": "assistant"' in first or b'"role":"assistant"' in first
        assert not fake_openai.last_sent.is_set()
        fake_openai.gate.open()
        rest = [e for e in events if not e.startswith(b":")]  # not the usage comment
        assert rest[-1] == b"data: [DONE]"
        text = "".join(
            json.loads(e[6:])["choices"][0]["delta"].get("content", "")
            for e in rest[:-1]
            if json.loads(e[6:])["choices"]
        )
        assert text == "Hello, world!"
    finally:
        conn.close()


def test_client_disconnect_stops_the_backend(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.gate = Gate()  # never opened: the generation would go on forever
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, CHAT)
    next(sse_events(response))
    # (Set by the backend's thread just after its write: the event can arrive first.)
    assert fake_openai.stream_started.wait(10)
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    assert fake_openai.cancelled.wait(10), "the backend was not told to stop"
    server.flush()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [r for r in directory.audits if r.status == 499]:
        time.sleep(0.05)
        server.flush()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 499
    # What it was sent is charged, counted from the records relayed (the usage never came),
    # and its prompt, which the backend processed, estimated from the request's size.
    assert row.detail == (
        "client disconnected; prompt tokens estimated from the request's size (no count came); "
        "completion tokens counted from the records relayed (no usage came with the stream)"
    )
    prompt = -(-len(json.dumps(CHAT).encode()) // 4)
    assert row.prompt_tokens == prompt and row.completion_tokens is not None
    assert row.completion_tokens >= 1
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in directory.usage] == [
        (prompt, row.completion_tokens)
    ]


def test_a_stream_cut_by_the_proxys_shutdown_is_audited_as_such(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shutdown drains answers in progress, then cuts the rest: their rows say the proxy cut
    them (503), not that the client left (499)."""
    monkeypatch.setattr(edge, "DRAIN_SECONDS", 0.5)
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.gate = Gate()  # never opened: the stream outlives the drain
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, CHAT)
    try:
        next(sse_events(response))
        assert server.runner is not None
        server.call(server.runner.cleanup())  # the audit writer is flushed on the way out
        server.runner = None
    finally:
        conn.close()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 503
    assert row.detail is not None and row.detail.startswith("cut: cube-proxy shut down")
    assert row.completion_tokens is not None and row.completion_tokens >= 1  # what was sent
    assert row.prompt_tokens == estimated_prompt_tokens(len(json.dumps(CHAT).encode()))


def test_a_whole_answer_cut_by_the_proxys_shutdown_is_charged_its_prompt(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(edge, "DRAIN_SECONDS", 0.5)
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.hold = Gate()  # never opened: the answer outlives the drain
    body = json.dumps({**CHAT, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /%s/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (dom.alias.encode(), dom.pat.encode(), len(body), body)
        )
        assert fake_openai.held.wait(10)
        assert server.runner is not None
        server.call(server.runner.cleanup())
        server.runner = None
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert (row.status, row.prompt_tokens) == (503, estimated_prompt_tokens(len(body)))


def test_a_client_leaving_just_before_the_usage_is_charged_for_what_it_read(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """A client that reads the whole answer and closes at ``finish_reason`` — before the
    usage and ``[DONE]`` — is charged one completion token per record relayed, so leaving
    early does not escape token limits (it was charged nothing)."""
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.tokens = ["tok"] * 40
    fake_openai.delay = 0.02
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, CHAT)
    contents = 0
    for event in sse_events(response):
        if event.startswith(b"data: {") and (choices := json.loads(event[6:])["choices"]):
            contents += "content" in choices[0]["delta"]
            if choices[0]["finish_reason"] == "stop":
                break
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    assert contents >= 40
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not directory.usage:
        time.sleep(0.05)
        server.flush()
    (usage,) = directory.usage
    assert 40 <= usage["completion_tokens"] <= 43  # the role and finish records count too


def test_a_client_closing_after_the_last_event_got_the_whole_answer(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """The openai SDK closes as soon as it has read ``data: [DONE]``, possibly before the
    stream's chunked end arrives: that answer was delivered, and is audited as a 200 with its
    usage (a race that once showed up as a 499 row in CI)."""
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.linger = 2.0  # the backend keeps the stream open after [DONE]
    payload = {**CHAT, "stream_options": {"include_usage": True}}
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, payload)
    events = list(_until_done(sse_events(response)))
    assert events[-1] == b"data: [DONE]"
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    assert fake_openai.cancelled.wait(10), "the backend was not told to stop"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [r for r in directory.audits if r.event == "request"]:
        time.sleep(0.05)
        server.flush()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 200, row.detail
    assert row.prompt_tokens is not None and row.completion_tokens is not None


def _until_done(events: Iterator[bytes]) -> Iterator[bytes]:
    for event in events:
        yield event
        if event == b"data: [DONE]":
            return


def test_long_streams_are_not_cut(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.tokens = [f" t{i}" for i in range(8)]
    fake_openai.delay = 0.4  # over three seconds of generation, with pauses
    started = time.monotonic()
    conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, CHAT)
    try:
        events = list(sse_events(response))
    finally:
        conn.close()
    assert time.monotonic() - started > 3
    assert events[-1] == b"data: [DONE]"
    assert sum(1 for e in events if b" t" in e) == 8


def test_every_stream_is_metered_whether_or_not_the_client_asked_for_usage(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """Token limits and usage must not depend on the client asking for usage: the agent asks
    its backend and reports the counts (an SSE comment before [DONE]) either way, and the
    client that did not ask gets no usage chunk."""
    dom = one_domain(directory, agents)
    server = proxy()
    with_usage = {**CHAT, "stream_options": {"include_usage": True}}
    usage_chunks = []
    for payload in (with_usage, CHAT):
        conn, response = open_stream(server, f"/{dom.alias}/v1/chat/completions", dom.pat, payload)
        events = [e for e in sse_events(response) if e.startswith(b"data: {")]
        usage_chunks.append(sum(json.loads(e[6:])["choices"] == [] for e in events))
        conn.close()
    assert usage_chunks == [1, 0]
    sent = [r.json() for r in fake_openai.requests_to("/v1/chat/completions")]
    assert [s["stream_options"] for s in sent] == [{"include_usage": True}] * 2
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(11, 4), (11, 4)]
    assert sum(u["prompt_tokens"] for u in directory.usage) == 22


@pytest.fixture
def ollama() -> Iterator[OllamaStandIn]:
    server = OllamaStandIn()
    with serving(server):
        yield server


def test_ollama_native_api_streams_ndjson(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    ollama: OllamaStandIn,
    tmp_path: Path,
) -> None:
    dom = one_domain(
        directory, agents, backend="ollama", backend_url=ollama.url, model_name="llama3.2"
    )
    spec = directory.backend_specs[directory.domains[dom.alias]][0]
    directory.backend_specs[directory.domains[dom.alias]] = [
        spec.__class__(**{**spec.__dict__, "kind": "ollama", "models": ()})
    ]
    server = proxy()
    conn, response = open_stream(
        server,
        f"/{dom.alias}/api/chat",
        dom.member_token,
        {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]},
    )
    try:
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("application/x-ndjson")
        lines = response.read().splitlines()
    finally:
        conn.close()
    objects = [json.loads(line) for line in lines]
    assert "".join(o["message"]["content"] for o in objects) == "".join(OLLAMA_TOKENS)
    assert objects[-1]["done"] is True
    tags = server.get(f"/{dom.alias}/api/tags", token=dom.member_token)
    assert tags.status == 200 and tags.json()["models"]
    server.flush()
    rows = [r for r in directory.audits if r.route == "/api/chat"]
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (
        OLLAMA_FINAL_STATS["prompt_eval_count"],
        OLLAMA_FINAL_STATS["eval_count"],
    )
    # An OpenAI-kind backend is never asked the Ollama API.
    directory.backend_specs[directory.domains[dom.alias]] = [spec]
    assert server.get(f"/{dom.alias}/api/tags", token=dom.member_token).status == 404


# -- the usage scanner -----------------------------------------------------------------------


def test_usage_scanner_whole_bodies() -> None:
    body = b'{"choices":[{"message":{"content":"the \\"usage\\": {\\"prompt_tokens\\": 99}"}}],'
    body += b' "usage": {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details":'
    body += b' {"cached_tokens": 1}}}'
    usage = UsageScanner().whole(body)
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)
    assert not UsageScanner().whole(b'{"usage": null}').known
    assert not UsageScanner().whole(b'{"usage": {"prompt_tokens": "7"}}').known
    ollama = UsageScanner().whole(b'{"done":true,"prompt_eval_count":26,"eval_count":9}')
    assert (ollama.prompt_tokens, ollama.completion_tokens) == (26, 9)


def test_usage_scanner_streams_split_anywhere() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        scanner = UsageScanner()
        scanner.feed(stream[:cut])
        scanner.feed(stream[cut:])
        usage = scanner.finish()
        assert (usage.prompt_tokens, usage.completion_tokens) == (11, 4), cut
    # Cumulative usage repeated per chunk (vLLM's continuous usage): the last one counts.
    scanner = UsageScanner()
    for n in range(1, 5):
        scanner.feed(b'data: {"usage":{"prompt_tokens":5,"completion_tokens":%d}}\n\n' % n)
    assert scanner.finish().completion_tokens == 4


def test_a_stream_without_usage_is_charged_the_records_relayed() -> None:
    """An agent that sends no counts (not a cube agent, or its backend ignored the request
    for them): each SSE data line or NDJSON object relayed counts as one completion token."""
    scanner = UsageScanner()
    for n in range(5):
        scanner.feed(b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % n)
    usage = scanner.charged()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (None, 5, True)
    ndjson = UsageScanner()
    ndjson.feed(b'{"message":{"content":"a"},"done":false}\n{"message":{"content":"b"},')
    ndjson.feed(b'"done":false}\n')
    assert ndjson.charged().completion_tokens == 2
    # With the backend's own counts, those are charged, not the estimate.
    counted = UsageScanner()
    counted.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n')
    assert (counted.charged().completion_tokens, counted.charged().estimated) == (9, False)


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
def test_the_end_of_a_sealed_stream_is_recognised(framing: str) -> None:
    """A client closing right after a sealed stream's end marker got the whole answer (the
    audit row says 200, not 499): the proxy sees the marker by its record kind, which is not
    encrypted."""
    meta = RequestMeta(
        request_id=bytes(16),
        issued_at=0,
        method="POST",
        path="/v1/chat/completions",
        model="cube-tiny",
        response_key=bytes(range(32)),
    )
    sealer = ResponseSealer(meta)
    events = [sealer.event(b'data: {"choices": []}\n\n', framing) for _ in range(3)]  # type: ignore[arg-type]
    usage = usage_record(11, 4, framing)  # type: ignore[arg-type]
    end = sealer.end(framing)  # type: ignore[arg-type]
    for chunk in (*events, usage, b"".join(events) + usage):
        assert not stream_ended(chunk, sealed=True)
    assert stream_ended(end, sealed=True)
    assert stream_ended(events[0] + usage + end, sealed=True)  # several records in one chunk
    assert not stream_ended(end, sealed=False)
    # In a sealed stream, a plaintext [DONE] is nothing (the client refuses plaintext events).
    assert not stream_ended(b"data: [DONE]\n\n", sealed=True)
    assert stream_ended(b"data: [DONE]\n\n", sealed=False)
    assert not stream_ended(b"event: cube-e2e\ndata: !!notbase64\n\n", sealed=True)


@pytest.mark.parametrize("path", ["fast", "aiohttp"])
def test_an_error_after_the_stream_head_cuts_the_stream(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Once a stream's head is out, a failure in the proxy cuts the connection: no 500 written
    into the stream, no clean chunked end (aiohttp's path did both), and the row says 500."""
    fed = 0
    real_feed = UsageScanner.feed

    def failing_feed(self: UsageScanner, chunk: bytes) -> None:
        nonlocal fed
        fed += 1
        if fed == 3:
            raise RuntimeError("injected")
        real_feed(self, chunk)

    monkeypatch.setattr(UsageScanner, "feed", failing_feed)
    dom = one_domain(directory, agents)
    server = proxy()
    fake_openai.tokens = ["tok"] * 10
    fake_openai.delay = 0.02
    body = json.dumps(CHAT).encode()
    framing = (
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        if path == "fast"  # a chunked request body is aiohttp's to read
        else b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"POST /{dom.alias}/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
        f"Authorization: Bearer {dom.pat}\r\nContent-Type: application/json\r\n".encode()
        + framing
    )
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 200 OK") and received.count(b"HTTP/1.1 ") == 1
    assert b"data: " in received and not received.endswith(b"0\r\n\r\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not directory.audits:
        time.sleep(0.05)
        server.flush()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 500


def test_the_end_of_a_plaintext_stream_is_recognised() -> None:
    """OpenAI's ``data: [DONE]``, and Ollama's last NDJSON object (``"done": true``); the same
    words inside a model's text (a JSON string, its quotes escaped) are not an end."""
    assert stream_ended(b'data: {"choices": []}\n\ndata: [DONE]\n\n', sealed=False)
    assert stream_ended(b'{"message":{"content":""},"done":true,"eval_count":9}\n', sealed=False)
    assert stream_ended(b'{"done": true, "done_reason": "stop"}\n', sealed=False)
    assert not stream_ended(b'{"message":{"content":"x"},"done":false}\n', sealed=False)
    text = json.dumps({"message": {"content": 'say "done":true\ndata: [DONE]'}, "done": False})
    assert not stream_ended(text.encode() + b"\n", sealed=False)
    # A tool call's arguments are a JSON object in Ollama's answers: a nested "done" is not
    # the end.
    call = {"function": {"name": "f", "arguments": {"done": True}}}
    tool = json.dumps({"message": {"tool_calls": [call]}, "done": False})
    assert not stream_ended(tool.encode() + b"\n", sealed=False)
