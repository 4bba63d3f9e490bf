"""``cube chat`` (the installed executable) non-interactively: ``echo PROMPT | cube chat URL``
prints one streamed answer on stdout and the verification banner on stderr, directly to an agent
and through a proxy domain, end-to-end encrypted by default."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.agent.backends import FakeOpenAI
from tests.client_cli.conftest import (
    Deployment,
    LiveAgent,
    TcpRecorder,
    cube_executable,
    run_cube,
    sim_policy,
)

pytestmark = pytest.mark.slow

PROMPT = "SECRET-CHAT-PROMPT-5a1f: say hello"


def last_prompt(backend: FakeOpenAI) -> str:
    received = backend.requests_to("/v1/chat/completions")
    content: str = received[-1].json()["messages"][-1]["content"]
    return content


def test_direct_end_to_end_encrypted(live_agent: LiveAgent) -> None:
    token = live_agent.issuer.token()
    done = run_cube(
        ["chat", live_agent.url, "--policy", str(live_agent.policy), "--max-tokens", "8"],
        env={"CUBE_API_KEY": token},
        stdin=PROMPT + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello, world!\n"
    banner = done.stderr
    assert "sim-sev-snp  !! SIMULATED" in banner
    assert live_agent.model.digest in banner
    assert "E2E        ON" in banner
    # The agent opened the sealed body: the backend got the prompt, and the token limit.
    assert last_prompt(live_agent.backend) == PROMPT
    assert live_agent.backend.requests_to("/v1/chat/completions")[-1].json()["max_tokens"] == 8


def test_direct_without_encryption(live_agent: LiveAgent) -> None:
    done = run_cube(
        ["chat", live_agent.url, "--policy", str(live_agent.policy), "--no-encrypt"],
        env={"CUBE_API_KEY": live_agent.issuer.token()},
        stdin=PROMPT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello, world!\n"
    assert "E2E        OFF" in done.stderr


def test_refused_endpoint_sends_nothing(live_agent: LiveAgent, tmp_path: Path) -> None:
    policy = tmp_path / "other.json"
    policy.write_text(json.dumps(sim_policy("sha256:" + "cd" * 32, "sha256:" + "ab" * 32)))
    before = len(live_agent.backend.requests_to("/v1/chat/completions"))
    done = run_cube(
        ["chat", live_agent.url, "--policy", str(policy)],
        env={"CUBE_API_KEY": live_agent.issuer.token()},
        stdin=PROMPT,
    )
    assert done.returncode == 5, done.stderr
    assert "model_digest" in done.stderr and done.stdout == ""
    assert len(live_agent.backend.requests_to("/v1/chat/completions")) == before


def test_usage(live_agent: LiveAgent) -> None:
    args = ["chat", live_agent.url, "--policy", str(live_agent.policy)]
    assert run_cube(args, stdin="hi").returncode == 2  # no credential
    assert run_cube(args, env={"CUBE_API_KEY": "x"}, stdin="").returncode == 2  # nothing to send


def test_through_the_proxy_encrypted(deployment: Deployment, fake_backend: FakeOpenAI) -> None:
    # Everything the client sends the proxy, and gets from it, passes the recorder (plain HTTP
    # here: what the proxy itself reads).
    with TcpRecorder(deployment.proxy.port) as wire:
        url = f"http://127.0.0.1:{wire.port}/acme"
        args = ["chat", url, "--policy", str(deployment.policy)]
        done = run_cube(args, env={"CUBE_API_KEY": deployment.pat}, stdin=PROMPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello, world!\n"
    assert "through a proxy domain" in done.stderr
    assert "the proxy forwards ciphertext" in done.stderr
    assert last_prompt(fake_backend) == PROMPT  # the agent opened it; the backend got it
    assert b"application/cube-e2e" in wire.upstream
    assert b"/acme/attestation?nonce=" in wire.upstream
    assert PROMPT.encode() not in wire.upstream  # the proxy saw ciphertext only
    assert b"SECRET-CHAT" not in wire.upstream
    assert b"Hello" not in wire.downstream and b"world" not in wire.downstream
    # Plaintext through the proxy is refused before anything is sent.
    plain = run_cube([*args, "--no-encrypt"], env={"CUBE_API_KEY": deployment.pat}, stdin=PROMPT)
    assert plain.returncode == 2 and "proxy" in plain.stderr


def test_interactive_conversation_on_a_terminal(live_agent: LiveAgent) -> None:
    """On a terminal it is a conversation: two prompts, the second sent with the history."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_")}
    env["CUBE_API_KEY"] = live_agent.issuer.token()
    proc = subprocess.Popen(
        [cube_executable(), "chat", live_agent.url, "--policy", str(live_agent.policy)],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    try:
        os.write(leader, b"first question\nsecond question\n/quit\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    assert out.decode().count("Hello, world!") == 2
    history = live_agent.backend.requests_to("/v1/chat/completions")[-1].json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "first question"
    assert history[1]["content"] == "Hello, world!"
