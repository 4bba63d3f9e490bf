"""Real processes on loopback for the client tools: ``cube-agent`` (simulated SEV-SNP) in front of
a fake OpenAI-shaped backend (or vLLM on the tiny model), ``cube-proxy`` over SQLite with a
domain, a user and a PAT, and a man in the middle that terminates TLS with its own certificate.

``cube verify`` and ``cube chat`` run as the installed ``cube`` executable (real exit codes,
real environment), never in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.agent.backends import FakeOpenAI, OllamaStandIn, serving
from tests.agent.conftest import write_model
from tests.agent.tokens import TokenIssuer
from tests.e2e.servers import HOST, AgentProcess, TinyModel, free_port
from tests.proxy.processes import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
#: The simulator's default SEV-SNP launch measurement (attestation/sim/_snp.py).
SIM_MEASUREMENT = hashlib.sha384(b"cube-simulator measurement").hexdigest()


def cube_executable() -> str:
    for candidate in (Path(sys.executable).parent / "cube", ROOT / ".venv/bin/cube"):
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("cube is not installed: run scripts/bootstrap")


def run_cube(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``cube ARGS`` as a user runs it; CUBE_* of the test environment do not leak in."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CUBE_", "OPENAI_"))}
    environment.update(env or {})
    return subprocess.run(
        [cube_executable(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )


def sim_policy(model_digest: str, config_digest: str, **overrides: Any) -> dict[str, Any]:
    """A policy pinning the simulated guest's measurement, the model and the configuration."""
    return {
        "format": "cube-policy/1",
        "description": "pins a SIMULATED guest: for development only",
        "allow_simulated": True,
        "sev_snp": {"measurements": [SIM_MEASUREMENT]},
        "model_digests": [model_digest],
        "config_digests": [config_digest],
        **overrides,
    }


def policy_for(agent: AgentProcess, model_digest: str, path: Path, **overrides: Any) -> Path:
    config_digest = agent.print_config()["digest"]
    path.write_text(json.dumps(sim_policy(model_digest, config_digest, **overrides), indent=2))
    return path


# -- the agent over a fake backend ---------------------------------------------------------------


@dataclass
class LiveAgent:
    agent: AgentProcess
    model: TinyModel
    issuer: TokenIssuer
    backend: FakeOpenAI
    policy: Path  # pins this agent exactly

    @property
    def url(self) -> str:
        return self.agent.url


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    with serving(server):
        yield server


@pytest.fixture(scope="module")
def live_agent(
    fake_backend: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveAgent]:
    tmp = tmp_path_factory.mktemp("agent")
    model = write_model(tmp / "model")
    issuer = TokenIssuer()
    agent = AgentProcess(
        backend_url=fake_backend.url,
        model=TinyModel(model.path, model.digest),
        jwks_file=issuer.write_jwks(tmp / "jwks.json"),
        issuer=issuer.issuer,
        audience=issuer.audience,
        log=tmp / "agent.log",
    )
    policy = policy_for(agent, model.digest, tmp / "policy.json")
    with agent:
        yield LiveAgent(agent, TinyModel(model.path, model.digest), issuer, fake_backend, policy)


# -- a man in the middle -------------------------------------------------------------------------


def self_signed(directory: Path, name: str = "mitm.cube.test") -> tuple[Path, Path]:
    """A certificate and key of our own for 127.0.0.1 (what an interceptor would present)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "mitm.pem"
    key_file = directory / "mitm.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class _LoopServer:
    """A TCP server on its own event loop thread (for relays the synchronous tests start)."""

    port: int

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _serve(self, context: ssl.SSLContext | None) -> None:
        self._thread.start()

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, HOST, self.port, ssl=context)

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class TlsInterceptor(_LoopServer):
    """Terminates the client's TLS with its OWN certificate, opens TLS to the real agent and
    relays the plaintext both ways: what a TLS-inspecting middlebox (or an operator holding a
    CA the client trusts) does. It forwards the agent's genuine evidence unchanged."""

    def __init__(self, target_port: int, directory: Path) -> None:
        super().__init__()
        self.target_port = target_port
        cert, key = self_signed(directory)
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.load_cert_chain(cert, key)
        self.client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_context.check_hostname = False
        self.client_context.verify_mode = ssl.CERT_NONE
        self.connections = 0
        self.relayed_bytes = 0

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                self.relayed_bytes += len(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(
                HOST, self.target_port, ssl=self.client_context, server_hostname=HOST
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> TlsInterceptor:
        self._serve(self.server_context)
        return self


class TcpRecorder(_LoopServer):
    """A plain TCP relay in front of a port that keeps every byte it passes, both ways: what a
    proxy (or anyone on its network) sees of a client's traffic."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.upstream = bytearray()  # client -> target
        self.downstream = bytearray()  # target -> client

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                record += data
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, self.upstream),
            self._pipe(up_reader, writer, self.downstream),
        )

    def __enter__(self) -> TcpRecorder:
        self._serve(None)
        return self


# -- a proxy with one domain ---------------------------------------------------------------------

DOMAIN = "acme"
USER_EMAIL = "dev@cube.test"
USER_PASSWORD = "dev-password-4711-cube"


@dataclass
class Deployment:
    proxy: ProxyProcess
    agent: AgentProcess
    pat: str
    policy: Path
    model: TinyModel

    @property
    def domain_url(self) -> str:
        return f"{self.proxy.url}/{DOMAIN}"


def deploy(
    tmp: Path,
    backend_url: str,
    *,
    kind: str = "vllm",
    model_name: str = "cube-tiny",
    model: TinyModel | None = None,
) -> Iterator[Deployment]:
    """cube-proxy (SQLite) with domain ``acme``, a user with a PAT, and one agent as its backend,
    the domain's policy pinning that agent exactly."""
    if model is None:
        written = write_model(tmp / "model")
        model = TinyModel(written.path, written.digest)
    with ProxyProcess(str(tmp / "proxy.db"), tmp / "proxy.log") as proxy:
        admin = proxy.login()
        jwks = tmp / "proxy-jwks.json"
        jwks.write_bytes(proxy.request("GET", "/.well-known/jwks.json").body)
        user = proxy.admin(
            "POST",
            "/admin/users",
            {"email": USER_EMAIL, "password": USER_PASSWORD},
            token=admin,
        )
        proxy.admin("POST", "/admin/domains", {"alias": DOMAIN}, token=admin)
        proxy.admin(
            "POST",
            f"/admin/domains/{DOMAIN}/members",
            {"user_id": user["id"], "role": "member"},
            token=admin,
        )
        agent = AgentProcess(
            backend_url=backend_url,
            model=model,
            jwks_file=jwks,
            issuer=proxy.url,
            audience=DOMAIN,
            log=tmp / "agent.log",
            extra={"backend": kind, "model-name": model_name},
        )
        policy = policy_for(agent, model.digest, tmp / "policy.json")
        proxy.admin(
            "PUT", f"/admin/domains/{DOMAIN}/policy", json.loads(policy.read_text()), token=admin
        )
        with agent:
            proxy.admin(
                "POST",
                f"/admin/domains/{DOMAIN}/backends",
                {"url": agent.url, "kind": kind, "models": [model_name]},
                token=admin,
            )
            session = proxy.login(USER_EMAIL, USER_PASSWORD)
            pat = proxy.admin("POST", "/admin/tokens", {"domain": DOMAIN}, token=session)
            yield Deployment(proxy, agent, pat["token"], policy, model)


@pytest.fixture(scope="module")
def deployment(
    fake_backend: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    yield from deploy(tmp_path_factory.mktemp("deploy"), fake_backend.url)


@pytest.fixture(scope="module")
def ollama_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The same, with an Ollama-kind backend: the STAND-IN replaying Ollama's recorded API
    (tests/agent/backends.py), since Ollama itself cannot be installed here."""
    server = OllamaStandIn()
    with serving(server):
        yield from deploy(
            tmp_path_factory.mktemp("deploy-ollama"),
            server.url,
            kind="ollama",
            model_name="llama3.2",
        )
