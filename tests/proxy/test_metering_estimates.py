# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Inference the backend did without reporting counts is still charged: the prompt estimated
from the request's size (a token per 4 bytes) when an answer has no counts (Ollama's legacy
``/api/embeddings``), a client abandons a request, or a stream is cut before its usage."""

from __future__ import annotations

import json
import socket

from proxy.directory import DomainLimits
from proxy.gateway.metering import estimated_prompt_tokens
from tests.agent.backends import FakeOpenAI, Gate, OllamaStandIn
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    ollama,
    ollama_domain,
    one_domain,
    proxy,
)

CHAT = {"model": "cube-tiny", "messages": [{"role": "user", "content": "hi " * 200}]}


def test_legacy_ollama_embeddings_are_charged_an_estimate(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, ollama: OllamaStandIn
) -> None:
    """Its answer has no counts: the prompt is charged as estimated, so token limits hold."""
    dom = ollama_domain(directory, agents, ollama)
    directory.set_limits(dom.alias, DomainLimits(token_tokens_per_minute=1000))
    server = proxy()
    payload = {"model": "llama3.2", "prompt": "x " * 3000}
    first = server.post(f"/{dom.alias}/api/embeddings", payload, token=dom.pat)
    assert first.status == 200 and first.json()["embedding"]
    second = server.post(f"/{dom.alias}/api/embeddings", payload, token=dom.pat)
    assert second.status == 429 and second.header("Retry-After") is not None
    server.flush()
    prompt = estimated_prompt_tokens(len(json.dumps(payload).encode()))
    (row,) = [r for r in directory.audits if r.event == "request" and r.status == 200]
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, None)
    assert row.detail == "prompt tokens estimated from the request's size (no count came)"
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in directory.usage] == [(prompt, 0)]
    # Metadata routes carry no counts and are not charged.
    assert server.post(f"/{dom.alias}/api/show", {"model": "llama3.2"}, token=dom.pat).status in (
        200,
        429,
    )


def test_a_request_the_client_abandons_is_charged_its_prompt(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """The backend took the prompt and generated until the client left: leaving before the
    answer (and its counts) must not make that free."""
    dom = one_domain(directory, agents)
    server = proxy()
    body = json.dumps(CHAT).encode()
    fake_openai.hold = Gate()  # never opened: the answer never comes
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /%s/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (dom.alias.encode(), dom.pat.encode(), len(body), body)
        )
        assert fake_openai.held.wait(10)  # the backend is working on it
    assert fake_openai.cancelled.wait(10)
    server.flush()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 499
    assert (row.prompt_tokens, row.completion_tokens) == (estimated_prompt_tokens(len(body)), None)
    assert [u["prompt_tokens"] for u in directory.usage] == [estimated_prompt_tokens(len(body))]


def test_counts_from_the_backend_are_never_replaced_by_an_estimate(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    assert server.post(f"/{dom.alias}/v1/chat/completions", CHAT, token=dom.pat).status == 200
    # An answer the agent refused (its backend did no work) is not charged.
    refused = server.post(
        f"/{dom.alias}/v1/chat/completions", {**CHAT, "stream": "yes"}, token=dom.pat
    )
    assert refused.status == 400
    server.flush()
    rows = [(r.status, r.prompt_tokens, r.detail) for r in directory.audits if r.event == "request"]
    assert rows[0][0] == 200 and rows[0][1] is not None and rows[0][2] is None
    assert rows[1] == (400, None, None)
    assert len(directory.usage) == 1
