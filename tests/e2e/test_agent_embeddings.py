"""``/v1/embeddings`` through the agent, with the official ``openai`` client, over the real vLLM.

One vLLM engine has one runner, and the generate runner answers 404 on /v1/embeddings, so this
module asks for the session's second vLLM (``--runner pooling --convert embed``, started lazily
by the ``vllm_embed`` fixture the first time it is requested, once per session).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer
from tests.e2e.attest import attest, make_policy
from tests.e2e.servers import (
    MODEL_NAME,
    AgentProcess,
    PinnedClient,
    TinyModel,
    VllmServer,
    pinned_context,
    plain_request,
)

pytestmark = pytest.mark.slow

HIDDEN_SIZE = 64  # the tiny model's; LAST-token pooling, L2-normalised


@pytest.fixture(scope="module")
def embed_agent(
    vllm_embed: VllmServer,
    tiny_model: TinyModel,
    jwks_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[AgentProcess, Path]]:
    workdir = tmp_path_factory.mktemp("agent-embed")
    agent = AgentProcess(
        backend_url=vllm_embed.url,
        model=tiny_model,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=workdir / "agent.log",
        tee="sim-tdx",
    )
    policy = make_policy(tiny_model.digest, agent.print_config()["digest"], pcr15=None)
    with agent:
        attest(agent, policy, workdir / "cert.pem")
        yield agent, workdir / "cert.pem"


def test_openai_client_embeddings(
    embed_agent: tuple[AgentProcess, Path], vllm_embed: VllmServer, token_issuer: TokenIssuer
) -> None:
    agent, cert = embed_agent
    inputs = ["Hello, world!", "def main():"]
    status, direct = plain_request(
        vllm_embed.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": inputs}
    )
    assert status == 200, direct
    with openai.OpenAI(
        base_url=f"{agent.url}/v1",
        api_key=token_issuer.token(),
        http_client=httpx2.Client(verify=pinned_context(cert)),
        max_retries=0,
    ) as client:
        # The SDK asks for base64 by default and decodes it: exercised unchanged.
        result = client.embeddings.create(model=MODEL_NAME, input=inputs)
        floats = client.embeddings.create(
            model=MODEL_NAME, input=inputs[0], encoding_format="float"
        )
    assert [e.index for e in result.data] == [0, 1]
    for got, want in zip(result.data, direct["data"], strict=True):
        assert len(got.embedding) == HIDDEN_SIZE
        assert math.isclose(math.fsum(x * x for x in got.embedding), 1.0, rel_tol=1e-4)
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(got.embedding, want["embedding"], strict=True)
        )
    assert result.data[0].embedding != result.data[1].embedding
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    assert result.usage.prompt_tokens == direct["usage"]["prompt_tokens"]


def test_embeddings_scope_and_token_are_enforced(
    embed_agent: tuple[AgentProcess, Path], token_issuer: TokenIssuer
) -> None:
    agent, cert = embed_agent
    client = PinnedClient(agent.port, cert)
    body = {"model": MODEL_NAME, "input": "hi"}
    assert client.request("POST", "/v1/embeddings", body).status == 401
    chat_only = token_issuer.token(scope="inference endpoint:chat")
    assert client.request("POST", "/v1/embeddings", body, token=chat_only).status == 403
    allowed = token_issuer.token(scope="inference endpoint:embeddings")
    assert client.request("POST", "/v1/embeddings", body, token=allowed).status == 200
