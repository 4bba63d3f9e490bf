"""The official ``openai`` Python client, unchanged, against the real agent (HTTPS pinned to the
agent's certificate, a JWT as the API key) in front of the fake OpenAI-shaped backend."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx2
import openai
import pytest

from tests.agent.backends import (
    EMBEDDING_DIMENSIONS,
    PROMPT_TOKENS,
    FakeOpenAI,
    embedding_of,
    serving,
)
from tests.agent.conftest import RunningAgent, StartAgent


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    backend = FakeOpenAI()
    with serving(backend):
        yield backend


@pytest.fixture
def backend(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reset()
    return fake_openai


@pytest.fixture
def agent(start_agent: StartAgent, backend: FakeOpenAI) -> RunningAgent:
    return start_agent({"backend_url": backend.url})


def sdk(agent: RunningAgent, api_key: str | None = None) -> openai.OpenAI:
    """What a user writes: the agent's /v1 as base URL, the JWT as the key, its cert pinned."""
    verify = ssl.create_default_context(cadata=agent.cert_pem.decode())
    return openai.OpenAI(
        base_url=f"{agent.url}/v1",
        api_key=api_key or agent.token(),
        http_client=httpx2.Client(verify=verify),
        max_retries=0,
    )


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


def test_chat(agent: RunningAgent, backend: FakeOpenAI) -> None:
    with sdk(agent) as client:
        completion = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello, world!"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    sent = backend.requests_to("/v1/chat/completions")[0]
    assert sent.json()["messages"] == MESSAGES
    assert "Authorization" not in sent.headers  # the JWT stops at the agent


def test_chat_streaming(agent: RunningAgent, backend: FakeOpenAI) -> None:
    with sdk(agent) as client:
        stream = client.chat.completions.create(
            model="cube-tiny",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(backend.tokens)


def test_completions(agent: RunningAgent) -> None:
    with sdk(agent) as client:
        completion = client.completions.create(model="cube-tiny", prompt="Once upon")
        assert completion.choices[0].text == "Hello, world!"
        stream = client.completions.create(model="cube-tiny", prompt="Once upon", stream=True)
        assert "".join(c.choices[0].text for c in stream) == "Hello, world!"


def test_models(agent: RunningAgent) -> None:
    with sdk(agent) as client:
        assert [m.id for m in client.models.list()] == ["cube-tiny", "other-model"]
    with sdk(agent, agent.token(scope="inference model:other-model")) as client:
        assert [m.id for m in client.models.list()] == ["other-model"]


def test_embeddings(agent: RunningAgent, backend: FakeOpenAI) -> None:
    with sdk(agent) as client:
        # The SDK asks for base64 by default and decodes it itself.
        result = client.embeddings.create(model="cube-tiny", input=["red apple", "green pear"])
        assert [d.embedding for d in result.data] == [
            embedding_of("red apple"),
            embedding_of("green pear"),
        ]
        assert backend.requests_to("/v1/embeddings")[0].json()["encoding_format"] == "base64"
        result = client.embeddings.create(
            model="cube-tiny", input="red apple", encoding_format="float"
        )
        assert result.data[0].embedding == embedding_of("red apple")
    assert len(result.data[0].embedding) == EMBEDDING_DIMENSIONS


def test_errors_map_to_the_sdks_exceptions(agent: RunningAgent, backend: FakeOpenAI) -> None:
    with sdk(agent) as client, pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "no-such-model" in not_found.value.message
    limited = agent.token(scope="inference model:other-model")
    with sdk(agent, limited) as client, pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    with sdk(agent, "not-a-jwt") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    backend.die_after = 3
    with sdk(agent) as client:
        stream = client.chat.completions.create(model="cube-tiny", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="the backend failed mid-stream"):
            list(stream)


def test_backend_down(start_agent: StartAgent) -> None:
    agent = start_agent()
    with sdk(agent) as client, pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert error.value.status_code == 503
