"""Verify an agent, or an agent behind a proxy, for yourself: :func:`verify_endpoint`.

One verification: a fresh random 32-byte nonce; ``GET {url}/attestation?nonce=<hex>`` over one
fresh connection whose peer certificate is recorded; the document verified with
:func:`attestation.evidence.verify_evidence` against the caller's policy (in a worker thread for
:func:`averify_endpoint`: it is CPU work); then the binding to the channel:

- **direct** (an agent URL, no path): the TLS connection ends in the VM, so its certificate must
  be the one the claims name (``tls_bound``); anything else is a possible interception
  (:class:`attestation.errors.BindingError`). Agents are ``https://`` only, CA verification off
  (their certificate is self-signed; the attested hash is what authenticates it);
- **via a proxy** (``https://proxy/{domain}``): TLS ends at the proxy (verified against the CA
  bundle, or ``ca``), so nothing binds it to the TEE; what the evidence binds is the agent's HPKE
  key, and request bodies must be sealed to it (the transport refuses plaintext bodies).

Every check lands in one :class:`attestation.Checks` (pass ``checks=`` to keep the list when
verification fails: the failed check is recorded before the error is raised).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpcore2

from attestation._checks import Checks
from attestation.errors import BindingError, MalformedError, ValidityError
from attestation.evidence import VerifiedEvidence, certificate_window, verify_evidence
from attestation.policy import Policy
from cube_client._errors import ClientError
from cube_client._net import (
    AsyncCheckedBackend,
    CertificateCapture,
    CheckedBackend,
    agent_ssl_context,
)
from cube_client._text import printable, shown_url

__all__ = [
    "MAX_EVIDENCE_BYTES",
    "AttestedEndpoint",
    "Endpoint",
    "averify_endpoint",
    "parse_endpoint",
    "verify_endpoint",
]

#: Largest evidence document accepted (a TDX quote with collateral and a vTPM event log fit).
MAX_EVIDENCE_BYTES = 4 * 1024 * 1024
HPKE_PUBLIC_KEY_BYTES = 32
_USER_AGENT = "cube-client/1"
#: What a bearer token may hold (RFC 6750 b64token, and then some): printable ASCII, no space.
_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class AttestedEndpoint:
    """The result of one verification."""

    #: The base URL given (an agent's root, or a proxy's ``https://host/{domain}``).
    url: str
    evidence: VerifiedEvidence
    #: The certificate of the very TLS connection that fetched the evidence (b"" over http).
    peer_cert_der: bytes
    #: Whether SHA-256(peer_cert_der) is the claims' ``tls_cert_sha256`` (always required direct).
    tls_bound: bool
    nonce: bytes
    verified_at: datetime
    #: ``verified_at`` + the policy's ``max_evidence_age_seconds``: verify again from then on.
    expires_at: datetime
    #: The agent's attested HPKE public key (X25519, 32 bytes): what bodies are sealed to.
    hpke_public_key: bytes
    checks: Checks
    #: Whether the URL is a proxy's (TLS ends outside the TEE).
    via_proxy: bool = False
    #: The agent that answered through a proxy (its ``X-Cube-Agent``), if the proxy said.
    agent_id: str | None = None

    @property
    def cert_sha256(self) -> bytes:
        """SHA-256 of :attr:`peer_cert_der` (what the transport pins for a direct agent)."""
        return hashlib.sha256(self.peer_cert_der).digest()

    @property
    def hpke_key_id(self) -> bytes:
        """SHA-256 of the HPKE public key: names the recipient in ``cube-e2e/1`` envelopes."""
        return hashlib.sha256(self.hpke_public_key).digest()

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint URL."""

    url: str  # normalised: no trailing slash
    scheme: str
    host: str
    port: int
    path: str  # "" for an agent, "/{domain}" for a proxy domain
    via_proxy: bool

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(url: str, via_proxy: bool | None = None) -> Endpoint:
    """Parse an agent URL (``https://host:port``) or a proxy domain URL (``https://host/acme``).

    ``via_proxy`` defaults to "the URL has a path". Raises :class:`MalformedError`, also for a
    direct agent URL that is not ``https://`` (nothing could bind a plain connection) and for
    ``via_proxy=True`` with a URL that names no domain: taken for a proxy, an agent's URL would
    be fetched without the check that binds its TLS certificate to its evidence. Messages show
    the URL without credentials or query (:func:`cube_client._text.shown_url`).
    """
    shown = f"'{shown_url(url)}'"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MalformedError(f"invalid endpoint URL {shown}: {printable(str(exc))}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MalformedError(f"invalid endpoint URL {shown}: expected http(s)://host[:port][/path]")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise MalformedError(
            f"invalid endpoint URL {shown}: no credentials, query or fragment allowed"
        )
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):  # an openai-style base URL: the endpoint is what is above it
        path = path[:-3]
    proxy = bool(path) if via_proxy is None else via_proxy
    if proxy and not path:
        raise MalformedError(
            f"{shown} is taken for a proxy domain (--via-proxy) but names no domain: a proxy "
            "domain URL names its domain (https://proxy/DOMAIN); an agent's URL is verified "
            "directly (its TLS certificate bound to its evidence)"
        )
    if not proxy and path:
        raise MalformedError(f"agent URL {shown} must not have a path")
    if not proxy and parts.scheme != "https":
        raise MalformedError(
            f"agent URL {shown} is not https://: the evidence binds the agent's TLS certificate, "
            "so a plain connection cannot be attested",
            check="endpoint.url",
        )
    host = parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
    base = f"{parts.scheme}://{shown}{'' if default else f':{port}'}{path}"
    return Endpoint(base, parts.scheme, host, port, path, proxy)


@dataclass(frozen=True)
class _Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    der: bytes | None
    connections: int


def _ssl_context(endpoint: Endpoint, ca: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if endpoint.scheme != "https":
        return None
    if not endpoint.via_proxy:
        return agent_ssl_context()
    return ca if ca is not None else ssl.create_default_context()


def check_api_key(api_key: str, *, check: str) -> None:
    """Refuse an API key no HTTP header can carry, without quoting it: an HTTP library's error
    would quote the whole header, key included."""
    if not _TOKEN_CHARACTERS.fullmatch(api_key):
        raise MalformedError(
            "the API key contains characters no HTTP header can carry (a trailing newline "
            "or space?)",
            check=check,
        )


def _request_parts(
    endpoint: Endpoint, nonce: bytes, api_key: str | None, timeout: float
) -> tuple[bytes, list[tuple[bytes, bytes]], dict[str, object]]:
    url = f"{endpoint.origin}{endpoint.path}/attestation?nonce={nonce.hex()}".encode()
    headers = [
        (b"Accept", b"application/json"),
        (b"Connection", b"close"),
        (b"User-Agent", _USER_AGENT.encode()),
    ]
    # The credential goes to a proxy only (which serves evidence to its users); an agent's
    # evidence is public, and a bearer token never goes to anything not yet verified.
    if api_key is not None and endpoint.via_proxy:
        check_api_key(api_key, check="evidence.fetch")
        headers.append((b"Authorization", f"Bearer {api_key}".encode()))
    extensions: dict[str, object] = {
        "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    }
    return url, headers, extensions


def _unreachable(endpoint: Endpoint, exc: BaseException) -> ClientError:
    if isinstance(exc, httpcore2.LocalProtocolError):
        detail = f"the request could not be sent ({type(exc).__name__})"  # it may quote headers
    else:
        detail = printable(str(exc).strip()[:300]) or type(exc).__name__
    return ClientError(
        f"could not fetch evidence from {endpoint.url}: {detail}", check="evidence.fetch"
    )


def _timed_out(endpoint: Endpoint, timeout: float) -> ClientError:
    return ClientError(
        f"could not fetch evidence from {endpoint.url}: not complete within {timeout:g} s",
        check="evidence.fetch",
    )


def _fetch(
    endpoint: Endpoint, nonce: bytes, ca: ssl.SSLContext | None, api_key: str | None, timeout: float
) -> _Fetched:
    capture = CertificateCapture()
    url, headers, extensions = _request_parts(endpoint, nonce, api_key, timeout)
    # One pool per fetch, one connection, closed after: its certificate is the one recorded.
    pool = httpcore2.ConnectionPool(
        ssl_context=_ssl_context(endpoint, ca),
        max_connections=1,
        max_keepalive_connections=0,
        network_backend=CheckedBackend(capture),
    )
    deadline = time.monotonic() + timeout  # for the whole fetch, not per read
    try:
        with pool.stream("GET", url, headers=headers, extensions=extensions) as response:
            body = b""
            for chunk in response.iter_stream():
                if time.monotonic() > deadline:
                    raise _timed_out(endpoint, timeout)
                body += chunk
                if len(body) > MAX_EVIDENCE_BYTES:
                    raise ClientError(
                        f"{endpoint.url} sent an evidence document over {MAX_EVIDENCE_BYTES} bytes",
                        check="evidence.fetch",
                    )
            return _Fetched(
                response.status,
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                body,
                capture.der,
                capture.connections,
            )
    except httpcore2.ConnectError as exc:
        raise _unreachable(endpoint, exc) from None
    except (httpcore2.TimeoutException, httpcore2.NetworkError, httpcore2.ProtocolError) as exc:
        raise _unreachable(endpoint, exc) from None
    except (httpcore2.UnsupportedProtocol, OSError, ssl.SSLError) as exc:
        raise _unreachable(endpoint, exc) from None
    finally:
        pool.close()


async def _afetch(
    endpoint: Endpoint, nonce: bytes, ca: ssl.SSLContext | None, api_key: str | None, timeout: float
) -> _Fetched:
    capture = CertificateCapture()
    url, headers, extensions = _request_parts(endpoint, nonce, api_key, timeout)
    pool = httpcore2.AsyncConnectionPool(
        ssl_context=_ssl_context(endpoint, ca),
        max_connections=1,
        max_keepalive_connections=0,
        network_backend=AsyncCheckedBackend(capture),
    )
    try:
        async with (
            asyncio.timeout(timeout),  # for the whole fetch, not per read
            pool.stream("GET", url, headers=headers, extensions=extensions) as response,
        ):
            body = b""
            async for chunk in response.aiter_stream():
                body += chunk
                if len(body) > MAX_EVIDENCE_BYTES:
                    raise ClientError(
                        f"{endpoint.url} sent an evidence document over {MAX_EVIDENCE_BYTES} bytes",
                        check="evidence.fetch",
                    )
            return _Fetched(
                response.status,
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                body,
                capture.der,
                capture.connections,
            )
    except TimeoutError:
        raise _timed_out(endpoint, timeout) from None
    except (
        httpcore2.ConnectError,
        httpcore2.TimeoutException,
        httpcore2.NetworkError,
        httpcore2.ProtocolError,
        httpcore2.UnsupportedProtocol,
        OSError,
        ssl.SSLError,
    ) as exc:
        raise _unreachable(endpoint, exc) from None
    finally:
        await pool.aclose()


def _error_message(body: bytes) -> str:
    """The message of a JSON error answer, shortened and made printable (it is the server's
    text, and ends up on a terminal)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return printable(str(error["message"])[:300])
        if isinstance(error, str):
            return printable(error[:300])
    return ""


def _conclude(
    endpoint: Endpoint,
    *,
    policy: Policy,
    nonce: bytes,
    fetched: _Fetched,
    started: datetime,
    now: Callable[[], datetime],
    checks: Checks,
) -> AttestedEndpoint:
    if fetched.status != 200:
        message = _error_message(fetched.body)
        checks.fail(
            "evidence.fetch",
            ClientError,
            f"{endpoint.url} did not serve evidence (HTTP {fetched.status}"
            f"{': ' + message if message else ''})",
            expected="HTTP 200",
            actual=f"HTTP {fetched.status}",
        )
    checks.ok(
        "evidence.fetch",
        detail=f"GET {endpoint.url}/attestation with a fresh {len(nonce)}-byte nonce",
        actual=f"{len(fetched.body)} bytes",
    )
    tls = endpoint.scheme == "https"
    if tls:
        checks.require(
            fetched.connections == 1 and fetched.der is not None,
            "tls.connection",
            BindingError,
            "the evidence did not arrive over exactly one TLS connection presenting a "
            "certificate: cannot tell which certificate carried it",
            expected="1 connection with a certificate",
            actual=f"{fetched.connections} connection(s)",
        )
    der = fetched.der or b""
    evidence = verify_evidence(fetched.body, nonce=nonce, policy=policy, now=now(), checks=checks)
    expires_at = started + timedelta(seconds=policy.max_evidence_age_seconds)
    presented = hashlib.sha256(der).digest() if der else None
    bound = presented is not None and hmac.compare_digest(
        presented, evidence.claims.tls_cert_sha256
    )
    if not endpoint.via_proxy:
        checks.require(
            bound,
            "tls.certificate",
            BindingError,
            "the TLS certificate this connection presented is not the one the evidence names: "
            "refusing a possible interception",
            expected=evidence.claims.tls_cert_sha256,
            actual=presented if presented is not None else "no certificate",
        )
        not_before, not_after = certificate_window(der)
        verified_now = now()
        checks.require(
            not_before <= verified_now < not_after,
            "tls.validity",
            ValidityError,
            "the attested TLS certificate is not valid now: its key may no longer be relied on "
            "(agents replace it regularly; verify again)",
            expected=f"{not_before.isoformat()} to {not_after.isoformat()}",
            actual=verified_now.isoformat(),
        )
        expires_at = min(expires_at, not_after)
    else:
        checks.ok(
            "tls.certificate",
            expected=evidence.claims.tls_cert_sha256,
            actual=presented if presented is not None else "plain http",
            detail="via a proxy: TLS ends at the proxy, not in the TEE; bodies must be sealed "
            "to the attested HPKE key",
        )
    key = evidence.claims.hpke_public_key
    checks.require(
        key is not None and len(key) == HPKE_PUBLIC_KEY_BYTES,
        "claims.hpke_public_key",
        MalformedError if key is not None else BindingError,
        f"the claims name no {HPKE_PUBLIC_KEY_BYTES}-byte X25519 HPKE key: nothing to seal "
        "bodies to",
        actual=key if key is not None else "absent",
    )
    assert key is not None
    return AttestedEndpoint(
        url=endpoint.url,
        evidence=evidence,
        peer_cert_der=der,
        tls_bound=bound,
        nonce=nonce,
        verified_at=started,
        expires_at=expires_at,
        hpke_public_key=key,
        checks=checks,
        via_proxy=endpoint.via_proxy,
        agent_id=fetched.headers.get("x-cube-agent") if endpoint.via_proxy else None,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def verify_endpoint(
    url: str,
    policy: Policy,
    *,
    via_proxy: bool | None = None,
    ca: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    now: Callable[[], datetime] | None = None,
    api_key: str | None = None,
    checks: Checks | None = None,
) -> AttestedEndpoint:
    """Fetch evidence for a fresh nonce from ``url`` and verify it against ``policy``.

    ``api_key``: the bearer credential a proxy asks for (sent only to proxies, never to an
    agent before it is verified). ``checks``: collects every check, the failing one included.
    Raises :class:`attestation.errors.AttestationError` (:class:`ClientError` when the
    endpoint cannot be reached or does not serve evidence).
    """
    clock = now or _utcnow
    checks = checks if checks is not None else Checks()
    endpoint = parse_endpoint(url, via_proxy)
    nonce = secrets.token_bytes(32)
    started = clock()
    fetched = _fetch(endpoint, nonce, ca, api_key, timeout)
    return _conclude(
        endpoint,
        policy=policy,
        nonce=nonce,
        fetched=fetched,
        started=started,
        now=clock,
        checks=checks,
    )


async def averify_endpoint(
    url: str,
    policy: Policy,
    *,
    via_proxy: bool | None = None,
    ca: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    now: Callable[[], datetime] | None = None,
    api_key: str | None = None,
    checks: Checks | None = None,
) -> AttestedEndpoint:
    """:func:`verify_endpoint` for asyncio: the fetch is asynchronous, the verification (CPU
    work) runs in a worker thread."""
    clock = now or _utcnow
    checks = checks if checks is not None else Checks()
    endpoint = parse_endpoint(url, via_proxy)
    nonce = secrets.token_bytes(32)
    started = clock()
    fetched = await _afetch(endpoint, nonce, ca, api_key, timeout)
    return await asyncio.to_thread(
        functools.partial(
            _conclude,
            endpoint,
            policy=policy,
            nonce=nonce,
            fetched=fetched,
            started=started,
            now=clock,
            checks=checks,
        )
    )
