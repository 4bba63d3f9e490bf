"""Fixtures of the client tests: the fake OpenAI backend, in-process agents (simulated SEV-SNP,
the production start-up sequence) and token issuers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.backends import FakeOpenAI, serving
from tests.agent.conftest import ModelDir, write_model
from tests.agent.tokens import TokenIssuer
from tests.client.relay import RecordingRelay
from tests.client.servers import InProcessAgent, start_agent, start_plain_agent

PROMPT = "PROMPT-SECRET-5e1d: tell me a secret"
RESPONSE_TOKENS = ["RESP", "ONSE-", "SECRET", "-8c2f"]
RESPONSE = "".join(RESPONSE_TOKENS)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    with serving(server):
        server.tokens = list(RESPONSE_TOKENS)
        yield server


@pytest.fixture
def model(tmp_path: Path) -> ModelDir:
    return write_model(tmp_path / "model")


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def agent(
    model: ModelDir, tmp_path: Path, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> Iterator[InProcessAgent]:
    running = start_agent(model, tmp_path, issuer, fake_openai.url)
    yield running
    running.stop()


@pytest.fixture
def windowed_agent(
    model: ModelDir, tmp_path: Path, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> Iterator[tuple[InProcessAgent, RecordingRelay]]:
    """An agent behind a TLS-terminating relay presenting the agent's own certificate: the
    relay records exactly the plaintext the agent receives, and the client cannot tell."""
    running = start_plain_agent(model, tmp_path, issuer, fake_openai.url)
    relay = RecordingRelay("127.0.0.1", running.port, server_ssl=running.tls_context()).start()
    yield running, relay
    relay.stop()
    running.stop()
