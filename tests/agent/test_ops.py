"""``/health``, ``/ready``, ``/metrics``, JSON errors and the structured logs (which never carry
tokens, prompts or responses)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.app import create_app
from agent.auth import KeySet, parse_jwks
from agent.evidence_endpoint import EVIDENCE
from agent.ops import JsonFormatter, configure_logging
from attestation.evidence import EvidenceCollector
from attestation.guest import ConfigfsTsm
from attestation.sim import EmulatedConfigfsTsm
from tests.agent.conftest import (
    ModelDir,
    RecordingBackend,
    StartAgent,
    base_config,
)
from tests.agent.tokens import TokenIssuer

PROMPT = "PROMPT-CANARY-91c2 tell me the launch codes"
RESPONSE = "RESPONSE-TEXT-7f3a"
SECRET_MESSAGE = "-".join(("SECRET", "IN", "MESSAGE")) + " " + PROMPT


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of the process, formatted as the agent formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def log_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_health(start_agent: StartAgent) -> None:
    agent = start_agent()
    reply = agent.get("/health")
    assert reply.status == 200 and reply.json() == {"status": "ok"}
    assert reply.headers["Server"] == "cube-agent"


def test_ready_when_backend_lists_the_model_and_evidence_works(
    start_agent: StartAgent, backend: RecordingBackend
) -> None:
    agent = start_agent({"backend_url": backend.url})
    reply = agent.get("/ready")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["status"] == "ready"
    assert body["checks"]["backend"]["ok"] and body["checks"]["evidence"]["ok"]
    assert [r.path for r in backend.requests] == ["/v1/models"]


def test_not_ready_when_the_backend_is_down(start_agent: StartAgent) -> None:
    agent = start_agent()  # nothing listens at its backend_url
    reply = agent.get("/ready")
    assert reply.status == 503
    body = reply.json()
    assert body["error"]["type"] == "not_ready"
    assert body["checks"]["backend"]["ok"] is False
    assert body["checks"]["evidence"]["ok"] is True


def test_not_ready_when_the_backend_does_not_list_the_model(start_agent: StartAgent) -> None:
    other = RecordingBackend(models=("some-other-model",)).start()
    try:
        agent = start_agent({"backend_url": other.url})
        reply = agent.get("/ready")
        assert reply.status == 503
        assert "cube-tiny" in reply.json()["checks"]["backend"]["detail"]
    finally:
        other.stop()


def test_not_ready_when_evidence_cannot_be_obtained(
    start_agent: StartAgent, backend: RecordingBackend
) -> None:
    emulation = EmulatedConfigfsTsm.snp()
    device = ConfigfsTsm(emulation.root, fs=emulation, attempts=2, backoff=0.001)
    agent = start_agent({"backend_url": backend.url}, collector=EvidenceCollector(tee=device))
    assert agent.get("/ready").status == 200  # the start-up collection counts as recent
    emulation.busy = 1000
    agent.app[EVIDENCE].last_success = None  # as if the last success were long ago
    reply = agent.get("/ready")
    assert reply.status == 503
    assert reply.json()["checks"]["evidence"] == {"ok": False, "detail": "the TEE device is busy"}
    assert emulation.busy > 0
    busy_left = emulation.busy
    # Polling again at once does not touch the device (trials are throttled)...
    assert agent.get("/ready").status == 503
    assert emulation.busy == busy_left
    # ...and once the device recovers, the next trial succeeds.
    emulation.busy = 0
    agent.app[EVIDENCE]._last_trial = None
    assert agent.get("/ready").status == 200


def test_metrics_expose_evidence_auth_and_request_counters(
    start_agent: StartAgent, backend: RecordingBackend
) -> None:
    agent = start_agent({"backend_url": backend.url})
    token = agent.token()
    assert agent.get("/attestation?nonce=" + "aa" * 32).status == 200
    assert agent.get("/attestation?nonce=aa").status == 400
    assert agent.post_json("/v1/chat/completions", {"model": "cube-tiny"}).status == 401
    expired = agent.token(exp=1, iat=0, nbf=0)
    assert agent.get("/v1/models", token=expired).status == 401
    assert (
        agent.post_json(
            "/v1/chat/completions",
            {"model": "cube-tiny", "messages": [{"role": "user", "content": PROMPT}]},
            token=token,
        ).status
        == 200
    )
    reply = agent.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    text = reply.body.decode()
    # The start-up trial and the request above.
    assert 'cube_agent_evidence_total{outcome="ok"} 2.0' in text
    assert 'cube_agent_evidence_total{outcome="bad_nonce"} 1.0' in text
    assert 'cube_agent_auth_failures_total{reason="missing"} 1.0' in text
    assert 'cube_agent_auth_failures_total{reason="expired"} 1.0' in text
    assert "cube_agent_requests_total" in text
    for secret in (PROMPT, RESPONSE, token, expired, "user-1"):
        assert secret not in text


def test_logs_carry_no_token_prompt_or_response(
    start_agent: StartAgent, backend: RecordingBackend, captured_logs: io.StringIO
) -> None:
    agent = start_agent({"backend_url": backend.url})
    token = agent.token()
    bad_token = agent.token(aud="elsewhere")
    payload = {"model": "cube-tiny", "messages": [{"role": "user", "content": PROMPT}]}
    ok = agent.post_json(
        "/v1/chat/completions", payload, token=token, headers={"X-Request-Id": "req-abcdef12"}
    )
    assert ok.status == 200 and RESPONSE in ok.body.decode()
    assert ok.headers["X-Request-Id"] == "req-abcdef12"
    refused = agent.post_json("/v1/chat/completions", payload, token=bad_token)
    assert refused.status == 401
    again = agent.post_json("/v1/chat/completions", {**payload, "stream": False}, token=token)
    assert again.status == 200
    assert backend.requests and PROMPT in backend.requests[0].body.decode()  # it did travel

    text = captured_logs.getvalue()
    assert text, "nothing was logged"
    for secret in (PROMPT, "launch codes", RESPONSE, token, bad_token):
        assert secret not in text
    for part in token.split("."):  # not even a piece of it
        assert part not in text
    lines = log_lines(captured_logs)
    access = [entry for entry in lines if entry["logger"] == "cube.agent.access"]
    chat_lines = [entry for entry in access if entry["route"] == "/v1/chat/completions"]
    assert [entry["status"] for entry in chat_lines] == [200, 401, 200]
    first = chat_lines[0]
    assert set(first) >= {"ts", "level", "method", "route", "status", "latency_ms", "request_id"}
    assert first["method"] == "POST" and first["request_id"] == "req-abcdef12"
    assert isinstance(first["latency_ms"], float)
    # An unusable incoming request id is replaced, not logged.
    odd = agent.get("/health", headers={"X-Request-Id": "x y <script>"})
    assert odd.headers["X-Request-Id"] != "x y <script>" and len(odd.headers["X-Request-Id"]) == 32
    assert "<script>" not in captured_logs.getvalue()


def test_routes_are_logged_as_templates_not_raw_paths(
    start_agent: StartAgent, captured_logs: io.StringIO
) -> None:
    agent = start_agent()
    agent.get("/attestation?nonce=" + "cd" * 32)
    agent.get("/no/such/route?secret=shh", token=agent.token())
    access = [e for e in log_lines(captured_logs) if e["logger"] == "cube.agent.access"]
    routes = {(e["route"], e["status"]) for e in access}
    assert ("/attestation", 200) in routes
    assert ("unmatched", 404) in routes
    assert "shh" not in captured_logs.getvalue()
    assert "cd" * 32 not in captured_logs.getvalue()  # the nonce (query) is not logged


def test_errors_are_json(start_agent: StartAgent) -> None:
    agent = start_agent()
    token = agent.token()
    missing = agent.get("/v1/nothing", token=token)
    assert missing.status == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong_method = agent.request("DELETE", "/v1/chat/completions", token=token)
    assert wrong_method.status == 405
    assert wrong_method.json()["error"]["message"]
    assert "POST" in wrong_method.headers["Allow"]


def test_unhandled_errors_are_a_bare_500_and_logged_without_their_message(
    tmp_path: Path, model: ModelDir, captured_logs: io.StringIO
) -> None:
    issuer = TokenIssuer()
    config = base_config(model, issuer.write_jwks(tmp_path / "jwks.json"))
    keys = KeySet(parse_jwks(json.dumps(issuer.jwks()).encode()))

    async def boom(request: web.Request) -> web.Response:
        del request
        raise ValueError(SECRET_MESSAGE)

    async def main() -> None:
        app = create_app(config, keys=keys)
        app.router.add_get("/boom", boom)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/boom", headers=issuer.bearer())
            assert response.status == 500
            assert await response.json() == {
                "error": {"message": "internal error", "type": "server_error"}
            }
            # Public routes work without a collector; /attestation is absent then.
            assert (await client.get("/health")).status == 200
            assert (await client.get("/attestation?nonce=" + "00" * 32)).status == 404

    asyncio.run(main())
    text = captured_logs.getvalue()
    assert "SECRET-IN-MESSAGE" not in text and PROMPT not in text
    errors = [e for e in log_lines(captured_logs) if e["msg"] == "unhandled error"]
    assert errors and errors[0]["exc_type"] == "ValueError" and "boom" in str(errors[0]["stack"])


def test_configure_logging_writes_json_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("warning", stream=stream)
        logging.getLogger("cube.test").warning("hello", extra={"fields": {"k": 1}})
        logging.getLogger("cube.test").info("hidden")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("aiohttp.access").disabled = False
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["msg"] == "hello" and lines[0]["k"] == 1 and lines[0]["level"] == "warning"
