"""The gateway's test harness: the proxy application on a background event loop, real agents
(the production start-up sequence and TLS server of ``cube-agent``, simulated SEV-SNP) in front
of fake backends, and small synchronous HTTP helpers.

Fixtures (import them into a test module; ``# noqa: F401``): ``directory``, ``fake_openai``,
``agents`` (start/restart agents for a domain), ``proxy`` (start the proxy over the directory).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from aiohttp import web

from agent.config import AgentConfig
from agent.server import free_port
from proxy.app import create_app
from proxy.gateway import GATEWAY, EdgeSite, Gateway, GatewaySettings
from tests.agent.backends import FakeOpenAI, OllamaStandIn, serving
from tests.agent.conftest import ModelDir, RunningAgent, base_config, launch, write_model
from tests.agent.tokens import TokenIssuer
from tests.proxy.fakes import FakeDirectory

T = TypeVar("T")

#: Settings for tests: no caching of directory answers (tests change them), quick retries.
TEST_SETTINGS = GatewaySettings(
    directory_cache_seconds=0,
    auth_cache_seconds=0,
    failure_retry_seconds=30,
    down_seconds=1,
    health_interval=3600,
    discover_agents=False,  # tests count verifications; tests/proxy/test_gateway.py turns it on
    audit_flush_interval=0.01,
    access_log=False,
)


def sim_policy(**overrides: Any) -> bytes:
    """A policy accepting the simulator's evidence (plus ``overrides``)."""
    doc: dict[str, Any] = {"format": "cube-policy/1", "allow_simulated": True}
    doc.update(overrides)
    return json.dumps(doc).encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class ProxyServer:
    """The proxy application on a free loopback port, served from a background loop."""

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cube-proxy", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, auto_decompress=False
        )  # as cube-proxy's (proxy/cli.py)
        await self.runner.setup()
        await EdgeSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context).start()
        self.port = int(self.runner.addresses[0][1])

    def start(self) -> ProxyServer:
        self.thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())
            self.runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    def flush(self) -> None:
        """Wait until every audit row and usage record queued so far is written."""
        self.call(self.gateway.writer.flushed())

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            if json_body is not None:
                body = json.dumps(json_body).encode()
            if body is not None:
                all_headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload: Any, **kwargs: Any) -> Reply:
        return self.request("POST", path, json_body=payload, **kwargs)

    def chat(self, alias: str | None, token: str, **payload: Any) -> Reply:
        body = {"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}], **payload}
        prefix = f"/{alias}" if alias is not None else ""
        return self.post(f"{prefix}/v1/chat/completions", body, token=token)


@dataclass
class Agents:
    """Starts real agents (audience = a domain alias) whose JWKS is the fake signer's."""

    directory: FakeDirectory
    model: ModelDir
    workdir: Path
    backend_url: str
    started: list[RunningAgent] = field(default_factory=list)

    def config(self, audience: str, **overrides: Any) -> AgentConfig:
        jwks = self.directory.signer.write_jwks(self.workdir / "proxy-jwks.json")
        values: dict[str, Any] = {
            "backend_url": self.backend_url,
            "jwt_issuer": self.directory.signer.issuer_url,
            "jwt_audience": audience,
            "log_level": "warning",
        }
        values.update(overrides)
        return base_config(self.model, jwks, **values)

    def start(self, audience: str, **overrides: Any) -> RunningAgent:
        agent = launch(self.config(audience, **overrides), TokenIssuer(), self.workdir)
        self.started.append(agent)
        return agent

    def restart(self, agent: RunningAgent, **overrides: Any) -> RunningAgent:
        """Stop ``agent`` and start a new one on the same port (new keys, new certificate)."""
        agent.stop()
        values = {"port": agent.port, **overrides}
        return self.start(agent.config.jwt_audience, **values)

    def stop_all(self) -> None:
        for agent in reversed(self.started):
            agent.stop()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    with serving(server):
        yield server


@pytest.fixture
def agents(tmp_path: Path, directory: FakeDirectory, fake_openai: FakeOpenAI) -> Iterator[Agents]:
    model = write_model(tmp_path / "model")
    pool = Agents(directory, model, tmp_path, fake_openai.url)
    yield pool
    pool.stop_all()


@pytest.fixture
def proxy(directory: FakeDirectory) -> Iterator[ProxyFactory]:
    started: list[ProxyServer] = []

    def start(
        settings: GatewaySettings = TEST_SETTINGS, *, tls: tuple[Path, Path] | None = None
    ) -> ProxyServer:
        context = None
        if tls is not None:  # serve HTTPS with this certificate and key
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
        server = ProxyServer(create_app(directory, settings=settings), ssl_context=context).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


class ProxyFactory(Protocol):
    """What the ``proxy`` fixture yields: start the proxy over the test's directory."""

    def __call__(
        self, settings: GatewaySettings = ..., *, tls: tuple[Path, Path] | None = ...
    ) -> ProxyServer: ...


@dataclass
class Domain:
    alias: str
    agent: RunningAgent
    member_token: str
    pat: str


def one_domain(
    directory: FakeDirectory,
    agents: Agents,
    alias: str = "acme",
    *,
    policy: bytes | None = None,
    **agent_overrides: Any,
) -> Domain:
    """A domain with one member (a session token and a PAT), its policy and one agent."""
    directory.add_domain(alias, policy=policy if policy is not None else sim_policy())
    directory.add_member(alias, "user-" + alias)
    agent = agents.start(alias, **agent_overrides)
    directory.add_backend(alias, agent.url, backend_id=f"{alias}-agent-1", models=("cube-tiny",))
    return Domain(
        alias,
        agent,
        directory.session_token("user-" + alias),
        directory.pat(alias, "user-" + alias),
    )


@pytest.fixture
def ollama() -> Iterator[OllamaStandIn]:
    """The Ollama API stand-in (Ollama's server cannot run on these machines)."""
    server = OllamaStandIn()
    with serving(server):
        yield server


def ollama_domain(
    directory: FakeDirectory,
    agents: Agents,
    ollama: OllamaStandIn,
    *,
    models: tuple[str, ...] = (),
    alias: str = "acme",
) -> Domain:
    """A domain whose agent fronts the Ollama stand-in (backend kind ``ollama``, registered
    with ``models``: none means any)."""
    dom = one_domain(
        directory, agents, alias, backend="ollama", backend_url=ollama.url, model_name="llama3.2"
    )
    spec = directory.backend_specs[directory.domains[dom.alias]][0]
    directory.backend_specs[directory.domains[dom.alias]] = [
        spec.__class__(**{**spec.__dict__, "kind": "ollama", "models": models})
    ]
    return dom


__all__ = [
    "TEST_SETTINGS",
    "Agents",
    "Domain",
    "ProxyFactory",
    "ProxyServer",
    "Reply",
    "agents",
    "directory",
    "fake_openai",
    "free_port",
    "ollama",
    "ollama_domain",
    "one_domain",
    "proxy",
    "sim_policy",
]
