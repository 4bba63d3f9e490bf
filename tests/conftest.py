from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import vectors
from tests.agent.tokens import TokenIssuer
from tests.e2e.servers import TinyModel, VllmServer, ensure_tiny_model, ensure_vllm


@pytest.fixture(scope="session", autouse=True)
def _vectors_present() -> None:
    # Fail loudly rather than skip: a suite that silently skips every vector proves nothing.
    vectors.manifest()


# ------------------------------------------------------------------------------------------
# Real-process fixtures shared by every end-to-end test (tests/e2e, tests/proxy, tests/client…).
# They live here, once, so each real server starts at most once per session: ONE vLLM server
# (generate runner) on the tiny model, a second one (pooling runner, for embeddings) started
# lazily by the first test that needs it, and a token issuer whose JWKS the agents are given.
# Starting vLLM costs 65-100 s on two cores; each is stopped (SIGTERM, then SIGKILL of its process
# group) when the session ends. Only tests marked ``slow`` request them.


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    return ensure_vllm()


@pytest.fixture(scope="session")
def tiny_model(vllm_venv: Path) -> TinyModel:
    # make-tiny-model runs with the vLLM venv's python (numpy, tokenizers): venv first.
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def vllm(
    vllm_venv: Path, tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """vLLM's OpenAI server (generate runner) on the tiny model, shared by the session."""
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VllmServer(vllm_venv, tiny_model, log) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_embed(
    vllm_venv: Path, tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """A second vLLM with the pooling runner: one engine has one runner, and /v1/embeddings is
    404 on the generate one. Started only when a test asks for it."""
    log = tmp_path_factory.mktemp("vllm-embed") / "vllm.log"
    with VllmServer(
        vllm_venv, tiny_model, log, extra_args=["--runner", "pooling", "--convert", "embed"]
    ) as server:
        yield server


@pytest.fixture(scope="session")
def token_issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture(scope="session")
def jwks_file(token_issuer: TokenIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return token_issuer.write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json")
