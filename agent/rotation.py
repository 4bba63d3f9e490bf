"""The agent's keys over time: the TLS key and the HPKE key are replaced every
``key_rotate_seconds``, each certificate valid for twice that. A pinned TLS key is never older
than the interval and a leaked one stops working when its certificate expires (verifiers refuse
an expired attested certificate); a leaked HPKE key opens only what was sealed to it while it
was current or just replaced, not everything since the agent started.

TLS. The listening socket keeps one :class:`ssl.SSLContext`; its ``sni_callback`` (which
OpenSSL calls for every ClientHello, with or without SNI) moves each new connection to the
current identity's context and tags the connection with that identity. A connection keeps the
certificate it was handshaken with, and evidence requested over a connection names *that*
certificate (:meth:`KeyRotation.for_connection`): a verifier compares the certificate its
connection presented with the one the claims name, so a rotation between the handshake and the
claims must not make them differ.

HPKE. Evidence always names the current HPKE key. Requests sealed to the key before it still
open (a client that verified just before a rotation); anything older is refused with 421
``e2e_wrong_recipient``, and the client verifies again (agent.e2e keeps the two keys).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from agent.identity import AgentIdentity
from cube._tasks import cancel_and_wait

__all__ = ["KEY_ROTATION", "KeyRotation", "validity_for"]

log = logging.getLogger("cube.agent.rotation")

_TAG = "cube_identity"  # the attribute naming a connection's identity on its SSLObject
#: A rotation that failed is tried again after this long (never later than the interval).
_RETRY_SECONDS = 60.0


def validity_for(rotate_seconds: float) -> timedelta:
    """A certificate outlives its replacement by one interval: connections made just before a
    rotation, and pins taken then, stay valid while verifiers move to the new one."""
    return timedelta(seconds=2 * rotate_seconds)


class KeyRotation:
    """The current identity, the server context, and the rotation task."""

    def __init__(
        self,
        identity: AgentIdentity,
        *,
        names: Sequence[str] = (),
        rotate_seconds: float,
        on_rotate: Callable[[AgentIdentity], None] | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.current = identity
        self.names = tuple(names)
        self.rotate_seconds = rotate_seconds
        self.rotations = 0
        self._on_rotate = on_rotate
        self._wall_clock = wall_clock
        self._server = identity.ssl_context()
        self._server.sni_callback = self._choose
        self._current_context = self._server
        self._task: asyncio.Task[None] | None = None

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with (it hands each connection the current identity)."""
        return self._server

    def _choose(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        del server_name
        if context is not self._current_context:
            connection.context = self._current_context
        setattr(connection, _TAG, self.current)

    def for_connection(self, transport: asyncio.BaseTransport | None) -> AgentIdentity:
        """The identity whose certificate ``transport``'s client received (the current one for
        a connection without TLS: tests on the aiohttp test client)."""
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        identity = getattr(ssl_object, _TAG, None)
        return identity if isinstance(identity, AgentIdentity) else self.current

    def _next(self) -> tuple[AgentIdentity, ssl.SSLContext]:
        identity = AgentIdentity.generate(
            self.names, validity=validity_for(self.rotate_seconds), now=self._wall_clock()
        )
        return identity, identity.ssl_context()

    async def rotate(self) -> AgentIdentity:
        """Replace both keys now (key generation off the event loop)."""
        identity, context = await asyncio.to_thread(self._next)
        # One step on the loop thread, where handshakes also run: no connection sees one
        # without the other.
        self.current, self._current_context = identity, context
        self.rotations += 1
        if self._on_rotate is not None:
            self._on_rotate(identity)
        log.info(
            "keys rotated",
            extra={
                "fields": {
                    "tls_cert_sha256": identity.cert_sha256.hex(),
                    "not_valid_after": identity.not_valid_after.isoformat(),
                    "hpke_public_key": identity.hpke_public_key.hex(),
                }
            },
        )
        return identity

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="key-rotation")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        delay = self.rotate_seconds
        while True:
            await asyncio.sleep(delay)
            try:
                await self.rotate()
                delay = self.rotate_seconds
            except Exception:
                # The current certificate stays valid for another interval: try again soon.
                log.exception("key rotation failed")
                delay = min(_RETRY_SECONDS, self.rotate_seconds)


KEY_ROTATION = web.AppKey("key_rotation", KeyRotation)
