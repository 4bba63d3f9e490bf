"""The real chain: vLLM (CPU build, tiny model) <- ``cube-agent`` (simulated SEV-SNP) <-
``cube-proxy`` (SQLite) <- ``cube verify`` and ``cube chat`` (end-to-end encrypted). The vLLM
fixtures are the session's (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client_cli.conftest import Deployment, deploy, run_cube
from tests.e2e.servers import TinyModel, VllmServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_deployment(
    vllm: VllmServer, tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    yield from deploy(tmp_path_factory.mktemp("real"), vllm.url, model=tiny_model)


def test_verify_and_chat_through_the_proxy(real_deployment: Deployment) -> None:
    env = {"CUBE_API_KEY": real_deployment.pat}
    policy = str(real_deployment.policy)
    verified = run_cube(["verify", real_deployment.domain_url, "--policy", policy], env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert real_deployment.model.digest in verified.stdout
    done = run_cube(
        ["chat", real_deployment.domain_url, "--policy", policy, "--max-tokens", "16"],
        env=env,
        stdin="Hello, world!",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "vLLM answered nothing"
    assert "E2E        ON" in done.stderr


def test_verify_the_agent_directly(real_deployment: Deployment, tmp_path: Path) -> None:
    done = run_cube(
        ["verify", real_deployment.agent.url, "--policy", str(real_deployment.policy), "--json"]
    )
    assert done.returncode == 0, done.stdout
    assert '"tls_bound": true' in done.stdout
