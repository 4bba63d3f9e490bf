# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Ollama's API through the proxy as Ollama's clients use it: model names in every spelling
Ollama reads as one model (``llama3.2`` is ``llama3.2:latest``, the form ``/api/tags`` lists),
and errors in Ollama's shape, ``{"error": "<text>"}`` (the ``ollama`` client raised TypeError
on OpenAI's nested object instead of its ResponseError)."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from tests.agent.backends import OllamaStandIn
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    ollama,
    ollama_domain,
    proxy,
)

CHAT = {"messages": [{"role": "user", "content": "why is the sky blue?"}], "stream": False}


def _error(body: bytes) -> tuple[str, str | None]:
    document = json.loads(body)
    assert isinstance(document["error"], str), document
    return document["error"], document.get("code")


@pytest.mark.parametrize("spelling", ["llama3.2", "llama3.2:latest"])
def test_every_spelling_of_a_model_reaches_it(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    ollama: OllamaStandIn,
    spelling: str,
) -> None:
    """A backend registered for ``llama3.2`` and a credential scoped to ``llama3.2:latest``
    serve the name a client picked from ``/api/tags``, in any spelling of it."""
    dom = ollama_domain(directory, agents, ollama, models=("llama3.2",))
    scoped = directory.pat(dom.alias, "user-acme", models=frozenset({"llama3.2:latest"}))
    server = proxy()
    tags = server.get(f"/{dom.alias}/api/tags", token=scoped)
    assert "llama3.2:latest" in [m["name"] for m in tags.json()["models"]]
    reply = server.post(f"/{dom.alias}/api/chat", {**CHAT, "model": spelling}, token=scoped)
    assert reply.status == 200, reply.body
    assert reply.json()["done"] is True
    # Another model stays out of reach, whatever its spelling.
    other = server.post(f"/{dom.alias}/api/chat", {**CHAT, "model": "llama3.2:1b"}, token=scoped)
    assert other.status in (403, 404)


def test_errors_on_ollama_routes_are_in_ollamas_shape(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, ollama: OllamaStandIn
) -> None:
    dom = ollama_domain(directory, agents, ollama)
    scoped = directory.pat(dom.alias, "user-acme", models=frozenset({"other"}))
    server = proxy()
    # Refused by the proxy (on both front ends: a small body takes the fast path)...
    refused = server.post(f"/{dom.alias}/api/chat", {**CHAT, "model": "llama3.2"}, token=scoped)
    assert refused.status == 403
    assert _error(refused.body) == (
        "this credential may not use the model 'llama3.2'",
        "model_forbidden",
    )
    big = {**CHAT, "model": "llama3.2", "pad": "x" * 2_000_000}
    assert _error(server.post(f"/{dom.alias}/api/chat", big, token=scoped).body)[1] == (
        "model_forbidden"
    )
    unauthenticated = server.post(
        f"/{dom.alias}/api/chat", {**CHAT, "model": "llama3.2"}, token="x"
    )
    assert unauthenticated.status == 401 and _error(unauthenticated.body)[0]
    # ...and by the agent (relayed unchanged).
    pull = server.post(f"/{dom.alias}/api/pull", {"model": "llama3.2"}, token=dom.pat)
    assert pull.status == 403 and _error(pull.body)[1] == "management_disabled"
    # OpenAI's routes keep OpenAI's shape.
    openai = server.post(
        f"/{dom.alias}/v1/chat/completions", {**CHAT, "model": "llama3.2"}, token=scoped
    )
    assert openai.status == 403 and openai.json()["error"]["code"] == "model_forbidden"


def _over_http10(port: int, path: str, body: bytes, token: str) -> tuple[int, bytes]:
    """A request over HTTP/1.0: the fast path hands it to aiohttp's handlers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}"})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_an_outage_on_ollama_routes_is_in_ollamas_shape_on_both_front_ends(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    ollama: OllamaStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dom = ollama_domain(directory, agents, ollama)
    server = proxy()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(directory, "authenticate", down)
    payload = {**CHAT, "model": "llama3.2"}
    fast = server.post(f"/{dom.alias}/api/chat", payload, token=dom.pat)
    status, body = _over_http10(
        server.port, f"/{dom.alias}/api/chat", json.dumps(payload).encode(), dom.pat
    )
    for reply_status, reply_body in ((fast.status, fast.body), (status, body)):
        assert reply_status == 503
        assert _error(reply_body)[1] == "database_unavailable"
