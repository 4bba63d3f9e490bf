"""``cube verify`` and ``cube chat`` in process (click's runner), against in-process agents: what
the endpoint or its evidence says reaches the terminal with its control characters escaped (an
error message cannot paint a fake ACCEPT); a backend failing mid-answer, an API key HTTP cannot
carry and anything unexpected end in a clear message and an exit code, never a traceback; and
``cube chat`` verifies once, so its banner describes the agent its requests go to."""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import cube_client
from attestation._checks import Checks
from attestation.errors import PolicyError
from attestation.policy import Policy
from cube.chat import chat
from cube.verify_cli import verify
from cube_client import ClientError, verify_endpoint
from tests.agent.backends import FakeOpenAI
from tests.agent.tokens import TokenIssuer
from tests.client.relay import RecordingRelay
from tests.client.servers import InProcessAgent

#: What a hostile endpoint would like the terminal to show: the line above rewritten as ACCEPT.
FORGED = "\x1b[1A\r\x1b[2K\x1b[32mACCEPT\x1b[0m  https://agent.example  (direct to the agent)"
#: The same without a single escape sequence: a line break alone starts a line of its own.
NEW_LINE = "refused\nACCEPT  https://agent.example  (direct to the agent)"


def assert_nothing_forged(output: str) -> None:
    assert "\x1b" not in output and "\r" not in output
    assert not re.search(r"^\s*ACCEPT", output, re.M), output
    assert "\\x1b[32mACCEPT" in output or "\\x0aACCEPT" in output  # shown, escaped


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"format": "cube-policy/1", "allow_simulated": True}))
    return path


def run(command: Any, args: list[str], stdin: str | None = None) -> Result:
    # color=True: click would otherwise strip escape sequences itself, hiding what a terminal
    # receives.
    return CliRunner().invoke(command, args, input=stdin, color=True)


# -- cube verify ----------------------------------------------------------------------------------


@pytest.fixture
def hostile_proxy() -> Iterator[str]:
    """A proxy domain URL whose evidence route answers 500 with terminal escapes and line
    breaks in its error message."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            message = f"{FORGED}\n{NEW_LINE}"
            body = json.dumps({"error": {"message": message}}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/acme"
    server.shutdown()
    server.server_close()


def test_a_servers_error_message_is_escaped_where_it_is_read(hostile_proxy: str) -> None:
    policy = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})
    with pytest.raises(ClientError) as info:
        verify_endpoint(hostile_proxy, policy, timeout=10)
    assert_nothing_forged(info.value.message)


def test_cube_verify_shows_a_servers_error_message_escaped(
    hostile_proxy: str, policy_file: Path
) -> None:
    result = run(verify, [hostile_proxy, "--policy", str(policy_file)])
    assert result.exit_code == 7, result.output
    assert result.output.startswith(f"REJECT  {hostile_proxy}")
    assert_nothing_forged(result.output)


def test_cube_verify_escapes_what_the_evidence_says_in_its_report(
    monkeypatch: pytest.MonkeyPatch, policy_file: Path
) -> None:
    """Text from the evidence (a claim's value in a failed check, the error quoting it) that
    reaches the report by any route is escaped by the report itself."""

    def refusing(url: str, policy: Policy, *, checks: Checks, **kwargs: Any) -> None:
        checks.fail(
            "policy.model_digest",
            PolicyError,
            f"model digest {NEW_LINE} is not accepted",
            expected="sha256:ab",
            actual=FORGED,
        )

    monkeypatch.setattr(cube_client, "verify_endpoint", refusing)
    result = run(verify, ["https://127.0.0.1:9", "--policy", str(policy_file), "--explain"])
    assert result.exit_code == PolicyError.exit_code, result.output
    assert result.output.startswith("REJECT")
    assert_nothing_forged(result.output)


# -- cube chat ------------------------------------------------------------------------------------


def chat_args(url: str, policy_file: Path, token: str) -> list[str]:
    return [url, "--policy", str(policy_file), "--token", token]


def test_cube_chat_shows_a_services_error_and_the_answer_escaped(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI, policy_file: Path
) -> None:
    fake_openai.error = (400, json.dumps({"error": {"message": NEW_LINE}}).encode(), "text/json")
    refused = run(chat, chat_args(agent.url, policy_file, issuer.token()), stdin="hello")
    assert refused.exit_code == 1, refused.output
    assert "cube chat: the service answered 400" in refused.output
    assert_nothing_forged(refused.output)
    fake_openai.error = None
    fake_openai.tokens = ["line one\n", "\tindented ", FORGED]
    answered = run(chat, chat_args(agent.url, policy_file, issuer.token()), stdin="hello")
    assert answered.exit_code == 0, answered.output
    assert "line one\n\tindented " in answered.stdout  # an answer keeps its line breaks and tabs
    assert_nothing_forged(answered.stdout)


def test_cube_chat_when_the_backend_fails_mid_answer(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI, policy_file: Path
) -> None:
    fake_openai.die_after = 2
    result = run(chat, chat_args(agent.url, policy_file, issuer.token()), stdin="hello")
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.exit_code == 1
    assert "cube chat: the service failed while answering" in result.stderr
    assert result.stdout.endswith("\n")  # the partial answer's line is ended


def test_cube_chat_refuses_an_api_key_http_cannot_carry_without_quoting_it(
    agent: InProcessAgent, fake_openai: FakeOpenAI, policy_file: Path
) -> None:
    secret = "SECRET-KEY-abc123"
    result = run(chat, chat_args(agent.url, policy_file, secret + "\n"), stdin="hello")
    assert result.exit_code == 2, result.output
    assert "newline" in result.output and secret not in result.output
    assert fake_openai.requests_to("/v1/chat/completions") == []


def test_cube_chat_turns_an_unexpected_failure_into_a_message(
    agent: InProcessAgent, issuer: TokenIssuer, policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("unexpected")

    monkeypatch.setattr(cube_client.AttestedTransport, "verify", broken)
    result = run(chat, chat_args(agent.url, policy_file, issuer.token()), stdin="hello")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 3
    assert "verification failed (ValueError)" in result.stderr


def test_cube_chat_verifies_once_and_its_banner_is_that_verification(
    windowed_agent: tuple[InProcessAgent, RecordingRelay],
    issuer: TokenIssuer,
    policy_file: Path,
) -> None:
    """A second, separate verification for the requests could reach another agent (behind a
    proxy) than the one the banner describes."""
    _, relay = windowed_agent
    result = run(chat, chat_args(relay.url, policy_file, issuer.token()), stdin="hello")
    assert result.exit_code == 0, result.output
    fetches = re.findall(rb"GET /attestation\?nonce=", bytes(relay.to_upstream))
    assert len(fetches) == 1
    assert b"POST /v1/chat/completions" in relay.to_upstream
    assert "verified   sim-sev-snp" in result.stderr
