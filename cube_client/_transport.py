"""The attested transport: an ``httpx2`` client (what the ``openai`` SDK uses) that talks only to
a verified endpoint.

Per request, before a byte of it is written:

1. the request must go to the endpoint's origin, under its path (anything else is refused);
2. the endpoint is verified (:func:`cube_client.verify_endpoint`) if it has not been yet, or its
   evidence reached the policy's maximum age;
3. a body is sealed to the attested HPKE key (``cube-e2e/1``) when encryption is on; through a
   proxy, a body is refused when encryption is off (TLS ends at the proxy);
4. for a direct agent, every connection must present the attested certificate (checked right
   after the TLS handshake, before the request is written; CA verification is off, the pin is
   the authentication). A different certificate closes that connection, the agent is verified
   again (once: a restarted agent attests its new certificate) and the request retried; if it
   still does not match, the request is refused.

Sealed answers are opened (whole bodies, and streams record by record with the end marker
required); a plaintext success answer to a sealed request is refused, and so is a sealed body
under another content type. Nothing authenticates a plaintext error, so only those that come
before any inference (421, 429, 503) keep the ``openai`` SDK's retries; the retry headers of
every answer to a sealed request are dropped (see ``_RETRY_HEADERS``). The asyncio transport
seals and opens bodies over 256 KiB in a worker thread. An agent that answers
421 ``e2e_wrong_recipient`` (a proxy routed the request to another agent than the one verified,
or the agent's key rotated) makes the transport verify again, and send once more only if that
verification names another HPKE key or agent than the request was sealed to (a forged 421 after
the agent answered must not make it infer twice). A query string is refused with a sealed
request (it is not sealed). Errors raised here are
:class:`attestation.errors.AttestationError`s (the ``openai`` SDK mostly passes them through;
where it wraps them, in ``APIConnectionError``, the error is the ``__cause__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import httpcore2
import httpx2

from attestation.errors import BindingError, MalformedError
from attestation.policy import Policy
from cube_client import e2e
from cube_client._errors import EncryptionError, PlaintextRefusedError
from cube_client._net import (
    AsyncCheckedBackend,
    CertificatePin,
    CheckedBackend,
    PinMismatch,
    agent_ssl_context,
)
from cube_client._verify import (
    AttestedEndpoint,
    Endpoint,
    averify_endpoint,
    parse_endpoint,
    verify_endpoint,
)

__all__ = [
    "AsyncAttestedClient",
    "AsyncAttestedTransport",
    "AttestedClient",
    "AttestedTransport",
    "attested_async_http_client",
    "attested_http_client",
]

_VERIFY_TIMEOUT: Final = 60.0
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_STREAM_TYPES: Final = {"text/event-stream": "sse", "application/x-ndjson": "ndjson"}
#: Headers the openai SDK decides its retries by. They travel outside the seal, so whoever
#: relays an answer could set them; each retry is another inference.
_RETRY_HEADERS: Final = frozenset({"x-should-retry", "retry-after", "retry-after-ms"})
_DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {"content-length", "content-type", "content-encoding", "transfer-encoding"} | _RETRY_HEADERS
)
#: Plaintext errors to a sealed request that come before the agent opened it, so before any
#: inference, and may be retried: the agent's 421 (another recipient; retried here once) and 503
#: (replay cache full, token keys not loaded yet), the proxy's 429 (rate limit) and 503 (no agent
#: available). Anything else (a 502 from the proxy may come after the agent inferred) is not.
_RETRYABLE_BEFORE_OPENING: Final = frozenset({421, 429, 503})
#: How a sealed body starts (whole answer; SSE or NDJSON stream): such a body is never plaintext.
_SEALED_STARTS: Final = (
    e2e.MAGIC,
    b"event: " + e2e.SSE_EVENT.encode(),
    b'{"' + e2e.SSE_EVENT.encode() + b'"',
)
#: Bodies larger than this are sealed and opened in a worker thread, off the event loop (the
#: agent uses the same threshold).
_OFF_LOOP: Final = 256 * 1024
#: An Authorization header value HTTP can carry (no control characters, no edge spaces).
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _no_check(der: bytes) -> None:
    del der  # through a proxy the TLS certificate is CA-verified, not attested


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """httpcore2's exceptions as httpx2's (same names), which the openai SDK understands."""
    try:
        yield
    except httpcore2.LocalProtocolError:
        # h11's message quotes the offending header, which may be a credential: say less.
        raise httpx2.LocalProtocolError(
            "the request could not be sent: a header or the request line is not valid HTTP"
        ) from None
    except httpcore2.TimeoutException as exc:
        raise getattr(httpx2, type(exc).__name__, httpx2.TimeoutException)(str(exc)) from exc
    except (httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.UnsupportedProtocol) as exc:
        raise getattr(httpx2, type(exc).__name__, httpx2.TransportError)(str(exc)) from exc


def _bearer(request: httpx2.Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _media_type(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


class _Core:
    """What the sync and async transports share: targets, sealing, and opening answers."""

    def __init__(
        self,
        url: str,
        policy: Policy,
        *,
        encrypt: bool,
        via_proxy: bool | None,
        ca: ssl.SSLContext | None,
        api_key: str | None,
        now: Callable[[], datetime] | None,
    ) -> None:
        self.endpoint: Endpoint = parse_endpoint(url, via_proxy)
        self.policy = policy
        self.encrypt = encrypt
        self.ca = ca
        self.api_key = api_key
        self.now = now or _utcnow
        self.attested: AttestedEndpoint | None = None
        #: Direct agents: the attested certificate; replaced (never mutated) on re-verification.
        self.pin = CertificatePin(bytes(32))

    @property
    def direct(self) -> bool:
        return not self.endpoint.via_proxy

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.endpoint.scheme != "https":
            return None
        if self.direct:
            return agent_ssl_context()
        return self.ca if self.ca is not None else ssl.create_default_context()

    def check(self, der: bytes) -> None:
        if self.direct:
            self.pin(der)
        else:
            _no_check(der)

    def fresh(self) -> AttestedEndpoint | None:
        attested = self.attested
        if attested is None or attested.expired(self.now()):
            return None
        return attested

    def adopt(self, attested: AttestedEndpoint) -> bool:
        """Take a new verification; True if the pinned certificate changed."""
        changed = self.pin.sha256 != attested.cert_sha256
        if changed:
            self.pin = CertificatePin(attested.cert_sha256)
        self.attested = attested
        return changed

    def api_key_for(self, request: httpx2.Request) -> str | None:
        """The credential for a proxy's evidence route. Refuses, before anything is sent and
        without quoting it, an Authorization header that HTTP cannot carry (a key read from a
        file with its newline): the HTTP library's error would quote it."""
        value = request.headers.get("authorization")
        if value is not None and not _HEADER_VALUE.fullmatch(value):
            raise MalformedError(
                "the API key (Authorization header) contains characters no HTTP header can "
                "carry (a trailing newline or space?)",
                check="transport.credential",
            )
        return self.api_key if self.api_key is not None else _bearer(request)

    def relative_path(self, request: httpx2.Request) -> str:
        """The request's path as the agent sees it; refuses anything off the endpoint."""
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        endpoint = self.endpoint
        if (
            url.scheme != endpoint.scheme
            or (url.host or "").lower() != endpoint.host.lower()
            or port != endpoint.port
        ):
            raise PlaintextRefusedError(
                f"the attested transport for {endpoint.url} does not send requests to "
                f"{url.scheme}://{url.host}:{port}",
                check="transport.target",
            )
        path = url.path
        if endpoint.path:
            if not path.startswith(endpoint.path + "/"):
                raise PlaintextRefusedError(
                    f"the attested transport for {endpoint.url} only sends requests under "
                    f"{endpoint.path}/",
                    check="transport.target",
                )
            path = path[len(endpoint.path) :]
        return path

    def prepare(
        self, request: httpx2.Request, body: bytes, attested: AttestedEndpoint, path: str
    ) -> tuple[list[tuple[bytes, bytes]], bytes, e2e.RequestMeta | None]:
        """Headers and body to send (sealed when encryption is on), and the seal's metadata."""
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
        if not body and request.method not in _BODY_METHODS:
            return headers, body, None  # nothing to protect (a GET)
        if not self.encrypt:
            if not self.direct:
                raise PlaintextRefusedError(
                    f"refusing to send a plaintext body through the proxy at {self.endpoint.url}: "
                    "TLS ends there, outside the TEE; turn encryption on",
                    check="transport.plaintext",
                )
            return [*headers, (b"Content-Length", str(len(body)).encode())], body, None
        if request.url.query:
            raise PlaintextRefusedError(
                "refusing to send a query string with an encrypted request: only the body is "
                "sealed, and the query would travel readable and unbound to it (put the "
                "parameters in the body)",
                check="transport.query",
            )
        model = e2e.body_model(body, path)
        sealed, meta = e2e.seal_request(
            body, attested.hpke_public_key, method=request.method, path=path, model=model
        )
        out = [(k, v) for k, v in headers if k.lower() != b"content-type"]
        out.append((b"Content-Type", e2e.CONTENT_TYPE.encode()))
        out.append((b"Content-Length", str(len(sealed)).encode()))
        if model is not None:
            out.append((e2e.MODEL_HEADER.encode(), model.encode()))
        if attested.agent_id is not None:
            out.append((e2e.AGENT_HEADER.encode(), attested.agent_id.encode()))
        return out, sealed, meta

    def core_request(
        self,
        request: httpx2.Request,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> httpcore2.Request:
        url = request.url
        return httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=headers,
            content=body,
            extensions=request.extensions,
        )

    @staticmethod
    def wrong_recipient(response_status: int, body: bytes) -> bool:
        return response_status == 421 and b"e2e_wrong_recipient" in body

    @staticmethod
    def resend_helps(sealed_to: AttestedEndpoint, verified: AttestedEndpoint) -> bool:
        """After a 421 ``e2e_wrong_recipient`` and a fresh verification: whether sending again
        can reach another key. Only if the verification names another HPKE key or another
        agent than the request was sealed to; otherwise the 421 (plaintext, so anyone relaying
        it could have forged it, after the agent answered) is returned as it is, and the
        request is not sent a second time (another inference)."""
        return (
            verified.hpke_public_key != sealed_to.hpke_public_key
            or verified.agent_id != sealed_to.agent_id
        )

    @staticmethod
    def whole(response: httpcore2.Response, meta: e2e.RequestMeta, body: bytes) -> httpx2.Response:
        media = _media_type(response.headers)
        if media == e2e.CONTENT_TYPE:
            plain, content_type = e2e.open_whole(meta, body, response.status)
            headers = [
                (k, v)
                for k, v in response.headers
                if k.decode("latin-1").lower() not in _DROPPED_RESPONSE_HEADERS
            ]
            headers.append((b"Content-Type", content_type.encode("latin-1")))
            return httpx2.Response(
                response.status, headers=headers, content=plain, extensions=response.extensions
            )
        if body.lstrip().startswith(_SEALED_STARTS):
            # A sealed answer relabelled on the way (to pass as a plaintext error the SDK would
            # retry, so the agent infers again).
            raise e2e.EnvelopeError(
                f"a sealed answer arrived as plaintext (HTTP {response.status}, "
                f"{media or 'no content type'}): changed on the way, refused",
                code="e2e_plaintext",
            )
        if response.status >= 400:
            # Refused before the body was opened (by the proxy or the agent): a plaintext error,
            # which carries no content of the exchange. Whoever relays it can forge it, so the
            # SDK retries only what legitimately comes before any inference.
            headers = [
                (k, v)
                for k, v in response.headers
                if k.decode("latin-1").lower() not in _RETRY_HEADERS
                or (response.status in _RETRYABLE_BEFORE_OPENING and k.lower() == b"retry-after")
            ]
            if response.status not in _RETRYABLE_BEFORE_OPENING:
                headers.append((b"x-should-retry", b"false"))
            return httpx2.Response(
                response.status,
                headers=headers,
                content=body,
                extensions=response.extensions,
            )
        raise EncryptionError(
            f"a plaintext answer (HTTP {response.status}, {media or 'no content type'}) to an "
            "encrypted request: refused",
            check="e2e.e2e_plaintext",
        )

    @staticmethod
    def stream_headers(response: httpcore2.Response) -> list[tuple[bytes, bytes]]:
        dropped = {"content-length", "content-encoding"} | _RETRY_HEADERS
        return [(k, v) for k, v in response.headers if k.decode("latin-1").lower() not in dropped]

    def pin_refused(self, exc: PinMismatch) -> BindingError:
        """The error once a certificate is still not the attested one after verifying again."""
        return BindingError(
            f"{self.endpoint.url} presents a certificate (sha256 "
            f"{exc.presented_sha256.hex()}) that is not the attested one, even "
            "after verifying again: refused",
            check="tls.certificate",
        )

    def streamed(
        self,
        response: httpcore2.Response,
        meta: e2e.RequestMeta | None,
        plain: Callable[[Any], Any],
        decrypted: Callable[[Any, e2e.StreamDecoder], Any],
    ) -> httpx2.Response | None:
        """The answer as it streams in: as it is (a plaintext request), or a sealed stream
        opened event by event; None when the whole body must be read (and opened) first.
        ``plain`` and ``decrypted`` wrap the connection's byte stream (sync or async)."""
        if meta is None:
            return httpx2.Response(
                response.status,
                headers=response.headers,
                stream=plain(response.stream),
                extensions=response.extensions,
            )
        framing = _STREAM_TYPES.get(_media_type(response.headers))
        if framing is not None and response.status < 300:
            decoder = e2e.StreamDecoder(meta, "sse" if framing == "sse" else "ndjson")
            return httpx2.Response(
                response.status,
                headers=self.stream_headers(response),
                stream=decrypted(response.stream, decoder),
                extensions=response.extensions,
            )
        return None


# -- synchronous ----------------------------------------------------------------------------------


class _DecryptedStream(httpx2.SyncByteStream):
    def __init__(self, inner: Iterable[bytes], decoder: e2e.StreamDecoder) -> None:
        self._inner = inner
        self._decoder = decoder

    def __iter__(self) -> Iterator[bytes]:
        with _mapped_errors():
            chunks = iter(self._inner)
            for chunk in chunks:
                plain = self._decoder.feed(chunk)
                if self._decoder.ended or self._decoder.last_event_seen:
                    # Read the HTTP response to its end, and check its end marker, before
                    # handing over the last events: a caller that stops at "data: [DONE]"
                    # then closes a finished exchange, not one still in flight (which the proxy
                    # would audit as abandoned), a cut-off answer fails before its last event
                    # is seen, and anything after the end marker is refused.
                    for rest in chunks:
                        plain += self._decoder.feed(rest)
                    self._decoder.finish()
                if plain:
                    yield plain
        self._decoder.finish()

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _PlainStream(httpx2.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        with _mapped_errors():
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


def _close_if_idle(pool: httpcore2.ConnectionPool) -> bool:
    """Close ``pool`` unless a connection of it is still serving a request; whether closed."""
    if any(not c.is_idle() and not c.is_closed() for c in pool.connections):
        return False
    pool.close()
    return True


async def _aclose_if_idle(pool: httpcore2.AsyncConnectionPool) -> bool:
    if any(not c.is_idle() and not c.is_closed() for c in pool.connections):
        return False
    await pool.aclose()
    return True


class AttestedTransport(httpx2.BaseTransport):
    """An ``httpx2`` transport that verifies, pins and (optionally) seals; see the module."""

    def __init__(
        self,
        url: str,
        policy: Policy,
        *,
        encrypt: bool = True,
        via_proxy: bool | None = None,
        ca: ssl.SSLContext | None = None,
        api_key: str | None = None,
        now: Callable[[], datetime] | None = None,
        verify_timeout: float = _VERIFY_TIMEOUT,
    ) -> None:
        self._core = _Core(
            url, policy, encrypt=encrypt, via_proxy=via_proxy, ca=ca, api_key=api_key, now=now
        )
        self._verify_timeout = verify_timeout
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        #: Pools of earlier certificates still carrying a request (closed once idle).
        self._retired: list[httpcore2.ConnectionPool] = []

    @property
    def attested(self) -> AttestedEndpoint | None:
        """The current verification (None before the first request)."""
        return self._core.attested

    def _new_pool(self) -> httpcore2.ConnectionPool:
        return httpcore2.ConnectionPool(
            ssl_context=self._core.ssl_context(),
            network_backend=CheckedBackend(self._core.check),
            keepalive_expiry=5.0,
        )

    def verify(self, api_key: str | None = None, *, force: bool = False) -> AttestedEndpoint:
        """The current verification, verifying first when there is none, it expired, or
        ``force``."""
        core = self._core
        with self._lock:
            if self._retired:
                self._retired = [p for p in self._retired if not _close_if_idle(p)]
            current = None if force else core.fresh()
            if current is not None:
                return current
            attested = verify_endpoint(
                core.endpoint.url,
                core.policy,
                via_proxy=core.endpoint.via_proxy,
                ca=core.ca,
                timeout=self._verify_timeout,
                now=core.now,
                api_key=api_key if api_key is not None else core.api_key,
            )
            if core.adopt(attested):
                # New connections go to the new certificate. The old pool's idle connections
                # close now; one another thread still reads a stream from finishes first.
                old, self._pool = self._pool, self._new_pool()
                if not _close_if_idle(old):
                    self._retired.append(old)
            return attested

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        core = self._core
        path = core.relative_path(request)
        body = request.read()
        api_key = core.api_key_for(request)
        attested = self.verify(api_key)
        for attempt in (1, 2):
            headers, content, meta = core.prepare(request, body, attested, path)
            try:
                with _mapped_errors():
                    response = self._pool.handle_request(
                        core.core_request(request, headers, content)
                    )
            except PinMismatch as exc:
                if attempt == 2:
                    raise core.pin_refused(exc) from None
                attested = self.verify(api_key, force=True)
                continue
            streamed = core.streamed(response, meta, _PlainStream, _DecryptedStream)
            if streamed is not None:
                return streamed
            assert meta is not None
            try:
                with _mapped_errors():
                    raw = response.read()
            finally:
                response.close()
            if attempt == 1 and core.wrong_recipient(response.status, raw):
                verified = self.verify(api_key, force=True)
                if core.resend_helps(attested, verified):
                    attested = verified
                    continue
            return core.whole(response, meta, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for pool in (*self._retired, self._pool):
            pool.close()
        self._retired.clear()


# -- asynchronous ---------------------------------------------------------------------------------


class _AsyncDecryptedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: AsyncIterator[bytes], decoder: e2e.StreamDecoder) -> None:
        self._inner = inner
        self._decoder = decoder

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_errors():
            chunks = aiter(self._inner)
            async for chunk in chunks:
                plain = self._decoder.feed(chunk)
                if self._decoder.ended or self._decoder.last_event_seen:
                    # As in _DecryptedStream: the response is read to its end first.
                    async for rest in chunks:
                        plain += self._decoder.feed(rest)
                    self._decoder.finish()
                if plain:
                    yield plain
        self._decoder.finish()

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _AsyncPlainStream(httpx2.AsyncByteStream):
    def __init__(self, inner: AsyncIterator[bytes]) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_errors():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class AsyncAttestedTransport(httpx2.AsyncBaseTransport):
    """The asyncio counterpart of :class:`AttestedTransport`."""

    def __init__(
        self,
        url: str,
        policy: Policy,
        *,
        encrypt: bool = True,
        via_proxy: bool | None = None,
        ca: ssl.SSLContext | None = None,
        api_key: str | None = None,
        now: Callable[[], datetime] | None = None,
        verify_timeout: float = _VERIFY_TIMEOUT,
    ) -> None:
        self._core = _Core(
            url, policy, encrypt=encrypt, via_proxy=via_proxy, ca=ca, api_key=api_key, now=now
        )
        self._verify_timeout = verify_timeout
        self._lock: asyncio.Lock | None = None
        self._pool = self._new_pool()
        #: Pools of earlier certificates still carrying a request (closed once idle).
        self._retired: list[httpcore2.AsyncConnectionPool] = []

    @property
    def attested(self) -> AttestedEndpoint | None:
        return self._core.attested

    def _new_pool(self) -> httpcore2.AsyncConnectionPool:
        return httpcore2.AsyncConnectionPool(
            ssl_context=self._core.ssl_context(),
            network_backend=AsyncCheckedBackend(self._core.check),
            keepalive_expiry=5.0,
        )

    async def verify(self, api_key: str | None = None, *, force: bool = False) -> AttestedEndpoint:
        core = self._core
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._retired:
                self._retired = [p for p in self._retired if not await _aclose_if_idle(p)]
            current = None if force else core.fresh()
            if current is not None:
                return current
            attested = await averify_endpoint(
                core.endpoint.url,
                core.policy,
                via_proxy=core.endpoint.via_proxy,
                ca=core.ca,
                timeout=self._verify_timeout,
                now=core.now,
                api_key=api_key if api_key is not None else core.api_key,
            )
            if core.adopt(attested):
                old, self._pool = self._pool, self._new_pool()  # as in AttestedTransport
                if not await _aclose_if_idle(old):
                    self._retired.append(old)
            return attested

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        core = self._core
        path = core.relative_path(request)
        body = await request.aread()
        api_key = core.api_key_for(request)
        attested = await self.verify(api_key)
        for attempt in (1, 2):
            if len(body) > _OFF_LOOP:  # JSON parsing and sealing: CPU work
                headers, content, meta = await asyncio.to_thread(
                    core.prepare, request, body, attested, path
                )
            else:
                headers, content, meta = core.prepare(request, body, attested, path)
            try:
                with _mapped_errors():
                    response = await self._pool.handle_async_request(
                        core.core_request(request, headers, content)
                    )
            except PinMismatch as exc:
                if attempt == 2:
                    raise core.pin_refused(exc) from None
                attested = await self.verify(api_key, force=True)
                continue
            streamed = core.streamed(response, meta, _AsyncPlainStream, _AsyncDecryptedStream)
            if streamed is not None:
                return streamed
            assert meta is not None
            try:
                with _mapped_errors():
                    raw = await response.aread()
            finally:
                await response.aclose()
            if attempt == 1 and core.wrong_recipient(response.status, raw):
                verified = await self.verify(api_key, force=True)
                if core.resend_helps(attested, verified):
                    attested = verified
                    continue
            if len(raw) > _OFF_LOOP:
                return await asyncio.to_thread(core.whole, response, meta, raw)
            return core.whole(response, meta, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        for pool in (*self._retired, self._pool):
            await pool.aclose()
        self._retired.clear()


# -- clients --------------------------------------------------------------------------------------


class AttestedClient(httpx2.Client):
    """An ``httpx2.Client`` over an :class:`AttestedTransport` (what
    :func:`attested_http_client` returns), with the verification at hand."""

    def __init__(self, transport: AttestedTransport, *, timeout: float) -> None:
        super().__init__(
            transport=transport, timeout=timeout, trust_env=False, follow_redirects=False
        )
        self.attested_transport = transport

    @property
    def attested(self) -> AttestedEndpoint | None:
        """The current verification (None before the first request or :meth:`verify`)."""
        return self.attested_transport.attested

    def verify(self, *, force: bool = False) -> AttestedEndpoint:
        """Verify now (unless a verification is still fresh), e.g. to show it before chatting."""
        return self.attested_transport.verify(force=force)


class AsyncAttestedClient(httpx2.AsyncClient):
    """The asyncio counterpart of :class:`AttestedClient`."""

    def __init__(self, transport: AsyncAttestedTransport, *, timeout: float) -> None:
        super().__init__(
            transport=transport, timeout=timeout, trust_env=False, follow_redirects=False
        )
        self.attested_transport = transport

    @property
    def attested(self) -> AttestedEndpoint | None:
        return self.attested_transport.attested

    async def verify(self, *, force: bool = False) -> AttestedEndpoint:
        return await self.attested_transport.verify(force=force)


def attested_http_client(
    url: str,
    policy: Policy,
    *,
    encrypt: bool = True,
    via_proxy: bool | None = None,
    ca: ssl.SSLContext | None = None,
    timeout: float = 600.0,
    api_key: str | None = None,
    now: Callable[[], datetime] | None = None,
) -> AttestedClient:
    """An ``httpx2.Client`` over :class:`AttestedTransport`, for
    ``openai.OpenAI(base_url=f"{url}/v1", api_key=..., http_client=...)``.

    ``api_key``: the credential for a proxy's evidence route (default: the bearer token of the
    request being sent; never sent to an agent before it is verified).
    """
    transport = AttestedTransport(
        url, policy, encrypt=encrypt, via_proxy=via_proxy, ca=ca, api_key=api_key, now=now
    )
    return AttestedClient(transport, timeout=timeout)


def attested_async_http_client(
    url: str,
    policy: Policy,
    *,
    encrypt: bool = True,
    via_proxy: bool | None = None,
    ca: ssl.SSLContext | None = None,
    timeout: float = 600.0,
    api_key: str | None = None,
    now: Callable[[], datetime] | None = None,
) -> AsyncAttestedClient:
    """An ``httpx2.AsyncClient`` over :class:`AsyncAttestedTransport` (``openai.AsyncOpenAI``)."""
    transport = AsyncAttestedTransport(
        url, policy, encrypt=encrypt, via_proxy=via_proxy, ca=ca, api_key=api_key, now=now
    )
    return AsyncAttestedClient(transport, timeout=timeout)
