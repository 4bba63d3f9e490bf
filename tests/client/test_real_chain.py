"""The whole chain with real processes: vLLM on the tiny model, the ``cube-agent`` executable
(simulated SEV-SNP), the ``cube-proxy`` executable (SQLite), and the ``openai`` SDK over the
attested transport with end-to-end encryption, streaming and not.

Directly: the answers equal vLLM's own (greedy decoding). Through the proxy: a recording relay
between the client and the proxy finds neither the prompt nor the answer in what the proxy
received or sent; the proxy's log and its audit rows hold neither, while the audit rows still
carry the model and the token counts (metered from the plaintext usage the agent adds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from cube_client import attested_http_client
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer
from tests.client.relay import RecordingRelay
from tests.e2e.attest import make_policy
from tests.e2e.servers import AgentProcess, TinyModel, VllmServer
from tests.proxy.processes import ProxyProcess

pytestmark = pytest.mark.slow
T = TypeVar("T")

PROMPT = "SECRET-PROMPT-a41c: Hello, world!"
REQUEST: dict[str, Any] = {
    "model": "cube-tiny",
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": 12,
    "temperature": 0,
}


def expected_answer(vllm: VllmServer) -> str:
    direct = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="x", max_retries=0)
    answer = direct.chat.completions.create(**REQUEST).choices[0].message.content
    assert answer
    return answer


def chat_both_ways(client: openai.OpenAI) -> tuple[str, str, Any]:
    whole = client.chat.completions.create(**REQUEST)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            **REQUEST, stream=True, stream_options={"include_usage": True}
        )
        if chunk.choices
    )
    return whole.choices[0].message.content or "", streamed, whole.usage


def eventually(probe: Callable[[], T], timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.1)


def test_openai_sdk_direct_to_a_real_agent_encrypted(
    vllm: VllmServer,
    tiny_model: TinyModel,
    jwks_file: Path,
    token_issuer: TokenIssuer,
    tmp_path: Path,
) -> None:
    expected = expected_answer(vllm)
    with AgentProcess(
        backend_url=vllm.url,
        model=tiny_model,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=tmp_path / "agent.log",
    ) as agent:
        policy = make_policy(tiny_model.digest, agent.print_config()["digest"], pcr15=None)
        http = attested_http_client(agent.url, policy)
        client = openai.OpenAI(
            base_url=f"{agent.url}/v1",
            api_key=token_issuer.token(),
            http_client=http,
            max_retries=0,
        )
        whole, streamed, usage = chat_both_ways(client)
        assert whole == expected
        assert streamed == expected
        assert usage is not None and usage.completion_tokens > 0
        attested = http.attested
        assert attested is not None and attested.tls_bound
        assert attested.evidence.claims.model_digest == tiny_model.digest
    log = (tmp_path / "agent.log").read_text()
    assert PROMPT not in log and expected not in log


def test_openai_sdk_through_cube_proxy_encrypted(
    vllm: VllmServer, tiny_model: TinyModel, tmp_path: Path
) -> None:
    expected = expected_answer(vllm)
    database = f"sqlite:///{tmp_path / 'proxy.db'}"
    with ProxyProcess(database, tmp_path / "proxy.log", extra={"log-level": "debug"}) as proxy:
        admin = proxy.login()
        user_id = proxy.admin("GET", "/admin/me", token=admin)["user"]["id"]
        proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        proxy.request(
            "POST",
            "/admin/domains/acme/members",
            {"user_id": user_id, "role": "admin"},
            token=admin,
        )
        jwks = tmp_path / "jwks.json"
        jwks.write_bytes(proxy.request("GET", "/.well-known/jwks.json").body)
        with AgentProcess(
            backend_url=vllm.url,
            model=tiny_model,
            jwks_file=jwks,
            issuer=proxy.url,
            audience="acme",
            log=tmp_path / "agent.log",
        ) as agent:
            digest = agent.print_config()["digest"]
            policy_doc = {
                "format": "cube-policy/1",
                "allow_simulated": True,
                "model_digests": [tiny_model.digest],
                "config_digests": [digest],
            }
            proxy.admin("PUT", "/admin/domains/acme/policy", policy_doc, token=admin)
            proxy.admin(
                "POST",
                "/admin/domains/acme/backends",
                {"url": agent.url, "kind": "vllm", "models": ["cube-tiny"]},
                token=admin,
            )
            pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme"}, token=admin)["token"]
            relay = RecordingRelay("127.0.0.1", proxy.port).start()
            try:
                url = f"{relay.url}/acme"
                client = openai.OpenAI(
                    base_url=f"{url}/v1",
                    api_key=pat,
                    http_client=attested_http_client(
                        url, make_policy(tiny_model.digest, digest, pcr15=None)
                    ),
                    max_retries=0,
                )
                whole, streamed, usage = chat_both_ways(client)
            finally:
                relay.stop()
            assert whole == expected and streamed == expected
            seen = relay.seen()
            assert PROMPT.encode() not in seen
            assert expected.encode() not in seen
            assert b"application/cube-e2e" in relay.to_upstream

            def chat_rows() -> list[dict[str, Any]]:
                audit = proxy.admin("GET", "/admin/domains/acme/audit?event=request", token=admin)
                found = [r for r in audit["audit"] if r["route"] == "/v1/chat/completions"]
                return found if len(found) >= 2 else []

            rows = eventually(chat_rows)
            audit = json.dumps(proxy.admin("GET", "/admin/domains/acme/audit", token=admin))
            assert PROMPT not in audit and expected not in audit
            assert usage is not None
            for row in rows:
                assert row["status"] == 200 and row["model"] == "cube-tiny"
                assert row["prompt_tokens"] == usage.prompt_tokens
                assert row["completion_tokens"] == usage.completion_tokens
        log = proxy.log.read_text()
        assert log  # debug logging was on
        assert PROMPT not in log and expected not in log
