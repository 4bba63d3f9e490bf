"""End to end with real processes on loopback: the ``cube-proxy`` executable over SQLite or
PostgreSQL (the database-backed directory, the admin API), ``cube-agent`` executables with the
simulated SEV-SNP TEE, a fake OpenAI-shaped backend (and, in one test, vLLM on the tiny model),
and the ``openai`` SDK as the client."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from tests.agent.backends import FakeOpenAI, serving
from tests.agent.conftest import write_model
from tests.e2e.servers import AgentProcess, TinyModel, VllmServer
from tests.proxy.processes import ProxyProcess

pytestmark = pytest.mark.slow
T = TypeVar("T")

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "SECRET-PROMPT-31c7: say hello"}
]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    with serving(server):
        yield server


def sim_policy(**extra: Any) -> dict[str, Any]:
    return {"format": "cube-policy/1", "allow_simulated": True, **extra}


class Deployment:
    """A proxy with two domains (acme: alice; beta: bob), each with its own agent."""

    def __init__(self, proxy: ProxyProcess, tmp: Path, backend_url: str) -> None:
        self.proxy = proxy
        self.tmp = tmp
        self.admin = proxy.login()
        model = write_model(tmp / "model")
        self.model = TinyModel(model.path, model.digest)
        self.jwks = tmp / "proxy-jwks.json"
        self.jwks.write_bytes(proxy.request("GET", "/.well-known/jwks.json").body)
        self.issuer = proxy.url
        self.users: dict[str, str] = {}
        self.sessions: dict[str, str] = {}
        for name in ("alice", "bob"):
            user = proxy.admin(
                "POST",
                "/admin/users",
                {"email": f"{name}@cube.test", "password": f"{name}-password-123456"},
                token=self.admin,
            )
            self.users[name] = user["id"]
        self.agents: dict[str, AgentProcess] = {}
        for alias, owner in (("acme", "alice"), ("beta", "bob")):
            proxy.admin("POST", "/admin/domains", {"alias": alias}, token=self.admin)
            proxy.admin(
                "POST",
                f"/admin/domains/{alias}/members",
                {"user_id": self.users[owner], "role": "admin"},
                token=self.admin,
            )
            proxy.admin("PUT", f"/admin/domains/{alias}/policy", sim_policy(), token=self.admin)
            agent = self.start_agent(alias, backend_url)
            proxy.admin(
                "POST",
                f"/admin/domains/{alias}/backends",
                {"url": agent.url, "kind": "vllm", "models": ["cube-tiny"]},
                token=self.admin,
            )

    def start_agent(
        self, alias: str, backend_url: str, *, port: int | None = None, **extra: str
    ) -> AgentProcess:
        agent = AgentProcess(
            port=port,
            backend_url=backend_url,
            model=self.model,
            jwks_file=self.jwks,
            issuer=self.issuer,
            audience=alias,
            log=self.tmp / f"agent-{alias}-{len(self.agents)}.log",
            extra=extra,
        ).start()
        self.agents[alias] = agent
        return agent

    def session(self, user: str) -> str:
        """A session token of ``user`` (logged in once: password hashing is slow on purpose)."""
        if user not in self.sessions:
            self.sessions[user] = self.proxy.login(f"{user}@cube.test", f"{user}-password-123456")
        return self.sessions[user]

    def pat(self, user: str, domain: str, **fields: Any) -> dict[str, Any]:
        token = self.session(user)
        created: dict[str, Any] = self.proxy.admin(
            "POST", "/admin/tokens", {"domain": domain, **fields}, token=token
        )
        return created

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def deployment(database: str, tmp_path: Path, fake_openai: FakeOpenAI) -> Iterator[Deployment]:
    # One worker: the assertions below count verifications and rate-limit buckets of one
    # process (several workers: see test_workers.py).
    with ProxyProcess(database, tmp_path / "proxy.log", extra={"workers": "1"}) as proxy:
        deployed = Deployment(proxy, tmp_path, fake_openai.url)
        try:
            yield deployed
        finally:
            deployed.close()


def eventually(probe: Callable[[], T], timeout: float = 10) -> T:
    """``probe()`` once it is truthy (audit rows are written in batches, off the request)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.1)


def sdk(proxy: ProxyProcess, base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}{base}", api_key=key, max_retries=0)


def test_openai_sdk_through_cube_proxy_with_audit_and_isolation(
    deployment: Deployment, fake_openai: FakeOpenAI
) -> None:
    proxy = deployment.proxy
    alice_session = deployment.session("alice")
    alice_pat = deployment.pat("alice", "acme", name="ci")
    with sdk(proxy, "/acme/v1", alice_session) as client:
        completion = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello, world!"
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="cube-tiny",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            if chunk.choices
        )
        assert streamed == "Hello, world!"
    with sdk(proxy, "/v1", alice_pat["token"]) as client:  # a PAT names its domain itself
        # What the proxy routes to the domain's agent (registered for cube-tiny), not all its
        # backend has (also other-model): a listed model is one a request may use.
        assert [m.id for m in client.models.list()] == ["cube-tiny"]
        completion = client.chat.completions.create(model="cube-tiny", messages=MESSAGES)
        assert completion.usage is not None and completion.usage.prompt_tokens == 11
    # The caller's credentials never reach the agent's backend; the prompt does, unchanged.
    received = fake_openai.requests_to("/v1/chat/completions")
    assert len(received) == 3
    for request in received:
        assert "authorization" not in {k.lower() for k in request.headers}
        assert request.json()["messages"] == MESSAGES

    # Audit rows, readable by the domain's admins: who, model, status, tokens, evidence.
    def chat_rows() -> list[dict[str, Any]]:
        audit = proxy.admin(
            "GET", "/admin/domains/acme/audit?event=request", token=deployment.admin
        )
        found = [r for r in audit["audit"] if r["route"] == "/v1/chat/completions"]
        return found if len(found) == 3 else []

    rows = eventually(chat_rows)
    audit = proxy.admin("GET", "/admin/domains/acme/audit", token=deployment.admin)
    for row in rows:
        assert row["user_id"] == deployment.users["alice"]
        assert row["status"] == 200 and row["model"] == "cube-tiny"
        assert row["evidence_digest"].startswith("sha256:")
        assert row["backend_id"]
    assert {(r["prompt_tokens"], r["completion_tokens"]) for r in rows} == {(11, 4)}
    assert len({r["evidence_digest"] for r in rows}) == 1  # one verification served them all
    assert "SECRET-PROMPT" not in json.dumps(audit) and "Hello" not in json.dumps(audit)
    usage = proxy.admin("GET", "/admin/domains/acme/usage", token=deployment.admin)
    assert usage["usage"]

    # beta's member sees and reaches nothing of acme's.
    bob_session = deployment.session("bob")
    bob_pat = deployment.pat("bob", "beta")
    for token in (bob_session, bob_pat["token"]):
        reply = proxy.request(
            "POST", "/acme/v1/chat/completions", {"model": "cube-tiny", "messages": []}, token=token
        )
        assert reply.status == 403
        assert proxy.request("GET", "/admin/domains/acme/audit", token=token).status in (403, 404)
    beta = proxy.request("GET", "/beta/v1/models", token=bob_session)
    assert beta.status == 200
    acme_backends = proxy.admin("GET", "/admin/domains/acme/backends", token=deployment.admin)
    assert beta.headers["X-Cube-Agent"] not in {b["id"] for b in acme_backends["backends"]}


def _forge(token: str, **header: Any) -> str:
    head, body, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    fields.update(header)
    new_head = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    return f"{new_head}.{body}.{signature}"


def test_agent_authentication_failures_also_at_the_proxy(
    deployment: Deployment, fake_openai: FakeOpenAI
) -> None:
    proxy = deployment.proxy
    alice = deployment.session("alice")
    revoked = deployment.pat("alice", "acme")
    proxy.admin("DELETE", f"/admin/tokens/{revoked['id']}", token=alice)
    restricted = deployment.pat("alice", "acme", models=["other-model"])
    audit_only = deployment.pat("alice", "acme", actions=["read_audit"])
    head, body, sig = alice.split(".")
    tampered_sig = f"{head}.{body}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"
    cases: dict[str, tuple[str | None, int]] = {
        "no token": (None, 401),
        "not a JWT": ("garbage", 401),
        "bad signature": (tampered_sig, 401),
        "alg none": (_forge(alice, alg="none").rsplit(".", 1)[0] + ".", 401),
        "HS256 confusion": (_forge(alice, alg="HS256"), 401),
        "unknown kid": (_forge(alice, kid="no-such-key"), 401),
        "revoked PAT": (revoked["token"], 401),
        "model outside the PAT's scope": (restricted["token"], 403),
        "PAT without inference": (audit_only["token"], 403),
        "another domain's member": (deployment.session("bob"), 403),
    }
    for name, (token, status) in cases.items():
        reply = proxy.request(
            "POST",
            "/acme/v1/chat/completions",
            {"model": "cube-tiny", "messages": []},
            token=token,
        )
        assert reply.status == status, (name, reply.body)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "code"}, name
        if token is not None:
            assert token not in reply.body.decode(), name
    # The agent's own JWT is not a credential at the proxy either (wrong audience/issuer use).
    forward_like = proxy.request("GET", "/acme/v1/models", token=_forge(alice, typ="at+jwt"))
    assert forward_like.status == 401
    assert fake_openai.received == []


def test_a_policy_set_through_the_admin_api_refuses_a_drifted_agent(
    deployment: Deployment, fake_openai: FakeOpenAI
) -> None:
    proxy = deployment.proxy
    alice = deployment.session("alice")
    agent = deployment.agents["acme"]
    digest = agent.print_config()["digest"]
    proxy.admin(
        "PUT",
        "/admin/domains/acme/policy",
        sim_policy(config_digests=[digest]),
        token=deployment.admin,
    )
    ok = proxy.request(
        "POST", "/acme/v1/chat/completions", {"model": "cube-tiny", "messages": []}, token=alice
    )
    assert ok.status == 200, ok.body
    # The domain's administrators see what the gate relies on (a worker's own view).
    (backend,) = proxy.admin("GET", "/admin/domains/acme/backends", token=alice)["backends"]
    status = backend["status"]
    assert status["state"] == "verified", status
    assert status["evidence"]["digest"] == ok.headers["X-Cube-Evidence"]
    assert status["evidence"]["platform"] == "sim-sev-snp" and "reason" not in status
    # The agent restarts with another configuration (another digest in its evidence).
    agent.stop()
    drifted = deployment.start_agent(
        "acme", fake_openai.url, port=agent.port, **{"evidence-burst": "21"}
    )
    assert drifted.port == agent.port
    refused = proxy.request(
        "POST", "/acme/v1/chat/completions", {"model": "cube-tiny", "messages": []}, token=alice
    )
    assert refused.status == 503
    assert refused.json()["error"]["code"] == "attestation_failed"
    assert "config_digest" in refused.json()["error"]["message"]
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 1
    status = proxy.admin("GET", f"/admin/domains/acme/backends/{backend['id']}", token=alice)[
        "status"
    ]
    assert status["state"] == "refused" and "evidence" not in status, status
    assert status["reason"]["code"] == "attestation_failed"
    assert status["reason"]["message"] == refused.json()["error"]["message"]
    events = eventually(
        lambda: proxy.admin(
            "GET", "/admin/domains/acme/audit?event=attestation_failed", token=deployment.admin
        )["audit"]
    )
    assert "config_digest" in events[0]["detail"]


# -- with vLLM -----------------------------------------------------------------------------------


def test_vllm_through_cube_proxy(vllm: VllmServer, tiny_model: TinyModel, tmp_path: Path) -> None:
    """The whole chain with a real engine: openai SDK -> cube-proxy -> cube-agent -> vLLM on the
    tiny model. Greedy decoding: the proxy's answer equals vLLM's own, and usage is counted."""
    database = f"sqlite:///{tmp_path / 'proxy.db'}"
    with ProxyProcess(database, tmp_path / "proxy.log") as proxy:
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
            policy = sim_policy(model_digests=[tiny_model.digest], config_digests=[digest])
            proxy.admin("PUT", "/admin/domains/acme/policy", policy, token=admin)
            proxy.admin(
                "POST",
                "/admin/domains/acme/backends",
                {"url": agent.url, "kind": "vllm", "models": ["cube-tiny"]},
                token=admin,
            )
            pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme"}, token=admin)["token"]
            request: dict[str, Any] = {
                "model": "cube-tiny",
                "messages": [{"role": "user", "content": "Hello, world!"}],
                "max_tokens": 12,
                "temperature": 0,
            }
            direct = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="x", max_retries=0)
            expected = direct.chat.completions.create(**request).choices[0].message.content
            with sdk(proxy, "/acme/v1", pat) as client:
                answer = client.chat.completions.create(**request)
                assert answer.choices[0].message.content == expected
                streamed = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in client.chat.completions.create(
                        **request, stream=True, stream_options={"include_usage": True}
                    )
                    if chunk.choices
                )
                assert streamed == expected
            assert answer.usage is not None

            def chat_rows() -> list[dict[str, Any]]:
                audit = proxy.admin("GET", "/admin/domains/acme/audit?event=request", token=admin)
                found = [r for r in audit["audit"] if r["route"] == "/v1/chat/completions"]
                return found if len(found) >= 2 else []

            rows = eventually(chat_rows)
            for row in rows:
                assert row["completion_tokens"] == answer.usage.completion_tokens
                assert row["prompt_tokens"] == answer.usage.prompt_tokens
