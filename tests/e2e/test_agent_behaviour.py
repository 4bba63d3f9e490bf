"""The ``cube-agent`` executable in front of the real vLLM: what the backend sees (or does not),
cancellation, readiness, hygiene of logs and metrics, and refusing to start on the wrong weights.

One agent (simulated SEV-SNP), attested and pinned as in test_agent_vllm, serves the module;
vLLM's own Prometheus counters show what reached it.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer
from tests.e2e.attest import attest, make_policy
from tests.e2e.servers import (
    HOST,
    MODEL_NAME,
    AgentProcess,
    PinnedClient,
    TinyModel,
    VllmServer,
    free_port,
    log_tail,
    plain_request,
    sse_events,
)

pytestmark = pytest.mark.slow


@dataclass
class Served:
    agent: AgentProcess
    client: PinnedClient
    issuer: TokenIssuer


@pytest.fixture(scope="module")
def served(
    vllm: VllmServer,
    tiny_model: TinyModel,
    jwks_file: Path,
    token_issuer: TokenIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("agent-behaviour")
    agent = AgentProcess(
        backend_url=vllm.url,
        model=tiny_model,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=workdir / "agent.log",
    )
    policy = make_policy(tiny_model.digest, agent.print_config()["digest"], pcr15=None)
    with agent:
        attest(agent, policy, workdir / "cert.pem")
        yield Served(agent, PinnedClient(agent.port, workdir / "cert.pem"), token_issuer)


def vllm_metrics(vllm: VllmServer) -> dict[str, float]:
    """vLLM's counters and gauges, label sets folded in: {"name{labels}": value}."""
    status, text = plain_request(vllm.port, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in str(text).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def chat(max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def test_ready_and_health_with_the_real_backend(served: Served) -> None:
    assert served.client.request("GET", "/health").status == 200
    ready = served.client.request("GET", "/ready")
    assert ready.status == 200, ready.body[:500]


def test_backend_down_is_503_not_a_hang(
    tiny_model: TinyModel, jwks_file: Path, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    dead = f"http://{HOST}:{free_port()}"  # nothing listens there
    with AgentProcess(
        backend_url=dead,
        model=tiny_model,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=tmp_path / "agent.log",
    ) as agent:
        policy = make_policy(tiny_model.digest, agent.print_config()["digest"], pcr15=None)
        attest(agent, policy, tmp_path / "cert.pem")
        client = PinnedClient(agent.port, tmp_path / "cert.pem")
        assert client.request("GET", "/health").status == 200  # alive...
        assert client.request("GET", "/ready").status == 503  # ...but not ready
        t0 = time.monotonic()
        reply = client.request("POST", "/v1/chat/completions", chat(), token=token_issuer.token())
        assert time.monotonic() - t0 < 10
        assert reply.status == 503
        assert reply.json()["error"]["message"]


def test_refused_requests_never_reach_vllm(
    served: Served, vllm: VllmServer, token_issuer: TokenIssuer
) -> None:
    before = vllm_metrics(vllm)
    cases = [
        (None, 401),  # no token
        (token_issuer.token(exp=int(time.time()) - 60), 401),  # expired
        (token_issuer.token(aud="another-domain"), 401),
        (TokenIssuer().token(), 401),  # signed by a key the agent does not know
        (token_issuer.token(scope="inference model:another-model"), 403),
        (token_issuer.token(scope="inference endpoint:embeddings"), 403),
        (token_issuer.token(scope="profile"), 403),
    ]
    for token, status in cases:
        reply = served.client.request("POST", "/v1/chat/completions", chat(), token=token)
        assert reply.status == status, (status, reply.body[:300])
        error = reply.json()["error"]
        assert error["message"] and error["type"]
    after = vllm_metrics(vllm)
    for name in ("vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert metric(after, name) == metric(before, name), f"{name} moved: vLLM was called"

    # The control: the same request with a valid token does reach vLLM.
    reply = served.client.request(
        "POST", "/v1/chat/completions", chat(), token=token_issuer.token()
    )
    assert reply.status == 200
    assert metric(vllm_metrics(vllm), "vllm:request_success_total") == (
        metric(before, "vllm:request_success_total") + 1
    )


def test_client_disconnect_cancels_the_generation(
    served: Served, vllm: VllmServer, token_issuer: TokenIssuer
) -> None:
    """A client leaving mid-stream makes vLLM drop the request: it stops running long before
    the 2000 tokens it was asked for, and never finishes it (vLLM's own counters say so)."""
    before = vllm_metrics(vllm)
    conn = served.client.connection()
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat(max_tokens=2000, ignore_eos=True, stream=True)),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token_issuer.token()}"},
    )
    response = conn.getresponse()
    assert response.status == 200
    events = sse_events(response)
    for _ in range(5):
        next(events)
    assert metric(vllm_metrics(vllm), "vllm:num_requests_running") == 1
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30  # 2000 tokens take 7-15 s here: it would have finished
    while metric(now := vllm_metrics(vllm), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM is still generating for a client that left"
        time.sleep(0.1)
    finished = metric(now, "vllm:request_success_total", finished_reason="length") - metric(
        before, "vllm:request_success_total", finished_reason="length"
    )
    assert finished == 0, "vLLM generated all 2000 tokens: the upstream request was not cancelled"
    generated = metric(now, "vllm:generation_tokens_total") - metric(
        before, "vllm:generation_tokens_total"
    )
    assert generated < 2000, generated
    # And the agent keeps serving.
    reply = served.client.request(
        "POST", "/v1/chat/completions", chat(), token=token_issuer.token()
    )
    assert reply.status == 200


def test_large_body_with_unknown_fields_reaches_vllm(
    served: Served, token_issuer: TokenIssuer
) -> None:
    """3 MB (over aiohttp's 1 MiB default) of an unknown field: passed through untouched, and
    vLLM (which ignores unknown fields) answers."""
    body = chat(cube_padding="x" * 3_000_000)
    reply = served.client.request("POST", "/v1/chat/completions", body, token=token_issuer.token())
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["usage"]["completion_tokens"] == 8


def test_vllm_errors_come_back_as_json_with_its_status(
    served: Served, token_issuer: TokenIssuer
) -> None:
    too_long = chat(messages=[{"role": "user", "content": "hello " * 3000}])
    reply = served.client.request(
        "POST", "/v1/chat/completions", too_long, token=token_issuer.token()
    )
    assert reply.status == 400
    error = reply.json()["error"]
    assert "maximum context length" in error["message"]

    # /v1/embeddings on the generate runner: vLLM's 404, relayed as a JSON error.
    reply = served.client.request(
        "POST",
        "/v1/embeddings",
        {"model": MODEL_NAME, "input": "hi"},
        token=token_issuer.token(),
    )
    assert reply.status == 404
    assert reply.json()["error"]["message"]


def test_no_prompt_response_or_token_in_logs_or_metrics(
    served: Served, token_issuer: TokenIssuer
) -> None:
    marker = f"cube-private-{secrets.token_hex(8)}"
    token = token_issuer.token()
    reply = served.client.request(
        "POST",
        "/v1/chat/completions",
        chat(max_tokens=16, messages=[{"role": "user", "content": f"my secret is {marker}"}]),
        token=token,
    )
    assert reply.status == 200
    answer = reply.json()["choices"][0]["message"]["content"]
    assert len(answer) > 8
    metrics = served.client.request("GET", "/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    # The agent counted the request and vLLM's token usage...
    assert re.search(r"^cube_agent_\w*tokens\w*\{[^}]*completion[^}]*\} [1-9]", text, re.M), (
        "no completion token counter in /metrics"
    )
    time.sleep(0.2)  # let the access log line land
    log = served.agent.log.read_text(errors="replace")
    assert log.strip(), "the agent logged nothing"
    for secret in (marker, answer, token, token.split(".")[2]):
        assert secret not in text
        assert secret not in log, f"found in the agent's log: {log_tail(served.agent.log, 500)}"


# -- refusing to start --------------------------------------------------------------------------


def refusal(
    tiny_model: TinyModel, jwks_file: Path, log: Path, **kwargs: object
) -> tuple[int, str, int]:
    agent = AgentProcess(
        backend_url=f"http://{HOST}:{free_port()}",
        model=tiny_model,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=log,
        **kwargs,  # type: ignore[arg-type]
    )
    done = agent.run_to_exit()
    with socket.socket() as s:  # and it never listened
        assert s.connect_ex((HOST, agent.port)) != 0
    return done.returncode, done.stderr, agent.port


def test_refuses_to_start_when_the_model_digest_does_not_match(
    tiny_model: TinyModel, jwks_file: Path, tmp_path: Path
) -> None:
    wrong = "sha256:" + "ab" * 32
    rc, stderr, _ = refusal(tiny_model, jwks_file, tmp_path / "a.log", model_digest=wrong)
    assert rc == 1, stderr
    assert "model digest mismatch" in stderr and wrong in stderr
    assert tiny_model.digest in stderr  # what the weights actually are
    assert "Traceback" not in stderr


def test_refuses_to_start_on_tampered_or_extra_weights(
    tiny_model: TinyModel, jwks_file: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "cube-tiny"
    shutil.copytree(tiny_model.path, copy)
    # The untouched copy starts (the control).
    with AgentProcess(
        backend_url=f"http://{HOST}:{free_port()}",
        model=tiny_model,
        model_dir=copy,
        jwks_file=jwks_file,
        issuer=ISSUER,
        audience=AUDIENCE,
        log=tmp_path / "ok.log",
    ):
        pass

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    rc, stderr, _ = refusal(tiny_model, jwks_file, tmp_path / "b.log", model_dir=copy)
    assert rc == 1 and "model.safetensors" in stderr and "does not match" in stderr, stderr

    shutil.rmtree(copy)
    shutil.copytree(tiny_model.path, copy)
    (copy / "extra.py").write_text("print('loaded by trust_remote_code')\n")
    rc, stderr, _ = refusal(tiny_model, jwks_file, tmp_path / "c.log", model_dir=copy)
    assert rc == 1 and "extra.py" in stderr, stderr
