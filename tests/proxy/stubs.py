"""Test-only network pieces for the gateway's attestation tests.

- :class:`TlsRelay`: a loopback TCP endpoint in front of an agent that either passes bytes
  through untouched (``mode = "pass"``: the client sees the agent's own certificate) or plays a
  man in the middle (``mode = "mitm"``: it terminates TLS with its OWN certificate and opens a
  second TLS connection to the agent, relaying plaintext both ways, so the agent's genuine
  evidence reaches the client through it). The mode can change at run time; ``drop()`` closes
  every connection it holds (so clients must reconnect).
- :class:`StubAgent`: an HTTPS server with its own certificate that serves genuine simulated
  evidence naming that certificate, and records what it is sent (to see exactly what the proxy
  forwards), answering a canned body (with ``headers``), or, when ``events`` is set, a stream
  of those SSE events written one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from agent.config import AgentConfig
from agent.identity import AgentIdentity
from attestation.evidence import EvidenceCollector, parse_nonce
from attestation.guest import ConfigfsTsm
from attestation.sim import EmulatedConfigfsTsm
from tests.agent.backends import BackgroundLoop


class TlsRelay:
    def __init__(self, target_port: int, loop: BackgroundLoop) -> None:
        self.target_port = target_port
        self.loop = loop
        self.mode = "pass"
        self.identity = AgentIdentity.generate()  # the interceptor's own certificate
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> TlsRelay:
        self.loop.run(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def drop(self) -> None:
        async def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self.loop.run(close_all())

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        self.loop.run(stop())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.mode == "mitm":
                # Terminate the client's TLS with our own certificate...
                await writer.start_tls(self.identity.ssl_context())
                client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                client.check_hostname = False
                client.verify_mode = ssl.CERT_NONE
                # ...and open our own TLS connection to the real agent.
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target_port, ssl=client
                )
            else:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.transport.abort()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StubAgent:
    """HTTPS + genuine simulated evidence naming its certificate; records requests."""

    loop: BackgroundLoop
    body: bytes = b'{"ok":true}'
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes] | None = None
    seen: list[Seen] = field(default_factory=list)
    evidence_requests: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self.identity = AgentIdentity.generate()
        emulation = EmulatedConfigfsTsm.snp()
        self.collector = EvidenceCollector(tee=ConfigfsTsm(emulation.root, fs=emulation))
        self.config = AgentConfig(
            jwt_issuer="x", jwt_audience="x", model_digest="sha256:" + "00" * 32
        )
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _attestation(self, request: web.Request) -> web.Response:
        self.evidence_requests += 1
        nonce = parse_nonce(request.query["nonce"])
        claims = self.identity.claims(self.config, now=datetime.now(UTC))
        document = await self.collector.acollect(nonce, claims)
        return web.Response(body=document, content_type="application/json")

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path_qs, dict(request.headers), await request.read())
        )
        if self.events is not None:
            stream = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", **self.headers}
            )
            await stream.prepare(request)
            for event in self.events:
                await stream.write(event)
            await stream.write_eof()
            return stream
        return web.Response(
            body=self.body, headers={"Content-Type": self.content_type, **self.headers}
        )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/attestation", self._attestation)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.identity.ssl_context())
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def start(self) -> StubAgent:
        self.loop.run(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.loop.run(self._runner.cleanup())


def header(headers: dict[str, Any], name: str) -> Any:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None
