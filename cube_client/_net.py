"""Connections whose TLS certificate is checked before a byte of any request is written.

httpcore2 (under httpx2, under the ``openai`` SDK) opens a connection as ``connect_tcp`` then
``start_tls``; the backends here wrap the stream so that right after the handshake the peer
certificate (DER) is handed to a check, which records it (the evidence fetch) or compares it with
the attested pin (every later connection to an agent). A check that raises closes the connection:
the request it was opened for is never written. Python's ``ssl`` has no verify callback, so this
post-handshake, pre-request check is where pinning lives (CA verification is off for agents: their
certificate is self-signed, and the attested hash is the only thing that makes it trustworthy).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import httpcore2

__all__ = [
    "AsyncCheckedBackend",
    "CertificateCapture",
    "CertificateCheck",
    "CertificatePin",
    "CheckedBackend",
    "PinMismatch",
    "agent_ssl_context",
    "peer_certificate",
]

#: Called with the DER certificate the peer presented (b"" when it presented none); raises to
#: refuse the connection.
CertificateCheck = Callable[[bytes], None]


class PinMismatch(Exception):
    """The peer presented a certificate other than the pinned one (connection already closed)."""

    def __init__(self, presented: bytes) -> None:
        super().__init__("the endpoint presented a certificate that is not the attested one")
        self.presented_sha256 = hashlib.sha256(presented).digest()


def agent_ssl_context() -> ssl.SSLContext:
    """Client context for agents: no CA or host name verification (the certificate is
    self-signed, born in the VM); the pin check after the handshake is what authenticates it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_certificate(stream: Any) -> bytes:
    """The DER certificate the TLS peer of ``stream`` presented, or b""."""
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return b""
    der = ssl_object.getpeercert(True)
    return bytes(der) if der else b""


class CertificateCapture:
    """Records the certificate of the (only) connection a one-shot fetch opened. A second
    connection makes the capture ambiguous: it then holds nothing and the fetch is refused."""

    def __init__(self) -> None:
        self.der: bytes | None = None
        self.connections = 0

    def __call__(self, der: bytes) -> None:
        self.connections += 1
        self.der = der if self.connections == 1 and der else None


class CertificatePin:
    """Accepts exactly one certificate, by SHA-256 of its DER encoding."""

    def __init__(self, sha256: bytes) -> None:
        self.sha256 = sha256

    def __call__(self, der: bytes) -> None:
        if not der or not hmac.compare_digest(hashlib.sha256(der).digest(), self.sha256):
            raise PinMismatch(der)


class _CheckedStream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream, check: CertificateCheck) -> None:
        self._inner = inner
        self._check = check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        stream = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(peer_certificate(stream))
        except BaseException:
            stream.close()
            raise
        return stream


class CheckedBackend(httpcore2.NetworkBackend):
    """A synchronous network backend whose TLS connections pass ``check`` before use."""

    def __init__(self, check: CertificateCheck) -> None:
        self._inner = httpcore2.SyncBackend()
        self.check = check

    def _check_now(self, der: bytes) -> None:
        self.check(der)  # looked up per connection: the transport swaps pins

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CheckedStream(stream, self._check_now)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        raise httpcore2.ConnectError("unix sockets are not supported by the attested transport")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncCheckedStream(httpcore2.AsyncNetworkStream):
    def __init__(self, inner: httpcore2.AsyncNetworkStream, check: CertificateCheck) -> None:
        self._inner = inner
        self._check = check

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(peer_certificate(stream))
        except BaseException:
            await stream.aclose()
            raise
        return stream


class AsyncCheckedBackend(httpcore2.AsyncNetworkBackend):
    """The asyncio (anyio) counterpart of :class:`CheckedBackend`."""

    def __init__(self, check: CertificateCheck) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self.check = check

    def _check_now(self, der: bytes) -> None:
        self.check(der)  # looked up per connection: the transport swaps pins

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncCheckedStream(stream, self._check_now)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not supported by the attested transport")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
