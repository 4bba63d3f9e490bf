"""Ollama's native API through the real agent (TLS, JWT auth).

The Ollama server cannot be installed on these machines, so these tests run against
:class:`tests.agent.backends.OllamaStandIn`, a STAND-IN replaying a recording of Ollama's
documented responses (see its docstring). ``test_live_ollama`` runs the same paths against a
real Ollama when ``OLLAMA_URL`` is set, and is skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from agent import forward
from agent.config import AgentConfig
from agent.metrics import METRICS
from agent.ollama import canonical_model, ollama_usage, short_model
from agent.principal import Principal
from tests.agent.backends import (
    OLLAMA_FINAL_STATS,
    OLLAMA_SHOW,
    OLLAMA_TOKENS,
    Gate,
    OllamaStandIn,
    serving,
)
from tests.agent.conftest import RunningAgent, StartAgent

NDJSON = "application/x-ndjson"


@pytest.fixture(scope="module")
def stand_in() -> Iterator[OllamaStandIn]:
    ollama = OllamaStandIn()
    with serving(ollama):
        yield ollama


@pytest.fixture
def ollama(stand_in: OllamaStandIn) -> Iterator[OllamaStandIn]:
    stand_in.reset()
    yield stand_in
    if stand_in.gate is not None:
        stand_in.gate.open()


@pytest.fixture
def agent(start_agent: StartAgent, ollama: OllamaStandIn) -> RunningAgent:
    return start_agent({"backend": "ollama", "backend_url": ollama.url, "model_name": "llama3.2"})


def post(agent: RunningAgent, path: str, payload: Any, token: str | None = None) -> Any:
    body = json.dumps(payload).encode()
    return agent.request("POST", path, body=body, token=token or agent.token())


def ndjson(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.split(b"\n") if line]


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


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}


# ---------------------------------------------------------------------------------------------
# Streaming NDJSON


def test_chat_streams_ndjson_line_by_line(agent: RunningAgent, ollama: OllamaStandIn) -> None:
    ollama.gate = Gate()

    async def main() -> list[bytes]:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            async with session.post("/api/chat", json=CHAT, headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == NDJSON
                first = await asyncio.wait_for(resp.content.readline(), 5)
                # Relayed while the stand-in still holds the rest of its answer.
                assert not ollama.last_sent.is_set()
                assert json.loads(first)["message"]["content"] == OLLAMA_TOKENS[0]
                assert ollama.gate is not None
                ollama.gate.open()
                rest = await asyncio.wait_for(resp.content.read(), 5)
        return [first, *rest.splitlines(keepends=True)]

    lines = [json.loads(line) for line in asyncio.run(main())]
    assert "".join(line["message"]["content"] for line in lines) == "".join(OLLAMA_TOKENS)
    assert [line["done"] for line in lines] == [False] * len(OLLAMA_TOKENS) + [True]
    final = lines[-1]
    assert final["done_reason"] == "stop"
    assert final["eval_count"] == OLLAMA_FINAL_STATS["eval_count"]
    labels = {"model": "llama3.2:latest", "kind": "prompt"}  # one label per model
    assert eventually(
        lambda: (
            metric(agent, "cube_agent_tokens_total", labels)
            == OLLAMA_FINAL_STATS["prompt_eval_count"]
        )
    )
    labels["kind"] = "completion"
    assert metric(agent, "cube_agent_tokens_total", labels) == len(OLLAMA_TOKENS)
    assert (
        metric(agent, "cube_agent_requests_total", {"endpoint": "ollama_chat", "status": "200"})
        == 1
    )


def test_generate_streaming_and_not(agent: RunningAgent, ollama: OllamaStandIn) -> None:
    payload = {"model": "llama3.2", "prompt": "Why is the sky blue?"}
    reply = post(agent, "/api/generate", payload)
    assert reply.status == 200 and reply.headers["Content-Type"] == NDJSON
    lines = ndjson(reply.body)
    assert "".join(line["response"] for line in lines) == "".join(OLLAMA_TOKENS)
    assert lines[-1]["done"] is True and lines[-1]["context"] == [1, 2, 3]
    reply = post(agent, "/api/generate", {**payload, "stream": False})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["response"] == "".join(OLLAMA_TOKENS)
    # The stand-in received the client's bytes, not a re-serialisation.
    assert (
        ollama.requests_to("/api/generate")[-1].body
        == json.dumps({**payload, "stream": False}).encode()
    )


def test_chat_not_streamed(agent: RunningAgent) -> None:
    reply = post(agent, "/api/chat", {**CHAT, "stream": False, "options": {"seed": 101}})
    assert reply.status == 200
    data = reply.json()
    assert data["done"] is True
    assert data["message"] == {"role": "assistant", "content": "".join(OLLAMA_TOKENS)}


def test_stand_in_dying_mid_stream_ends_with_an_error_line(
    agent: RunningAgent, ollama: OllamaStandIn
) -> None:
    ollama.die_after = 3
    reply = post(agent, "/api/chat", CHAT)
    assert reply.status == 200
    lines = ndjson(reply.body)
    assert len(lines) == 4
    assert [line["message"]["content"] for line in lines[:3]] == OLLAMA_TOKENS[:3]
    # Ollama's own error line: {"error": "<text>"} (the ollama client parses it as text).
    assert lines[-1] == {"error": "the backend failed mid-stream", "code": "backend_stream_error"}
    assert len(ollama.requests_to("/api/chat")) == 1


def test_client_disconnect_cancels_the_ollama_request(
    agent: RunningAgent, ollama: OllamaStandIn
) -> None:
    ollama.gate = Gate()

    async def main() -> None:
        async with client(agent) as session:
            headers = {"Authorization": f"Bearer {agent.token()}"}
            resp = await session.post("/api/chat", json=CHAT, headers=headers)
            await asyncio.wait_for(resp.content.readline(), 5)
            resp.close()
        assert await ollama.cancelled.wait_async(5)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Listing, show, embeddings, version


def test_tags_are_filtered_to_the_tokens_models(agent: RunningAgent) -> None:
    reply = agent.get("/api/tags", token=agent.token())
    assert reply.status == 200
    assert [m["name"] for m in reply.json()["models"]] == [
        "llama3.2:latest",
        "codellama:13b",
        "all-minilm:latest",
    ]
    # "llama3.2" in the token is Ollama's "llama3.2:latest".
    reply = agent.get("/api/tags", token=agent.token(scope="inference model:llama3.2"))
    models = reply.json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest"]
    assert models[0]["details"]["parameter_size"] == "3.2B"  # entries relayed whole
    reply = agent.get("/api/ps", token=agent.token(scope="inference model:codellama:13b"))
    assert [m["name"] for m in reply.json()["models"]] == ["codellama:13b"]


def test_show(agent: RunningAgent, ollama: OllamaStandIn) -> None:
    reply = post(agent, "/api/show", {"model": "llama3.2"})
    assert reply.status == 200
    assert reply.json()["details"] == OLLAMA_SHOW["details"]
    assert reply.json()["model_info"]["general.architecture"] == "llama"
    # Older clients name the model with "name"; scopes apply to it too.
    token = agent.token(scope="inference model:llama3.2")
    assert post(agent, "/api/show", {"name": "llama3.2"}, token).status == 200
    assert post(agent, "/api/show", {"name": "codellama:13b"}, token).status == 403
    reply = post(agent, "/api/show", {"model": "llama3.2", "name": "codellama:13b"}, token)
    assert reply.status == 403


def test_embed_and_embeddings(agent: RunningAgent) -> None:
    reply = post(agent, "/api/embed", {"model": "all-minilm", "input": ["a", "b"]})
    assert reply.status == 200
    data = reply.json()
    assert len(data["embeddings"]) == 2 and len(data["embeddings"][0]) == 10
    assert eventually(
        lambda: (
            metric(
                agent, "cube_agent_tokens_total", {"model": "all-minilm:latest", "kind": "prompt"}
            )
            == 16
        )
    )
    reply = post(agent, "/api/embeddings", {"model": "all-minilm", "prompt": "llamas"})
    assert reply.status == 200
    assert len(reply.json()["embedding"]) == 10


def test_version(agent: RunningAgent) -> None:
    reply = agent.get("/api/version", token=agent.token())
    assert reply.status == 200
    assert reply.json() == {"version": "0.5.1"}


# ---------------------------------------------------------------------------------------------
# Scopes, errors, refusals


@pytest.mark.parametrize(
    "spelling",
    ["llama3.2", "llama3.2:latest", "library/llama3.2", "registry.ollama.ai/library/llama3.2"],
)
def test_every_spelling_of_an_allowed_model_is_allowed(agent: RunningAgent, spelling: str) -> None:
    token = agent.token(scope="inference model:llama3.2:latest")
    reply = post(agent, "/api/chat", {**CHAT, "model": spelling, "stream": False}, token)
    assert reply.status != 403, reply.body  # the stand-in itself only knows short names


@pytest.mark.parametrize(
    "name", ["codellama:13b", "llama3.2:1b", "other/llama3.2", "Llama3.2", "llama3.2@sha256:00"]
)
def test_models_outside_the_scope_are_403_whatever_the_spelling(
    agent: RunningAgent, ollama: OllamaStandIn, name: str
) -> None:
    token = agent.token(scope="inference model:llama3.2")
    for path, payload in (
        ("/api/chat", {**CHAT, "model": name}),
        ("/api/generate", {"model": name, "prompt": "x"}),
        ("/api/embed", {"model": name, "input": "x"}),
        ("/api/embeddings", {"model": name, "prompt": "x"}),
        ("/api/show", {"model": name}),
        ("/v1/chat/completions", {**CHAT, "model": name}),
    ):
        reply = post(agent, path, payload, token)
        assert reply.status == 403, (path, reply.body)
        if path.startswith("/api/"):
            assert ollama_error(reply.body)[1] == "model_not_allowed"
        else:  # OpenAI's routes keep OpenAI's shape
            assert json.loads(reply.body)["error"]["code"] == "model_not_allowed"
    assert ollama.received == []


def test_go_case_insensitive_keys_cannot_smuggle_a_model(
    agent: RunningAgent, ollama: OllamaStandIn
) -> None:
    # Go's encoding/json would give "MODEL" to the "model" field (the last match wins).
    token = agent.token(scope="inference model:llama3.2")
    body = b'{"model": "llama3.2", "MODEL": "codellama:13b", "prompt": "x"}'
    reply = agent.request("POST", "/api/generate", body=body, token=token)
    assert reply.status == 400
    assert ollama.received == []


def test_ollama_endpoint_scope(agent: RunningAgent, ollama: OllamaStandIn) -> None:
    token = agent.token(scope="inference endpoint:chat")  # OpenAI chat only
    assert post(agent, "/api/chat", CHAT, token).status == 403
    assert agent.get("/api/tags", token=token).status == 403
    assert agent.get("/api/version", token=token).status == 403
    assert ollama.received == []
    token = agent.token(scope="inference endpoint:ollama")
    assert agent.get("/api/tags", token=token).status == 200


def ollama_error(body: bytes) -> tuple[str, str | None]:
    """(message, code) of an error in Ollama's shape, ``{"error": "<text>", "code": ...}``."""
    document = json.loads(body)
    assert isinstance(document["error"], str), document
    return document["error"], document.get("code")


def test_missing_and_unknown_models(agent: RunningAgent) -> None:
    reply = post(agent, "/api/chat", {"messages": []})
    assert reply.status == 400
    assert ollama_error(reply.body)[1] == "model_required"
    reply = post(agent, "/api/chat", {**CHAT, "model": "mistral"})
    assert reply.status == 404
    assert ollama_error(reply.body)[0] == 'model "mistral" not found, try pulling it first'


def test_model_management_is_refused(agent: RunningAgent, ollama: OllamaStandIn) -> None:
    for method, path in (
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:00"),
    ):
        body = json.dumps({"model": "llama3.2"}).encode()
        reply = agent.request(method, path, body=body, token=agent.token())
        assert reply.status == 403, path
        assert ollama_error(reply.body)[1] == "management_disabled"
    assert ollama.received == []


def test_no_native_routes_for_other_backends(
    start_agent: StartAgent, ollama: OllamaStandIn
) -> None:
    agent = start_agent({"backend": "vllm", "backend_url": ollama.url})
    assert agent.get("/api/tags", token=agent.token()).status == 404
    assert ollama.received == []


# ---------------------------------------------------------------------------------------------
# Ollama's OpenAI-compatible /v1


def test_openai_routes_on_an_ollama_backend(agent: RunningAgent) -> None:
    reply = agent.get("/v1/models", token=agent.token(scope="inference model:llama3.2"))
    assert reply.status == 200
    assert [m["id"] for m in reply.json()["data"]] == ["llama3.2:latest"]
    reply = post(agent, "/v1/chat/completions", CHAT)
    assert reply.status == 200
    data = reply.json()
    assert data["system_fingerprint"] == "fp_ollama"
    assert data["choices"][0]["message"]["content"] == "".join(OLLAMA_TOKENS)
    reply = post(agent, "/v1/chat/completions", {**CHAT, "model": "mistral"})
    assert reply.status == 404
    assert "mistral" in json.loads(reply.body)["error"]["message"]


def test_backend_ready_on_ollama(start_agent: StartAgent, ollama: OllamaStandIn) -> None:
    agent = start_agent({"backend": "ollama", "backend_url": ollama.url, "model_name": "llama3.2"})
    ok, detail = agent.call(forward.backend_ready(agent.app))
    assert ok, detail
    assert ollama.requests_to("/api/tags")
    absent = start_agent({"backend": "ollama", "backend_url": ollama.url, "model_name": "phi3"})
    ok, detail = absent.call(forward.backend_ready(absent.app))
    assert not ok and "phi3" in detail


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "registry.ollama.ai/library/llama3.2:latest"),
        ("llama3.2:latest", "registry.ollama.ai/library/llama3.2:latest"),
        ("library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"),
        (
            "registry.ollama.ai/library/llama3.2:latest",
            "registry.ollama.ai/library/llama3.2:latest",
        ),
        ("codellama:13b", "registry.ollama.ai/library/codellama:13b"),
        ("me/model:q4", "registry.ollama.ai/me/model:q4"),
        ("localhost:5000/me/model", "localhost:5000/me/model:latest"),
        ("m@sha256:ab", "registry.ollama.ai/library/m:latest@sha256:ab"),
        ("Llama3.2", "registry.ollama.ai/library/Llama3.2:latest"),  # case is kept
        ("a/b/c/d", "a/b/c/d"),
    ],
)
def test_canonical_model(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical


def test_model_allowed_with_ollama_names() -> None:
    config = AgentConfig(backend="ollama")
    principal = Principal("u", frozenset({"llama3.2"}), None)
    assert forward.model_allowed(config, principal, "llama3.2:latest")
    assert not forward.model_allowed(config, principal, "llama3.2:1b")


def test_short_model() -> None:
    assert short_model("llama3.2") == "llama3.2:latest"
    assert short_model("registry.ollama.ai/library/llama3.2:latest") == "llama3.2:latest"
    assert short_model("me/model:q4") == "me/model:q4"
    assert short_model("localhost:5000/library/m") == "localhost:5000/library/m:latest"


def test_ollama_usage() -> None:
    final = json.dumps({"done": True, **OLLAMA_FINAL_STATS}).encode()
    assert ollama_usage(b'{"response":"x","done":false}\n' + final + b"\n") == (
        OLLAMA_FINAL_STATS["prompt_eval_count"],
        OLLAMA_FINAL_STATS["eval_count"],
    )
    assert ollama_usage(b'{"response":"eval_count","done":false}\n') is None
    assert ollama_usage(b'{"embeddings":[[0.1]],"prompt_eval_count":8}') == (8, None)


# ---------------------------------------------------------------------------------------------
# A real Ollama, when there is one


def test_live_ollama(start_agent: StartAgent) -> None:
    url = os.environ.get("OLLAMA_URL")
    if not url:
        pytest.skip(
            "OLLAMA_URL is not set: the Ollama server cannot be installed on this machine, so "
            "the Ollama adapter is tested against the documented-API stand-in only; set "
            "OLLAMA_URL=http://127.0.0.1:11434 (and pull a small model) to run this test"
        )
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip(f"OLLAMA_URL must be on loopback (the agent refuses other backends): {url}")
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/api/tags", timeout=10) as resp:
        installed = [m["name"] for m in json.load(resp)["models"]]
    model = os.environ.get("OLLAMA_MODEL") or (installed[0] if installed else "")
    if not model:
        pytest.skip(f"the Ollama at {url} has no model installed (ollama pull a small one)")
    agent = start_agent({"backend": "ollama", "backend_url": url.rstrip("/"), "model_name": model})
    ok, detail = agent.call(forward.backend_ready(agent.app))
    assert ok, detail
    token = agent.token(scope=f"inference model:{model}")
    tags = agent.get("/api/tags", token=token).json()["models"]
    assert [canonical_model(m["name"]) for m in tags] == [canonical_model(model)]
    reply = post(
        agent,
        "/api/chat",
        {**CHAT, "model": model, "options": {"num_predict": 8, "temperature": 0}},
        token,
    )
    assert reply.status == 200 and reply.headers["Content-Type"] == NDJSON
    lines = ndjson(reply.body)
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1
    assert all(line["done"] is False for line in lines[:-1])
    reply = post(
        agent,
        "/api/generate",
        {"model": model, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}},
        token,
    )
    assert reply.status == 200 and reply.json()["done"] is True
    assert post(agent, "/api/show", {"model": model}, token).json()["details"]
    assert "version" in agent.get("/api/version", token=token).json()
    reply = post(agent, "/api/chat", {**CHAT, "model": "cube-no-such-model"})
    assert reply.status == 404
