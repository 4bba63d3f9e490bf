# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""The gateway on loopback: real agents (the production server, TLS, simulated SEV-SNP) in front
of fake OpenAI-shaped backends, behind the proxy application over an in-memory directory.

Covers routing (``/{domain}/v1``, plain ``/v1`` for PATs), the ``openai`` SDK, bodies byte for
byte, the forwarded identity, authentication failures, domain isolation, load balancing and
failover, and the operations endpoints.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from proxy.gateway.agents import Agent
from tests.agent.backends import BackgroundLoop, FakeOpenAI, serving
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
    sim_policy,
)
from tests.proxy.stubs import StubAgent, header

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


def sdk(server: ProxyServer, alias: str | None, key: str) -> openai.OpenAI:
    base = f"{server.url}/{alias}/v1" if alias else f"{server.url}/v1"
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0)


def gateway_agent(server: ProxyServer, backend_id: str) -> Agent:
    return next(a for a in server.gateway.pool.all() if a.id == backend_id)


def test_openai_sdk_through_the_proxy(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    with sdk(server, dom.alias, dom.member_token) as client:
        completion = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello, world!"
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="cube-tiny", messages=MESSAGES, stream=True
            )
            if chunk.choices
        ]
        assert "".join(pieces) == "Hello, world!"
        assert len(pieces) >= 4  # streamed as pieces, not one blob
        ids = [m.id for m in client.models.list()]
        assert "cube-tiny" in ids
    # The PAT works with the plain /v1 base URL (it names its domain itself).
    with sdk(server, None, dom.pat) as client:
        completion = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello, world!"
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 3


def test_response_headers_name_agent_evidence_and_added_time(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    first = server.chat(dom.alias, dom.member_token)
    second = server.chat(dom.alias, dom.member_token)
    assert first.status == second.status == 200
    agent = gateway_agent(server, "acme-agent-1")
    assert agent.trust is not None
    assert second.header("X-Cube-Agent") == "acme-agent-1"
    assert second.header("X-Cube-Evidence") == agent.trust.evidence_digest
    # The first request paid for the verification; later ones only for forwarding.
    added_first = float(first.header("X-Cube-Proxy-Ms") or "nan")
    added_second = float(second.header("X-Cube-Proxy-Ms") or "nan")
    assert added_first > added_second >= 0
    assert added_second < 50
    assert agent.trust.cert_sha256 == dom.agent.prepared.identity.cert_sha256


def test_request_and_response_bodies_pass_byte_for_byte(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    # Odd spacing, key order, escapes and unknown fields: none of it may be normalised.
    sent = (
        b'{ "messages" : [{"content":"caf\\u00e9 \xe2\x9c\x93","role":"user"}],\n'
        b'  "model":"cube-tiny", "x_unknown": {"keep": [1, 2.50, true]}, "temperature":0.0 }'
    )
    reply = server.request(
        "POST", f"/{dom.alias}/v1/chat/completions", token=dom.member_token, body=sent
    )
    assert reply.status == 200, reply.body
    assert fake_openai.requests_to("/v1/chat/completions")[-1].body == sent
    answer = (
        b'{"id":"x",  "object":"chat.completion","choices":[],"weird":"\\u2028\xf0\x9f\x99\x82"}'
    )
    fake_openai.error = (200, answer, "application/json")
    reply = server.request(
        "POST", f"/{dom.alias}/v1/chat/completions", token=dom.member_token, body=sent
    )
    assert reply.status == 200
    assert reply.body == answer


def test_forwarded_identity_is_a_proxy_signed_domain_jwt(
    directory: FakeDirectory, proxy: ProxyFactory
) -> None:
    loop = BackgroundLoop()
    stub = StubAgent(loop).start()
    try:
        directory.add_domain("acme", policy=sim_policy())
        directory.add_member("acme", "user-7")
        directory.add_backend("acme", stub.url, backend_id="stub")
        bearer = directory.session_token("user-7")
        server = proxy()
        reply = server.request(
            "POST",
            "/acme/v1/chat/completions?debug=1",
            token=bearer,
            json_body={"model": "cube-tiny", "messages": []},
            headers={
                "Cookie": "session=abc",
                "X-Forwarded-For": "10.1.2.3",
                "X-Api-Key": "client-secret",
                "X-Custom": "kept",
            },
        )
        assert reply.status == 200, reply.body
        seen = stub.seen[-1]
        assert seen.path == "/v1/chat/completions?debug=1"
        token = header(seen.headers, "Authorization").removeprefix("Bearer ")
        claims = directory.signer.decode(token, audience="acme")
        assert claims["sub"] == "user-7"
        assert claims["iss"] == directory.signer.issuer_url
        assert claims["scope"].split() == ["inference", "model:cube-tiny"]
        assert 0 < claims["exp"] - claims["iat"] <= 60
        # The caller's own credential (and other credentials) never leave the proxy.
        everything = json.dumps(seen.headers)
        for secret in (bearer, "session=abc", "client-secret", "10.1.2.3"):
            assert secret not in everything
        assert header(seen.headers, "X-Custom") == "kept"
        assert header(seen.headers, "X-Request-Id") == reply.header("X-Request-Id")
    finally:
        stub.stop()
        loop.close()


def test_authentication_failures_are_refused_before_any_forwarding(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    directory.add_domain("other", policy=sim_policy())
    directory.add_member("other", "user-other")
    other_pat = directory.pat("other", "user-other")
    revoked = directory.pat(dom.alias, "user-" + dom.alias)
    directory.tokens[revoked].revoked = True
    no_inference = directory.pat(dom.alias, "user-acme", actions=frozenset({"read_audit"}))
    one_model = directory.pat(dom.alias, "user-acme", models=frozenset({"other-model"}))
    outsider = directory.session_token("user-outsider")
    server = proxy()
    path = f"/{dom.alias}/v1/chat/completions"
    body = {"model": "cube-tiny", "messages": []}

    missing = server.post(path, body)
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "missing_token"
    assert (
        missing.header(
            "WWW-Authenticate",
        )
        is not None
    )
    basic = server.post(path, body, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status == 401
    for token, status in (
        ("not-a-token", 401),
        (revoked, 401),
        (other_pat, 403),  # a PAT bound to another domain
        (outsider, 403),  # not a member
        (no_inference, 403),  # a PAT without the inference action
        (one_model, 403),  # a PAT restricted to another model
    ):
        reply = server.post(path, body, token=token)
        assert reply.status == status, (token, reply.body)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert token not in reply.body.decode()
    # A session token must name its domain: plain /v1 is for PATs.
    assert server.post("/v1/chat/completions", body, token=dom.member_token).status == 401
    # An unknown domain looks like one the caller is not a member of.
    assert server.post("/nowhere/v1/chat/completions", body, token=dom.member_token).status == 403
    assert fake_openai.received == []
    assert dom.agent.prepared.metrics.evidence.labels(outcome="ok")._value.get() == 1  # trial only


def test_a_domain_cannot_see_or_reach_another_domains_backends(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    a = one_domain(directory, agents, "alpha")
    second_backend = FakeOpenAI(models=("beta-model",))
    with serving(second_backend):
        b = one_domain(directory, agents, "beta", backend_url=second_backend.url)
        directory.backend_specs[directory.domains["beta"]][0] = directory.backend_specs[
            directory.domains["beta"]
        ][0].__class__(
            id="beta-agent-1",
            domain_id=directory.domains["beta"],
            url=b.agent.url,
            kind="openai",
            models=("beta-model",),
            enabled=True,
        )
        server = proxy()
        # beta's credentials open nothing of alpha's.
        for token in (b.member_token, b.pat):
            assert server.get("/alpha/v1/models", token=token).status == 403
            assert server.chat("alpha", token).status == 403
            assert server.get("/alpha/attestation?nonce=" + "00" * 32, token=token).status == 403
        # beta's own requests reach beta's agent only, also on plain /v1 with its PAT.
        models = server.get("/beta/v1/models", token=b.member_token)
        assert models.status == 200
        assert [m["id"] for m in models.json()["data"]] == ["beta-model"]
        assert models.header("X-Cube-Agent") == "beta-agent-1"
        plain = server.post(
            "/v1/chat/completions", {"model": "beta-model", "messages": []}, token=b.pat
        )
        assert plain.status == 200 and plain.header("X-Cube-Agent") == "beta-agent-1"
        # Asking beta's agents for alpha's model finds nothing to route to.
        assert server.chat("beta", b.member_token).status == 404
        # Even if beta's admin registers alpha's agent URL as a backend, alpha's agent refuses
        # what the proxy forwards for beta: the JWT's audience is beta.
        directory.add_backend("beta", a.agent.url, backend_id="stolen", models=("cube-tiny",))
        stolen = server.chat("beta", b.member_token)
        assert stolen.status == 401
        assert stolen.header("X-Cube-Agent") == "stolen"
        assert fake_openai.requests_to("/v1/chat/completions") == []
        server.flush()
        for row in directory.audits:
            if row.user_id == "user-beta":
                assert row.domain_id == directory.domains["beta"]
        assert a.agent.url  # alpha untouched
        assert second_backend.requests_to("/v1/chat/completions")


def test_load_is_balanced_and_requests_fail_over(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    second = agents.start(dom.alias)
    directory.add_backend(dom.alias, second.url, backend_id="acme-agent-2", models=("cube-tiny",))
    server = proxy()
    served = [server.chat(dom.alias, dom.member_token).header("X-Cube-Agent") for _ in range(8)]
    assert set(served) == {"acme-agent-1", "acme-agent-2"}
    assert abs(served.count("acme-agent-1") - served.count("acme-agent-2")) <= 2
    # One agent goes away: every request still succeeds, on the other.
    second.stop()
    for _ in range(6):
        reply = server.chat(dom.alias, dom.member_token)
        assert reply.status == 200, reply.body
        assert reply.header("X-Cube-Agent") == "acme-agent-1"
    gone = gateway_agent(server, "acme-agent-2")
    assert gone.state(time.monotonic()) == "down"
    assert server.gateway.metrics.failovers._value.get() >= 1
    # With no agent left, the answer says so.
    dom.agent.stop()
    reply = server.chat(dom.alias, dom.member_token)
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "agent_unreachable"


def test_domain_configuration_problems_are_503_with_a_reason(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    del directory.policies[directory.domains[dom.alias]]
    reply = server.chat(dom.alias, dom.member_token)
    assert reply.status == 503 and reply.json()["error"]["code"] == "no_policy"
    directory.set_policy(dom.alias, b'{"format": "cube-policy/1", "surprise": 1}')
    reply = server.chat(dom.alias, dom.member_token)
    assert reply.status == 503 and reply.json()["error"]["code"] == "bad_policy"
    directory.set_policy(dom.alias, sim_policy())
    # A plain-HTTP backend is never used: nothing is forwarded unpinned.
    directory.backend_specs[directory.domains[dom.alias]] = []
    directory.add_backend(dom.alias, fake_openai.url, backend_id="plain", models=("cube-tiny",))
    reply = server.chat(dom.alias, dom.member_token)
    assert reply.status == 503
    assert fake_openai.received == []


def test_operations_endpoints(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready")
    assert ready.status == 200 and ready.json()["checks"]["directory"]["ok"] is True
    assert server.chat(dom.alias, dom.member_token).status == 200
    metrics = server.get("/metrics").body.decode()
    assert 'cube_proxy_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
    assert 'cube_proxy_attestations_total{outcome="verified"} 1.0' in metrics
    assert "cube_proxy_added_milliseconds" in metrics
    assert dom.member_token not in metrics and "acme" not in metrics
    jwks = server.get("/.well-known/jwks.json").json()
    assert jwks == directory.signer.jwks()
    unknown = server.get("/no/such/path")
    assert unknown.status == 404 and "error" in unknown.json()
    assert server.request("DELETE", f"/{dom.alias}/v1/models", token=dom.member_token).status == 405
    reserved = server.get("/admin/v1/models", token=dom.member_token)
    assert reserved.status == 404 and reserved.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("path", ["/acme/v1/../attestation", "/acme/v1/%2e%2e/x"])
def test_path_tricks_are_refused(
    path: str, directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    reply = server.get(path, token=dom.member_token)
    assert reply.status in (400, 404)
