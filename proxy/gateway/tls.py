"""TLS to agents: never verified by a CA, always pinned to the attested certificate.

An agent's certificate is self-signed and born in its confidential VM; what makes it
trustworthy is that verified evidence names its SHA-256. So:

- the evidence fetch does not verify the chain and records the certificate *this* connection
  presented (:class:`CertificateCapture`), which must be the one the claims name (otherwise
  someone in the middle relays a genuine agent's evidence);
- every forwarding connection is opened with ``ssl=aiohttp.Fingerprint(sha256)``: aiohttp
  checks the SHA-256 of the presented certificate (DER) right after each handshake, before a
  byte of the request is written, and refuses the connection on a mismatch.

Agent URLs must be ``https://``: aiohttp skips the fingerprint check on a plain connection, so
a plain URL is refused here rather than silently unpinned.
"""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
from yarl import URL

__all__ = ["AgentUrlError", "CertificateCapture", "agent_base_url", "sha256"]


class AgentUrlError(ValueError):
    """A backend URL the gateway refuses to talk to."""


def agent_base_url(url: str) -> URL:
    """The agent's origin (``https://host:port``), or :class:`AgentUrlError`."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise AgentUrlError(f"invalid agent URL {url!r}") from exc
    if parsed.scheme != "https":
        raise AgentUrlError("agent URLs must be https:// (the proxy never forwards in the clear)")
    if not parsed.host or parsed.user or parsed.password or parsed.query_string or parsed.fragment:
        raise AgentUrlError(f"agent URL {url!r} must be https://host[:port]")
    if parsed.path not in ("", "/"):
        raise AgentUrlError(f"agent URL {url!r} must not have a path")
    return parsed.origin()


class CertificateCapture(aiohttp.Fingerprint):
    """Passed as ``ssl=`` for one evidence fetch: instead of comparing the presented
    certificate with a pin, it records it (aiohttp calls :meth:`check` right after the TLS
    handshake of each new connection). One instance per fetch, on a connection that is never
    reused, so what it holds is the certificate of the connection that carried the evidence."""

    def __init__(self) -> None:
        super().__init__(bytes(32))
        self.der: bytes | None = None
        self.connections = 0

    def check(self, transport: asyncio.Transport) -> None:
        self.connections += 1
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # A second connection for one fetch (a redirect, a retry) would make the capture
        # ambiguous: record nothing, so the fetch is refused.
        self.der = der if self.connections == 1 and der else None


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
