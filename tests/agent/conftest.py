"""Fixtures for the agent: a verified model directory, a token issuer, and ``start_agent``.

``start_agent(config_overrides, *, collector=None)`` runs the REAL server (the production
start-up sequence of :mod:`agent.server`: configuration, weights, platform, measurement, keys,
trial evidence; then HTTPS) on a free loopback port, in a background thread with its own event
loop, so synchronous tests and the ``openai`` SDK can call it. It defaults to the simulated
SEV-SNP TEE; it stops every agent it started when the test ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import importlib.util
import json
import os
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from aiohttp import web

from agent.auth import KeySet
from agent.config import AgentConfig
from agent.server import AgentServer, PreparedAgent, free_port, prepare
from attestation.evidence import EvidenceCollector
from cube._loop import new_event_loop
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer
from tests.tpm.test_device import swtpm  # noqa: F401 - the real swtpm fixture, reused

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def tiny_model_module() -> ModuleType:
    """scripts/_tiny_model.py (its manifest helpers need only the standard library)."""
    spec = importlib.util.spec_from_file_location("_tiny_model", ROOT / "scripts/_tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ModelDir:
    path: Path
    digest: str


def write_model(directory: Path, files: Mapping[str, bytes] | None = None) -> ModelDir:
    """A model directory with a ``cube-model.json`` written by make-tiny-model's own helpers."""
    tiny = tiny_model_module()
    directory.mkdir(parents=True, exist_ok=True)
    files = files or {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
        "model.safetensors": hashlib.shake_256(b"weights").digest(256 * 1024),
        "tokenizer.json": b'{"version": "1.0"}\n',
        "sub/extra.bin": b"\x00\x01\x02",
    }
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    hashes = {name: tiny.sha256_file(directory / name) for name in tiny.model_files(directory)}
    manifest = {
        "format": tiny.MANIFEST_FORMAT,
        "name": "cube-tiny",
        "files": hashes,
        "digest": tiny.combined_digest(hashes),
    }
    (directory / tiny.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return ModelDir(directory, manifest["digest"])


@pytest.fixture
def model(tmp_path: Path) -> ModelDir:
    return write_model(tmp_path / "model")


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


def base_config(model: ModelDir, jwks: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        # Nothing listens here unless a test passes a backend's URL.
        "backend_url": f"http://127.0.0.1:{free_port()}",
        "model_name": "cube-tiny",
        "model_dir": str(model.path),
        "model_digest": model.digest,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "jwks_file": str(jwks),
        "tee": "sim-sev-snp",
        "log_level": "debug",
    }
    values.update(overrides)
    return AgentConfig(**values)


def pinned_context(cert_pem: bytes) -> ssl.SSLContext:
    """A client context trusting exactly this certificate (hostname checked)."""
    ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return ctx


def unverified_context() -> ssl.SSLContext:
    """For a client that pins through evidence: it verifies the certificate itself after."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RunningAgent:
    """An agent serving HTTPS on loopback from a background thread."""

    config: AgentConfig
    server: AgentServer
    issuer: TokenIssuer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    workdir: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def prepared(self) -> PreparedAgent:
        return self.server.prepared

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def cert_pem(self) -> bytes:
        """The certificate new connections get (the current one, after any key rotation)."""
        return self.server.rotation.current.cert_pem

    @property
    def cert_der(self) -> bytes:
        return self.server.rotation.current.cert_der

    def ssl_context(self) -> ssl.SSLContext:
        return pinned_context(self.cert_pem)

    def connection(self, *, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, context=self.ssl_context(), timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> Reply:
        conn = self.connection()
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            if body is not None:
                all_headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> Reply:
        return self.request("POST", path, body=json.dumps(payload).encode(), **kwargs)

    def token(self, **kwargs: Any) -> str:
        return self.issuer.token(**kwargs)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the agent's event loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


StartAgent = Callable[..., RunningAgent]


def launch(
    config: AgentConfig,
    issuer: TokenIssuer,
    workdir: Path,
    *,
    collector: EvidenceCollector | None = None,
    keys: KeySet | None = None,
) -> RunningAgent:
    """Run the production start-up sequence and serve, in a background thread, on the event
    loop the configuration names (as ``cube-agent`` does)."""
    loop = new_event_loop(config.event_loop)
    thread = threading.Thread(target=loop.run_forever, name="cube-agent", daemon=True)
    thread.start()

    async def start() -> AgentServer:
        prepared = await prepare(config, collector=collector, keys=keys)
        server = AgentServer(prepared)
        try:
            await server.start()
        except BaseException:
            prepared.close()
            raise
        return server

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        raise
    return RunningAgent(config, server, issuer, loop, thread, workdir)


@pytest.fixture
def start_agent(tmp_path: Path, model: ModelDir, issuer: TokenIssuer) -> Iterator[StartAgent]:
    """``start_agent(config_overrides=None, *, collector=None, keys=None) -> RunningAgent``."""
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    started: list[RunningAgent] = []

    def start(
        config_overrides: Mapping[str, Any] | None = None,
        *,
        collector: EvidenceCollector | None = None,
        keys: KeySet | None = None,
    ) -> RunningAgent:
        config = base_config(model, jwks, **dict(config_overrides or {}))
        agent = launch(config, issuer, tmp_path, collector=collector, keys=keys)
        started.append(agent)
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


def environment_without_agent_vars() -> dict[str, str]:
    """os.environ minus any CUBE_AGENT_* (so CLI tests are not steered by the caller)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CUBE_AGENT_")}


# -- a recording backend ---------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class RecordingBackend:
    """A small OpenAI-shaped server on loopback that records every request it receives.

    A STAND-IN for vLLM where a test needs only to see what reached the backend (or that nothing
    did); the forwarding tests and the vLLM functional tests use the real thing or B's fakes.
    """

    def __init__(self, models: tuple[str, ...] = ("cube-tiny",)) -> None:
        self.models = models
        self.requests: list[Recorded] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body))
        if request.path == "/v1/models":
            return web.json_response(
                {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            )
        if request.path == "/v1/chat/completions":
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": json.loads(body).get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "RESPONSE-TEXT-7f3a"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                }
            )
        return web.json_response({"error": {"message": "not found"}}, status=404)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    def start(self) -> RecordingBackend:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend().start()
    yield server
    server.stop()
