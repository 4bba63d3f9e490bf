# ruff: noqa: F811 - the harness fixtures imported below are parameters
"""Through the proxy (the gateway application in process, real in-process agents with simulated
SEV-SNP, the fake backend): the ``openai`` SDK over the attested transport with end-to-end
encryption, a recording relay between the client and the proxy. Neither the prompt nor the answer
appears in what the proxy received or sent, in its logs, or in its audit rows; plaintext bodies
are refused before they leave; a failed verification sends nothing but the evidence request."""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from attestation.errors import PolicyError
from attestation.policy import Policy
from cube_client import PlaintextRefusedError, attested_http_client, verify_endpoint
from tests.agent.backends import FakeOpenAI
from tests.client.conftest import PROMPT, RESPONSE
from tests.client.relay import RecordingRelay
from tests.client.servers import sim_policy
from tests.client.test_transport import attestation_error, requests_seen
from tests.client_cli.conftest import run_cube, self_signed
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    Agents,
    Domain,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    one_domain,
    proxy,
)

MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def deployed(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> Iterator[tuple[ProxyServer, Domain, RecordingRelay]]:
    server = proxy()
    domain = one_domain(directory, agents)
    relay = RecordingRelay("127.0.0.1", server.port).start()
    yield server, domain, relay
    relay.stop()


def client_for(relay: RecordingRelay, domain: Domain, policy: Policy, **kw: Any) -> openai.OpenAI:
    url = f"{relay.url}/{domain.alias}"
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=domain.pat,
        http_client=attested_http_client(url, policy, **kw),
        max_retries=0,
    )


def test_sealed_chat_through_the_proxy_leaks_nothing(
    deployed: tuple[ProxyServer, Domain, RecordingRelay],
    directory: FakeDirectory,
    fake_openai: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, domain, relay = deployed
    caplog.set_level(logging.DEBUG)
    client = client_for(relay, domain, sim_policy())
    reply = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert reply.choices[0].message.content == RESPONSE
    chunks = client.chat.completions.create(
        model="cube-tiny",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == RESPONSE
    # The backend (inside the VM) got the plaintext; nothing outside did.
    assert fake_openai.requests_to("/v1/chat/completions")[-1].json()["messages"] == MESSAGES
    secrets = (PROMPT.encode(), RESPONSE.encode(), b"SECRET")
    for secret in secrets:
        assert secret not in relay.to_upstream, "the proxy received plaintext"
        assert secret not in relay.to_client, "the proxy sent plaintext"
    server.flush()
    audit = repr(directory.audits) + json.dumps(directory.usage, default=str)
    logs = caplog.text
    for secret in ("PROMPT-SECRET", "SECRET-8c2f", RESPONSE):
        assert secret not in audit
        assert secret not in logs
    posts = [x for x in requests_seen(relay) if x.startswith(b"POST")]
    assert posts == [b"POST /acme/v1/chat/completions HTTP/1.1"] * 2
    assert requests_seen(relay)[0].startswith(b"GET /acme/attestation?nonce=")


def test_a_sealed_answers_status_changed_on_the_way_is_refused(
    deployed: tuple[ProxyServer, Domain, RecordingRelay],
) -> None:
    """Whoever relays a sealed answer cannot turn it into an error (the SDK would retry, and
    the agent infer again) or an error into an answer: the status is sealed with the body."""
    _, domain, relay = deployed
    client = client_for(relay, domain, sim_policy())
    assert client.chat.completions.create(model="cube-tiny", messages=MESSAGES).choices
    relay.rewrite_to_client = lambda data: data.replace(
        b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 503 Service Unavailable\r\n"
    )
    with pytest.raises(Exception) as info:  # which one: checked below
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    error = attestation_error(info.value)
    assert getattr(error, "code", None) == "e2e_status_mismatch"
    assert "status 503" in error.message and "sealed 200" in error.message


def test_the_relay_sees_plaintext_without_encryption_direct_control(
    deployed: tuple[ProxyServer, Domain, RecordingRelay],
) -> None:
    # Control for the assertions above: a plain request through the same relay is readable.
    server, domain, relay = deployed
    plain = openai.OpenAI(base_url=f"{relay.url}/acme/v1", api_key=domain.pat, max_retries=0)
    assert plain.chat.completions.create(model="cube-tiny", messages=MESSAGES).choices
    assert PROMPT.encode() in relay.to_upstream and b"SECRET" in relay.to_client
    del server


def test_plaintext_bodies_are_refused_through_a_proxy(
    deployed: tuple[ProxyServer, Domain, RecordingRelay], fake_openai: FakeOpenAI
) -> None:
    _, domain, relay = deployed
    client = client_for(relay, domain, sim_policy(), encrypt=False)
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert isinstance(attestation_error(info.value), PlaintextRefusedError)
    assert PROMPT.encode() not in relay.to_upstream
    assert not [x for x in requests_seen(relay) if x.startswith(b"POST")]
    assert not fake_openai.requests_to("/v1/chat/completions")


def test_a_failed_verification_through_the_proxy_sends_nothing(
    deployed: tuple[ProxyServer, Domain, RecordingRelay], fake_openai: FakeOpenAI
) -> None:
    _, domain, relay = deployed
    client = client_for(relay, domain, sim_policy(model_digests=["sha256:" + "11" * 32]))
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model="cube-tiny", messages=MESSAGES, stream=True)
    assert isinstance(attestation_error(info.value), PolicyError)
    lines = requests_seen(relay)
    assert lines and all(x.startswith(b"GET /acme/attestation?nonce=") for x in lines)
    assert PROMPT.encode() not in relay.to_upstream
    assert not fake_openai.requests_to("/v1/chat/completions")


def test_verify_endpoint_through_the_proxy(
    deployed: tuple[ProxyServer, Domain, RecordingRelay],
) -> None:
    _, domain, relay = deployed
    attested = verify_endpoint(f"{relay.url}/acme", sim_policy(), api_key=domain.pat)
    assert attested.via_proxy and not attested.tls_bound
    assert attested.peer_cert_der == b""
    assert attested.agent_id == "acme-agent-1"
    assert attested.hpke_public_key == domain.agent.prepared.identity.hpke_public_key
    check = {c.name: c for c in attested.checks}["tls.certificate"]
    assert check.passed and "proxy" in check.detail
    # The proxy's evidence route wants the domain's credential; the error says what failed.
    with pytest.raises(Exception) as info:
        verify_endpoint(f"{relay.url}/acme", sim_policy())
    assert attestation_error(info.value).exit_code == 7
    assert "401" in str(info.value)


def test_the_proxy_routes_and_meters_sealed_traffic(
    deployed: tuple[ProxyServer, Domain, RecordingRelay], directory: FakeDirectory
) -> None:
    """Contract §3 (the proxy's side): route by Cube-E2E-Model, meter from Cube-Usage and the
    cube-usage stream event."""
    server, domain, relay = deployed
    client = client_for(relay, domain, sim_policy())
    client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    chunks = client.chat.completions.create(
        model="cube-tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == RESPONSE
    # The stream's exchange ends when the agent's chunked stream does, which can be just
    # after the client read the end marker and returned.
    deadline = time.monotonic() + 10
    while True:
        server.flush()
        rows = [a for a in directory.audits if a.route == "/v1/chat/completions"]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) == 2
    for row in rows:
        assert row.status == 200, row.detail  # a client closing after the end marker: 200
        assert row.model == "cube-tiny"
        assert (row.prompt_tokens, row.completion_tokens) == (11, 4)


def test_an_https_proxy_with_a_private_ca(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The proxy serving HTTPS with a certificate from the deployment's own CA: the client
    verifies the agent through it given ``ca`` / ``--ca``, and refuses the connection without
    (the proxy's certificate is not in the system's trust store)."""
    domain = one_domain(directory, agents)
    cert, key = self_signed(tmp_path, "proxy.cube.test")
    server = proxy(tls=(cert, key))
    url = f"{server.url}/{domain.alias}"
    ca = ssl.create_default_context(cafile=str(cert))
    attested = verify_endpoint(url, sim_policy(), api_key=domain.pat, ca=ca)
    assert attested.via_proxy and attested.agent_id == f"{domain.alias}-agent-1"
    client = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=domain.pat,
        http_client=attested_http_client(url, sim_policy(), ca=ca),
        max_retries=0,
    )
    answer = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
    assert answer.choices[0].message.content == RESPONSE
    with pytest.raises(Exception) as info:
        verify_endpoint(url, sim_policy(), api_key=domain.pat)
    assert attestation_error(info.value).exit_code == 7
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"format": "cube-policy/1", "allow_simulated": True}))
    args = [url, "--policy", str(policy_file), "--api-key", domain.pat]
    done = run_cube(["verify", *args, "--ca", str(cert)])
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_cube(["verify", *args])
    assert done.returncode == 7, done.stdout + done.stderr
