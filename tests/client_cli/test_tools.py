"""The configurations docs/clients.md documents, replayed as those tools send them, against the
real ``cube-proxy`` with a domain, a PAT and a ``cube-agent`` (simulated SEV-SNP) behind it.

- Continue's ``openai`` provider (core/llm/llms/OpenAI.ts): ``apiBase`` gets a trailing slash
  appended (core/llm/index.ts), then ``POST {apiBase}chat/completions`` with ``stream: true``,
  ``Authorization: Bearer <apiKey>`` and ``api-key: <apiKey>``; ``GET {apiBase}models`` lists.
- Continue's ``ollama`` provider (core/llm/llms/Ollama.ts): ``POST {apiBase}api/show`` with
  ``{"name": model}`` when it loads, ``POST {apiBase}api/chat`` with ``options``, ``keep_alive``
  and ``stream: true`` (NDJSON back), ``GET {apiBase}api/tags`` to list models.
- The ``openai`` SDK with nothing but ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` set.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from tests.agent.backends import FakeOpenAI
from tests.client_cli.conftest import Deployment

pytestmark = pytest.mark.slow

PROMPT = "SECRET-TOOL-PROMPT-8d2e: write hello"


def continue_api_base(configured: str) -> str:
    """What Continue does to a configured apiBase before joining endpoint names onto it."""
    return configured if configured.endswith("/") else configured + "/"


def send(
    url: str, method: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, parts.path, data, headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_continue_openai_provider(deployment: Deployment, fake_backend: FakeOpenAI) -> None:
    # config.yaml: provider: openai, apiBase: http://proxy/acme/v1, apiKey: <PAT>
    base = continue_api_base(f"{deployment.domain_url}/v1")
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {deployment.pat}",
        "api-key": deployment.pat,
    }
    status, _, raw = send(urljoin(base, "models"), "GET", None, headers)
    assert status == 200, raw
    assert "cube-tiny" in [m["id"] for m in json.loads(raw)["data"]]

    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "model": "cube-tiny",
        "max_tokens": 4096,
        "stream": True,
    }
    before = len(fake_backend.requests_to("/v1/chat/completions"))
    status, reply_headers, raw = send(urljoin(base, "chat/completions"), "POST", body, headers)
    assert status == 200, raw
    assert reply_headers["Content-Type"].startswith("text/event-stream")
    events = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in map(json.loads, events[:-1])
        if chunk.get("choices")
    )
    assert text == "Hello, world!"
    received = fake_backend.requests_to("/v1/chat/completions")[before:]
    assert len(received) == 1
    assert received[0].json()["messages"] == body["messages"]

    # A wrong key is refused by the proxy before anything reaches the agent.
    status, _, _ = send(
        urljoin(base, "chat/completions"),
        "POST",
        body,
        {**headers, "Authorization": "Bearer cube_pat_wrong", "api-key": "cube_pat_wrong"},
    )
    assert status == 401
    assert len(fake_backend.requests_to("/v1/chat/completions")) == before + 1


def test_continue_ollama_provider(ollama_deployment: Deployment) -> None:
    # config.yaml: provider: ollama, apiBase: http://proxy/acme, apiKey: <PAT>, model: llama3.2
    base = continue_api_base(ollama_deployment.domain_url)
    assert urljoin(base, "api/chat").endswith("/acme/api/chat")  # the domain survives the join
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {ollama_deployment.pat}",
    }

    status, _, raw = send(urljoin(base, "api/tags"), "GET", None, headers)
    assert status == 200, raw
    assert "llama3.2:latest" in [m["name"] for m in json.loads(raw)["models"]]

    status, _, raw = send(urljoin(base, "api/show"), "POST", {"name": "llama3.2"}, headers)
    assert status == 200, raw

    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": PROMPT}],
        "options": {"num_predict": 4096},
        "keep_alive": 1800,
        "stream": True,
    }
    status, reply_headers, raw = send(urljoin(base, "api/chat"), "POST", body, headers)
    assert status == 200, raw
    assert reply_headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    assert lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines)


def test_openai_sdk_from_environment(deployment: Deployment) -> None:
    """``OPENAI_BASE_URL``/``OPENAI_API_KEY`` alone, in a fresh interpreter (what a user's own
    script does): chat, streaming and not."""
    script = (
        "import openai\n"
        "client = openai.OpenAI()\n"
        "m = [{'role': 'user', 'content': 'hi'}]\n"
        "print(client.chat.completions.create(model='cube-tiny', messages=m)"
        ".choices[0].message.content)\n"
        "s = client.chat.completions.create(model='cube-tiny', messages=m, stream=True)\n"
        "print(''.join(c.choices[0].delta.content or '' for c in s if c.choices))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=f"{deployment.domain_url}/v1", OPENAI_API_KEY=deployment.pat)
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Hello, world!", "Hello, world!"]
