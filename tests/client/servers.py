"""Agents for the client tests, in process (the production start-up sequence, simulated SEV-SNP)
in front of the fake OpenAI backend: :func:`start_agent` (HTTPS, as in production) and
:func:`start_plain_agent` (plain HTTP on an inner port, for a TLS-terminating
:class:`~tests.client.relay.RecordingRelay` that presents the agent's own certificate and so
records exactly the bytes the agent receives)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.server import AgentServer, prepare
from attestation.policy import Policy
from tests.agent.conftest import ModelDir, base_config
from tests.agent.tokens import TokenIssuer


class PlainAgentServer(AgentServer):
    """The agent application served without TLS (only ever behind a test relay)."""

    def ssl_context(self) -> ssl.SSLContext:
        return None  # type: ignore[return-value]


@dataclass
class InProcessAgent:
    server: AgentServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        """The agent's own server context (its attested certificate and key)."""
        return self.server.prepared.identity.ssl_context()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def _start(server_type: type[AgentServer], config: Any) -> InProcessAgent:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="cube-agent", daemon=True)
    thread.start()

    async def start() -> AgentServer:
        prepared = await prepare(config)
        server = server_type(prepared)
        await server.start()
        return server

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        raise
    return InProcessAgent(server, loop, thread)


def agent_config(
    model: ModelDir, workdir: Path, issuer: TokenIssuer, backend_url: str, **overrides: Any
) -> Any:
    jwks = issuer.write_jwks(workdir / "jwks.json")
    values: dict[str, Any] = {"backend_url": backend_url, "log_level": "warning", **overrides}
    return base_config(model, jwks, **values)


def start_agent(
    model: ModelDir, workdir: Path, issuer: TokenIssuer, backend_url: str, **overrides: Any
) -> InProcessAgent:
    return _start(AgentServer, agent_config(model, workdir, issuer, backend_url, **overrides))


def start_plain_agent(
    model: ModelDir, workdir: Path, issuer: TokenIssuer, backend_url: str, **overrides: Any
) -> InProcessAgent:
    config = agent_config(model, workdir, issuer, backend_url, **overrides)
    return _start(PlainAgentServer, config)


def sim_policy(**extra: Any) -> Policy:
    return Policy.from_json({"format": "cube-policy/1", "allow_simulated": True, **extra})
