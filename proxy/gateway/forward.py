"""Forwarding: ``/{domain}/v1/...``, ``/{domain}/api/...``, plain ``/v1/...`` (a PAT bound to a
domain) and ``/{domain}/attestation?nonce=``.

Per request: authenticate the bearer credential for the domain the route names (the directory
decides; the caller's credential never leaves the proxy), check the ``inference`` action and
the model scope, admit it under the domain's and the token's rate limits, pick an agent of that
domain serving the model, pass the attestation gate, and forward over TLS pinned to the
attested certificate with a short-lived JWT the proxy signs for the domain (``aud`` = the
domain alias). Failover: a connection that cannot be made (or a pinned certificate that
changed and no longer verifies) moves the request to the next agent; nothing is retried once
the agent began answering. Bodies pass through byte for byte: the request JSON is parsed only
to read ``model``; responses are relayed as received, streams chunk by chunk with no write
timeout; the client's disconnect closes the upstream connection (the agent then stops its
backend). Usage is read from the backend's usage fields; every request leaves one audit row
(who, domain, model, status, tokens, latency, evidence digest, backend), never text.

Response headers added: ``X-Cube-Proxy-Ms`` (time the proxy itself spent: everything but
waiting on the agent, verification included), ``X-Cube-Agent`` (the backend id) and
``X-Cube-Evidence`` (digest of the verified evidence that served it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import urlencode

from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping

from cube._http import is_content_encoded
from proxy.directory import RESERVED_ALIASES, AuditRecord, AuthError, Caller, DomainLimits
from proxy.gateway.agents import Agent, AgentFailure, Trust
from proxy.gateway.attest import LoadedPolicy
from proxy.gateway.errors import GatewayError
from proxy.gateway.listing import LISTING_ROUTES, merge
from proxy.gateway.metering import (
    USAGE_HEADER,
    Usage,
    UsageScanner,
    estimated_prompt_tokens,
    parse_usage_header,
)
from proxy.gateway.metrics import observe_request
from proxy.gateway.ops import LOG_FIELDS, REQUEST_ID
from proxy.gateway.ratelimit import LimitExceeded
from proxy.gateway.service import GATEWAY, Gateway
from proxy.gateway.upstream import (
    CertificateMismatch,
    ConnectFailed,
    StaleConnection,
    UpstreamError,
    UpstreamResponse,
)

__all__ = ["E2E_CONTENT_TYPE", "E2E_MODEL_HEADER", "PROXY_MS_HEADER", "RESERVED_ALIASES", "setup"]

log = logging.getLogger("cube.proxy.forward")

PROXY_MS_HEADER: Final = "X-Cube-Proxy-Ms"
_STATUS_CLIENT_CLOSED: Final = 499
_PARSE_OFF_LOOP: Final = 1024 * 1024
_MAX_ROUTE: Final = 200

_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Never forwarded to an agent: the caller's credentials, client-network details, and what the
#: client session sets itself.
_NOT_FORWARDED: Final = _HOP_BY_HOP | frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "cookie2",
        "api-key",
        "x-api-key",
        "openai-organization",
        "openai-project",
        "forwarded",
        "x-real-ip",
        "host",
        "content-length",
        "accept-encoding",
        "expect",
        "x-request-id",
    }
)
_NOT_FORWARDED_PREFIXES: Final = ("proxy-", "x-forwarded-", "x-cube-", "cf-", "x-amzn-")
_RESPONSE_HEADERS: Final = (
    "Content-Type",
    "Retry-After",
    "Cache-Control",
    "Content-Encoding",
    USAGE_HEADER,
)
_STREAM_TYPES: Final = ("text/event-stream", "application/x-ndjson")
#: End-to-end encrypted bodies (docs/e2e-encryption.md): opaque to the proxy, forwarded byte
#: for byte; the model travels in a header as routing metadata.
E2E_CONTENT_TYPE: Final = "application/cube-e2e"
E2E_MODEL_HEADER: Final = "Cube-E2E-Model"
E2E_AGENT_HEADER: Final = "Cube-E2E-Agent"
#: The OpenAI stream's last event.
_STREAM_END: Final = b"data: [DONE]"
#: How a sealed stream's records start on the wire (docs/e2e-encryption.md): an SSE event's
#: data line, or an NDJSON line; a record's first byte (its kind) is not encrypted.
_SEALED_RECORDS: Final = ((b"event: cube-e2e\ndata: ", b"\n"), (b'{"cube-e2e":"', b'"'))
_SEALED_END_KIND: Final = 0x03
_MAX_MODEL_NAME: Final = 200


@dataclass
class Exchange:
    """One request's bookkeeping (timing, outcome, audit facts)."""

    route: str
    started: float = field(default_factory=time.perf_counter)
    upstream_wait: float = 0.0
    status: int = 500
    caller: Caller | None = None
    model: str | None = None
    agent: Agent | None = None
    trust: Trust | None = None
    usage: Usage | None = None
    detail: str | None = None
    limits: DomainLimits | None = None
    added: str | None = None
    finished: bool = False
    #: A stream's last event ("data: [DONE]") was written: a client closing after it (as the
    #: openai SDK does) received the whole answer, which is audited as such, not as 499.
    delivered: bool = False
    #: The size of the body sent to a verified agent (None: nothing reached one). Once set,
    #: an error tells the client not to retry (``x-should-retry: false``): the agent, and
    #: its backend, may have done the work.
    sent_bytes: int | None = None
    #: The proxy cut the answer short (its shutdown): the work done is charged all the same.
    cut: bool = False

    def added_ms(self) -> str:
        """The proxy's own time so far (frozen once the response headers are written)."""
        if self.added is None:
            added = time.perf_counter() - self.started - self.upstream_wait
            self.added = f"{max(0.0, added) * 1000:.3f}"
        return self.added


# -- request parsing -----------------------------------------------------------------------------


@dataclass(slots=True)
class Incoming:
    """What forwarding needs of a client's request, whichever front end parsed it (aiohttp's
    handlers here, or the fast path in :mod:`proxy.gateway.edge`)."""

    method: str
    #: The path as the client encoded it (no query).
    raw_path: str
    #: The raw query string ("" without one).
    query: str
    headers: MultiMapping[str]
    request_id: str


def incoming(request: web.Request) -> Incoming:
    """An aiohttp request as :class:`Incoming`."""
    headers: MultiMapping[str] = request.headers
    if not all(value.isascii() for value in headers.values()):
        # aiohttp decodes header bytes as UTF-8 (surrogates for the rest); the fast path and the
        # hop to the agent read them as ISO-8859-1: back to the bytes the client sent.
        headers = CIMultiDict(
            (name, value.encode("utf-8", "surrogateescape").decode("latin-1"))
            for name, value in headers.items()
        )
    return Incoming(
        method=request.method,
        raw_path=request.rel_url.raw_path,
        query=request.rel_url.raw_query_string,
        headers=headers,
        request_id=request[REQUEST_ID],
    )


def _bearer(inc: Incoming) -> str:
    header = inc.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        raise GatewayError(
            401,
            "a bearer token is required (Authorization: Bearer <token>)",
            code="missing_token",
            headers={"WWW-Authenticate": 'Bearer realm="cube-proxy"'},
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GatewayError(
            401,
            "use 'Authorization: Bearer <token>'",
            code="malformed_token",
            headers={"WWW-Authenticate": 'Bearer realm="cube-proxy", error="invalid_token"'},
        )
    return token


async def _authenticate(gw: Gateway, inc: Incoming, alias: str | None) -> Caller:
    bearer = _bearer(inc)
    try:
        caller = await gw.cache.authenticate(bearer, alias)
    except AuthError as exc:
        gw.metrics.auth_failures.labels(status=str(exc.status)).inc()
        challenge = "invalid_token" if exc.status == 401 else "insufficient_scope"
        raise GatewayError(
            exc.status,
            exc.message,
            code=exc.code,
            headers={"WWW-Authenticate": f'Bearer realm="cube-proxy", error="{challenge}"'},
        ) from None
    if alias is not None and caller.domain_alias != alias:
        # The directory must answer for the domain asked; anything else is a bug, fail closed.
        raise GatewayError(403, "this credential is not valid for this domain", code="forbidden")
    return caller


def _require_inference(gw: Gateway, caller: Caller) -> None:
    """Called once ``ex.caller`` is set, so that the refusal is audited in the domain."""
    if not caller.may("inference"):
        gw.metrics.auth_failures.labels(status="403").inc()
        raise GatewayError(
            403, "this credential does not allow inference in this domain", code="forbidden"
        )


def _model_of(data: object, ollama: bool) -> str | None:
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if model is None and ollama:
        model = data.get("name")  # Ollama's older /api/show, /api/pull field
    if not isinstance(model, str) or not model:
        return None
    if len(model) > _MAX_MODEL_NAME or not model.isprintable():
        # A NUL or a lone surrogate no store can hold: refused here, before it reaches the
        # audit batch it shares with other requests (and other tenants).
        raise GatewayError(400, "invalid model name", code="invalid_model")
    return model


def is_e2e(headers: MultiMapping[str]) -> bool:
    """Whether a request's body is end-to-end encrypted (by its Content-Type)."""
    content_type = headers.get(hdrs.CONTENT_TYPE, "")
    return content_type.split(";", 1)[0].strip().lower() == E2E_CONTENT_TYPE


def _header_model(inc: Incoming, *, required: bool) -> str | None:
    """The model named by ``Cube-E2E-Model`` (routing metadata of an encrypted request)."""
    value = inc.headers.get(E2E_MODEL_HEADER)
    if value is None or not value.strip():
        if required:
            raise GatewayError(
                400,
                f"an end-to-end encrypted request must name its model in {E2E_MODEL_HEADER}",
                code="missing_model",
            )
        return None
    value = value.strip()
    if len(value) > _MAX_MODEL_NAME or not value.isprintable():
        raise GatewayError(400, f"invalid {E2E_MODEL_HEADER} header", code="invalid_model")
    return value


async def _request_model(inc: Incoming, body: bytes, ollama: bool) -> str | None:
    """The model a request is for: from its JSON body, or (an encrypted body, or one that is
    not JSON) from the ``Cube-E2E-Model`` header."""
    if is_e2e(inc.headers):
        return _header_model(inc, required=True)  # the body is never parsed
    model = await _read_model(body, ollama)
    if model is None:
        return _header_model(inc, required=False)
    return model


async def _read_model(body: bytes, ollama: bool) -> str | None:
    if not body or body[:1] not in b"{[ \t\r\n":
        return None
    try:
        if len(body) > _PARSE_OFF_LOOP:
            data = await asyncio.to_thread(_loads_yielding, body)
        else:
            data = json.loads(body)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None  # not JSON: the agent answers that; no model scope to check here
    return _model_of(data, ollama)


def _loads_yielding(body: bytes) -> Any:
    """``json.loads`` that lets the event loop's thread run while it parses: the C parser holds
    the GIL for a whole document (a 48 MB body stalled every tenant's traffic for ~0.8 s);
    a Python hook per object gives the interpreter points to switch threads."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return dict(items)

    return json.loads(body, object_pairs_hook=pairs)


_BAD_ESCAPES: Final = ("%2e", "%2f", "%5c", "%00")


def _target(inc: Incoming, alias: str | None, tail: str) -> str:
    """The request target for the agent: the path after the domain, as the client encoded it,
    and the query. Paths that could be read as another resource are refused."""
    if "\\" in tail or ("." in tail and any(s in (".", "..") for s in tail.split("/"))):
        raise GatewayError(400, "invalid path", code="invalid_path")
    raw = inc.raw_path
    if alias is not None:
        raw = "/" + raw.split("/", 2)[2]
    if "%" in raw and any(bad in raw.lower() for bad in _BAD_ESCAPES):
        raise GatewayError(400, "invalid path", code="invalid_path")
    return f"{raw}?{inc.query}" if inc.query else raw


def _upstream_headers(inc: Incoming, token: str) -> list[tuple[str, str]]:
    out = [
        (name, value)
        for name, value in inc.headers.items()
        if not (
            (lower := name.lower()) in _NOT_FORWARDED or lower.startswith(_NOT_FORWARDED_PREFIXES)
        )
        and "\r" not in value
        and "\n" not in value
    ]
    out.append(("Authorization", f"Bearer {token}"))
    out.append(("Accept-Encoding", "identity"))
    out.append(("X-Request-Id", inc.request_id))
    return out


def response_headers(
    upstream: UpstreamResponse, agent: Agent, trust: Trust
) -> list[tuple[str, str]]:
    """The agent's response headers a client gets (a fixed list), and the proxy's own."""
    out: list[tuple[str, str]] = []
    for name in _RESPONSE_HEADERS:
        value = upstream.headers.get(name)
        if value is not None and "\r" not in value and "\n" not in value:
            out.append((name, value))
    out.append(("X-Cube-Agent", agent.id))
    out.append(("X-Cube-Evidence", trust.evidence_digest))
    if upstream.status >= 500:
        # The agent had the request: a retry would run it again (see should_not_retry).
        out.append((SHOULD_RETRY_HEADER, "false"))
    return out


def stream_ended(chunk: bytes, *, sealed: bool) -> bool:
    """Whether ``chunk`` carries a stream's last event: ``data: [DONE]``, or in an end-to-end
    encrypted stream the sealed end marker (a record whose kind byte says END; its tag the
    proxy cannot check, nor does it need to: this only decides whether a client that closes
    next got the whole answer, for the audit row)."""
    if not sealed:
        # At the start of a line: the words inside a model's text are in a JSON string there;
        # an Ollama (NDJSON) stream's last object says "done": true (a model's quotes inside a
        # JSON string are escaped, so its text cannot).
        return (
            chunk.startswith(_STREAM_END)
            or b"\n" + _STREAM_END in chunk
            or (b'"done"' in chunk and _ollama_done(chunk))
        )
    for prefix, stop in _SEALED_RECORDS:
        start = chunk.find(prefix)
        while start >= 0:
            begin = start + len(prefix)
            end = chunk.find(stop, begin)
            if end < 0:
                break
            try:
                record = base64.b64decode(chunk[begin:end], validate=True)
            except ValueError:
                record = b""
            if record[:1] == bytes([_SEALED_END_KIND]):
                return True
            start = chunk.find(prefix, end)
    return False


def _ollama_done(chunk: bytes) -> bool:
    """An NDJSON line whose top-level ``done`` is true (a model's tool-call arguments are a
    JSON object in Ollama's answers: a nested ``"done": true`` is not the end). A line cut
    across chunks does not parse: at worst a client closing right then is audited 499."""
    for line in chunk.split(b"\n"):
        if b'"done"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("done") is True:
            return True
    return False


def is_stream(upstream: UpstreamResponse) -> bool:
    """Relayed event by event (SSE, NDJSON) rather than read whole."""
    return upstream.headers.get(hdrs.CONTENT_TYPE, "").lower().startswith(_STREAM_TYPES)


def whole_usage(upstream: UpstreamResponse, body: bytes) -> Usage | None:
    """Token usage of a whole (non-streamed) answer: the ``Cube-Usage`` header (end-to-end
    encrypted answers), else the body's usage fields."""
    if upstream.status >= 300:
        return None
    header = upstream.headers.get(USAGE_HEADER)
    if header is not None:
        return parse_usage_header(header)
    if upstream.headers.get(hdrs.CONTENT_TYPE, "").lower().startswith(E2E_CONTENT_TYPE):
        return None
    return UsageScanner().whole(body)


# -- the exchange --------------------------------------------------------------------------------


def _no_agent(gw: Gateway, failures: list[AgentFailure], agents: list[Agent]) -> GatewayError:
    refusals = [f for f in failures if f.attestation]
    if refusals:
        message = "; ".join(dict.fromkeys(f.message for f in refusals))
        # When the first refused agent will be tried again: asking sooner gets this answer.
        now = gw.now()
        waits = [a.retry_at - now for a in agents if a.failure is not None and a.retry_at > now]
        retry = min(3600, max(1, math.ceil(min(waits)))) if waits else 5
        return GatewayError(
            503, message, code=refusals[0].code, headers={"Retry-After": str(retry)}
        )
    if failures:
        message = "; ".join(dict.fromkeys(f.message for f in failures))
        return GatewayError(
            503,
            f"no agent is available: {message}",
            code=failures[0].code,
            headers={"Retry-After": "1"},
        )
    return GatewayError(503, "no agent is available", code="agents_unavailable")


async def _open(
    gw: Gateway,
    ex: Exchange,
    agent: Agent,
    *,
    policy: LoadedPolicy,
    method: str,
    target: str,
    body: bytes | None,
    headers: list[tuple[str, str]],
) -> tuple[UpstreamResponse, Trust]:
    """Send the request to ``agent`` over its pinned connection; the response (headers read)."""
    fresh = False
    changed = False
    while True:
        trust = await gw.gate.trust(agent, policy)
        t0 = time.perf_counter()
        ex.sent_bytes = len(body) if body is not None else 0
        try:
            response = await gw.upstream.request(
                agent.base_url,
                trust.cert_sha256,
                method=method,
                target=target,
                headers=headers,
                body=body,
                fresh=fresh,
            )
        except CertificateMismatch:
            ex.upstream_wait += time.perf_counter() - t0
            ex.sent_bytes = None  # nothing reached the agent
            gw.gate.certificate_changed(agent, trust)
            if changed:
                raise AgentFailure(
                    f"agent {agent.id} keeps presenting a certificate that is not the attested one",
                    code="certificate_mismatch",
                    attestation=True,
                ) from None
            changed = True  # re-verify once: a restarted agent attests its new certificate
            continue
        except ConnectFailed as exc:
            ex.upstream_wait += time.perf_counter() - t0
            ex.sent_bytes = None  # nothing reached the agent
            gw.metrics.agent_errors.labels(kind="connect").inc()
            agent.mark_down(str(exc), gw.settings.down_seconds)
            raise AgentFailure(
                f"agent {agent.id} is unreachable", code="agent_unreachable", attestation=False
            ) from None
        except StaleConnection:
            # A kept-alive connection the agent had closed: once more on a new one.
            ex.upstream_wait += time.perf_counter() - t0
            gw.metrics.agent_errors.labels(kind="stale").inc()
            if fresh:
                raise AgentFailure(
                    f"agent {agent.id} closed the connection",
                    code="agent_unreachable",
                    attestation=False,
                ) from None
            fresh = True
            continue
        except UpstreamError as exc:
            # The request may have reached the agent: not retried elsewhere.
            ex.upstream_wait += time.perf_counter() - t0
            gw.metrics.agent_errors.labels(kind="protocol").inc()
            raise GatewayError(
                502, f"agent {agent.id} failed to answer: {exc}", code="agent_invalid"
            ) from None
        ex.upstream_wait += time.perf_counter() - t0
        return response, trust


async def read_whole(gw: Gateway, ex: Exchange, upstream: UpstreamResponse, agent: Agent) -> bytes:
    """A non-streamed answer's body (the wait counted as the agent's time)."""
    t0 = time.perf_counter()
    try:
        return await upstream.read(gw.settings.max_answer_bytes)
    except UpstreamError as exc:
        raise GatewayError(
            502, f"agent {agent.id} failed while answering ({exc})", code="agent_disconnected"
        ) from None
    finally:
        ex.upstream_wait += time.perf_counter() - t0


async def _relay(
    request: web.Request,
    gw: Gateway,
    ex: Exchange,
    upstream: UpstreamResponse,
    *,
    agent: Agent,
    trust: Trust,
) -> web.StreamResponse:
    headers = CIMultiDict(response_headers(upstream, agent, trust))
    ex.status = upstream.status
    if not is_stream(upstream):
        body = await read_whole(gw, ex, upstream, agent)
        ex.usage = whole_usage(upstream, body)
        headers[PROXY_MS_HEADER] = ex.added_ms()
        return web.Response(body=body, status=upstream.status, headers=headers)

    scanner = UsageScanner()
    sealed = is_e2e(request.headers)
    headers[hdrs.CACHE_CONTROL] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    headers[PROXY_MS_HEADER] = ex.added_ms()
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks():
            scanner.feed(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:
                if not ex.delivered:
                    client_gone(gw, ex)
                ex.usage = scanner.charged()
                return response
            if not ex.delivered and stream_ended(chunk, sealed=sealed):
                ex.delivered = True
                ex.usage = scanner.charged()  # the answer is whole: its usage is known now
    except UpstreamError:
        # The agent went away mid-stream: end the client's connection without a clean end of
        # stream, so it cannot take a truncated answer for a complete one.
        ex.status = 502
        ex.detail = "agent disconnected mid-stream"
        ex.usage = scanner.charged()  # whatever counts arrived are charged
        if request.transport is not None:
            request.transport.abort()
        return response
    except asyncio.CancelledError:
        ex.usage = scanner.charged()  # the client left: what it was sent is charged
        raise
    except Exception:
        # The head went out: a 500 written now would land inside the stream (and end it
        # cleanly); the client must see a cut instead.
        ex.status = 500
        ex.usage = scanner.charged()
        if request.transport is not None:
            request.transport.abort()
        raise
    ex.usage = scanner.charged()
    if gw.settings.durable_audit:
        # The stream's clean end is withheld until its audit row is committed.
        waiter = finish(gw, ex, request.setdefault(LOG_FIELDS, {}))
        if waiter is not None:
            try:
                await waiter
            except Exception:
                if request.transport is not None:
                    request.transport.abort()
                return response
    try:
        await response.write_eof()
    except ConnectionError:
        # Every byte the agent sent was written; only the chunked-encoding terminator did not go
        # out (the client closed after the last event): a delivered answer, not a 499.
        ex.detail = "client closed before the end of the chunked stream"
    return response


R = TypeVar("R")
#: Relays an agent's answer to the client: (response with headers read, agent, trust).
Relay = Callable[[UpstreamResponse, Agent, Trust], Awaitable[R]]


@dataclass(slots=True)
class Prepared:
    """A request that passed authentication, scope and admission: where and what to send."""

    candidates: list[Agent]
    policy: LoadedPolicy
    target: str
    body: bytes | None
    headers: list[tuple[str, str]]


async def forward(gw: Gateway, ex: Exchange, method: str, prep: Prepared, relay: Relay[R]) -> R:
    """Send ``prep`` to its agents in order (failing over before the first byte) and relay the
    answer of the first that takes it."""
    failures: list[AgentFailure] = []
    for index, agent in enumerate(gw.pool.order(prep.candidates)):
        if index:
            gw.metrics.failovers.inc()
        agent.in_flight += 1
        gw.metrics.in_flight.inc()
        upstream: UpstreamResponse | None = None
        try:
            try:
                upstream, trust = await _open(
                    gw,
                    ex,
                    agent,
                    policy=prep.policy,
                    method=method,
                    target=prep.target,
                    body=prep.body,
                    headers=prep.headers,
                )
            except AgentFailure as failure:
                failures.append(failure)
                continue
            ex.agent, ex.trust = agent, trust
            agent.last_used = time.monotonic()
            return await relay(upstream, agent, trust)
        finally:
            agent.in_flight -= 1
            gw.metrics.in_flight.dec()
            if upstream is not None:
                if upstream.done:
                    upstream.release()
                else:
                    upstream.close()  # tells the agent (and its backend) to stop
    raise _no_agent(gw, failures, prep.candidates)


def is_listing(ex: Exchange, method: str) -> bool:
    """A model listing (``/v1/models``, ``/api/tags``, ``/api/ps``): merged over the agents."""
    return method == "GET" and ex.route in LISTING_ROUTES


async def merged_listing(
    gw: Gateway, ex: Exchange, prep: Prepared
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Every agent's listing, each filtered to the models routed to it, merged
    (:mod:`proxy.gateway.listing`); an agent that fails is left out, and if all fail, the
    request fails as any other would."""
    ollama = ex.route.startswith("/api/")
    answers: list[tuple[int, list[tuple[str, str]], bytes, Agent, Trust]] = []
    failure: GatewayError | None = None

    async def whole(
        upstream: UpstreamResponse, agent: Agent, trust: Trust
    ) -> tuple[int, list[tuple[str, str]], bytes, Agent, Trust]:
        body = await read_whole(gw, ex, upstream, agent)
        return upstream.status, response_headers(upstream, agent, trust), body, agent, trust

    for agent in sorted(prep.candidates, key=lambda a: a.id):  # the same order every time
        try:
            answers.append(await forward(gw, ex, "GET", replace(prep, candidates=[agent]), whole))
        except GatewayError as error:
            failure = failure or error
    listed = [a for a in answers if a[0] == 200]
    if not listed:
        if answers:
            status, headers, body, agent, trust = answers[0]
            ex.agent, ex.trust = agent, trust
            return status, headers, body
        assert failure is not None
        raise failure
    merged = merge(ex.route, [(body, _routed_to(agent, ollama)) for _, _, body, agent, _ in listed])
    status, headers, body, agent, trust = listed[0]
    ex.agent, ex.trust = agent, trust
    if merged is None:
        return status, headers, body
    if len(listed) > 1:
        # Several agents answered together: name them all.
        headers = [(k, v) for k, v in headers if k not in ("X-Cube-Agent", "X-Cube-Evidence")]
        headers.append(("X-Cube-Agent", ", ".join(a[3].id for a in listed)))
        headers.append(("X-Cube-Evidence", ", ".join(a[4].evidence_digest for a in listed)))
    return status, headers, merged


def _routed_to(agent: Agent, ollama: bool) -> Callable[[str], bool]:
    """Whether the proxy routes a model of this name to ``agent``."""
    return lambda name: agent.serves(name, ollama=ollama)


def finish(gw: Gateway, ex: Exchange, fields: dict[str, object]) -> asyncio.Future[None] | None:
    """Audit, usage, limits and metrics for one request (runs in ``finally``: no awaits);
    ``fields`` gets the access-log facts. With ``durable_audit``, the future that is done once
    the audit row is committed."""
    if ex.finished:
        return None
    ex.finished = True
    caller = ex.caller
    usage = _with_prompt_estimate(ex, ex.usage)
    latency = (time.perf_counter() - ex.started) * 1000
    route = ex.route
    observe_request(gw.metrics, route, ex.status, float(ex.added_ms()))
    if caller is None:
        return None
    fields["domain"] = caller.domain_alias
    if ex.agent is not None:
        fields["backend_id"] = ex.agent.id
    if ex.model is not None:
        fields["model"] = ex.model
    prompt = usage.prompt_tokens if usage is not None else None
    completion = usage.completion_tokens if usage is not None else None
    if usage is not None and usage.known:
        gw.metrics.prompt_tokens.inc(prompt or 0)
        gw.metrics.completion_tokens.inc(completion or 0)
        gw.writer.usage(
            domain_id=caller.domain_id,
            user_id=caller.user_id,
            model=ex.model or (ex.trust.model if ex.trust is not None else "unknown"),
            prompt_tokens=prompt or 0,
            completion_tokens=completion or 0,
        )
        if ex.limits is not None:
            gw.charge(caller, ex.limits, usage.total)
    row = AuditRecord(
        domain_id=caller.domain_id,
        user_id=caller.user_id,
        route=route,
        status=ex.status,
        when=datetime.now(UTC),
        model=ex.model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=round(latency, 3),
        evidence_digest=ex.trust.evidence_digest if ex.trust is not None else None,
        backend_id=ex.agent.id if ex.agent is not None else None,
        token_id=caller.token_id,
        detail=_with_estimate(ex.detail, usage),
    )
    if gw.settings.durable_audit:
        return gw.writer.audit_durably(row)
    gw.writer.audit(row)
    return None


#: Routes whose answers carry token counts: one that arrives without is charged an estimate.
_METERED_ROUTES: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    }
)


def _with_prompt_estimate(ex: Exchange, usage: Usage | None) -> Usage | None:
    """``usage``, its prompt count estimated from the request body when an inference request
    reached an agent (an answer, a stream cut or a client gone) and no count came back."""
    if (
        not ex.sent_bytes
        or (usage is not None and usage.prompt_tokens is not None)
        or ex.route not in _METERED_ROUTES
    ):
        return usage
    cut = usage is not None and usage.estimated
    if not (200 <= ex.status < 300 or ex.status == _STATUS_CLIENT_CLOSED or cut or ex.cut):
        return usage  # refused by the agent: its backend did no work
    return Usage(
        estimated_prompt_tokens(ex.sent_bytes),
        usage.completion_tokens if usage is not None else None,
        estimated=cut,
        prompt_estimated=True,
    )


def _with_estimate(detail: str | None, usage: Usage | None) -> str | None:
    if usage is None:
        return detail
    notes = []
    if usage.prompt_estimated:
        notes.append("prompt tokens estimated from the request's size (no count came)")
    if usage.estimated:
        notes.append(
            "completion tokens counted from the records relayed (no usage came with the stream)"
        )
    return "; ".join(([detail] if detail is not None else []) + notes) or None


async def _durably(
    request: web.Request,
    ex: Exchange,
    response: web.StreamResponse,
    waiter: asyncio.Future[None] | None,
) -> web.StreamResponse:
    """``durable_audit``: hand the response over only once its audit row is committed."""
    if waiter is None:
        return response
    try:
        await waiter
    except Exception:
        if response.prepared:
            if request.transport is not None:
                request.transport.abort()
            return response
        # As any error: Ollama's shape on its routes, and no retry of what reached an agent.
        return _error(
            ex, GatewayError(503, "the request could not be audited", code="audit_unavailable")
        )
    return response


def record_error(ex: Exchange, error: GatewayError) -> None:
    """The exchange's outcome is ``error`` (status, and a detail for the audit row)."""
    ex.status = error.status
    if ex.detail is None and error.status >= 500:
        ex.detail = error.message[:1000]
    elif ex.detail is None:
        ex.detail = error.code


def is_ollama_route(ex: Exchange) -> bool:
    """Ollama's API (``/api/...``): its errors are in Ollama's shape."""
    return ex.route.startswith("/api/")


def _error(ex: Exchange, error: GatewayError) -> web.Response:
    record_error(ex, error)
    response = error.response(ollama=is_ollama_route(ex))
    response.headers[PROXY_MS_HEADER] = ex.added_ms()
    if should_not_retry(ex, error):
        response.headers[SHOULD_RETRY_HEADER] = "false"
    return response


#: Read by the openai SDK (and Stainless-generated clients) before retrying a failed request.
SHOULD_RETRY_HEADER: Final = "x-should-retry"


def should_not_retry(ex: Exchange, error: GatewayError) -> bool:
    """A server error after the request reached an agent: the SDK would send it again (twice,
    by default), and the backend would run the prompt again each time."""
    return ex.sent_bytes is not None and error.status >= 500


def route_name(path: str) -> str:
    return path if len(path) <= _MAX_ROUTE else path[:_MAX_ROUTE]


def client_gone(gw: Gateway, ex: Exchange) -> None:
    """The client's connection ended (the request was cancelled, a write failed): 499, unless
    the whole answer was written already, or the proxy itself is shutting down and cut it."""
    if ex.delivered:
        ex.detail = "client closed after the last event"
    elif gw.stopping:
        ex.status = 503
        ex.detail = "cut: cube-proxy shut down before the answer ended"
        ex.cut = True
    else:
        ex.status = _STATUS_CLIENT_CLOSED
        ex.detail = "client disconnected"


async def _serve(
    request: web.Request, alias: str | None, prefix: str, tail: str, *, ollama: bool
) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    ex = Exchange(route=route_name(prefix + tail))
    inc = incoming(request)
    waiter: asyncio.Future[None] | None = None
    response: web.StreamResponse
    try:
        prep = await prepare(gw, ex, inc, alias, tail, ollama=ollama, read_body=request.read)
        if is_listing(ex, request.method):
            status, headers, body = await merged_listing(gw, ex, prep)
            ex.status = status
            headers.append((PROXY_MS_HEADER, ex.added_ms()))
            response = web.Response(body=body, status=status, headers=CIMultiDict(headers))
        else:
            response = await forward(
                gw,
                ex,
                request.method,
                prep,
                lambda upstream, agent, trust: _relay(
                    request, gw, ex, upstream, agent=agent, trust=trust
                ),
            )
    except GatewayError as error:
        response = _error(ex, error)
    except web.HTTPRequestEntityTooLarge:
        response = _error(
            ex, GatewayError(413, "the request body is too large", code="body_too_large")
        )
    except asyncio.CancelledError:
        client_gone(gw, ex)
        raise
    finally:
        waiter = finish(gw, ex, request.setdefault(LOG_FIELDS, {}))
    return await _durably(request, ex, response, waiter)


async def prepare(
    gw: Gateway,
    ex: Exchange,
    inc: Incoming,
    alias: str | None,
    tail: str,
    *,
    ollama: bool,
    read_body: Callable[[], Awaitable[bytes]],
) -> Prepared:
    """Everything before the agent is contacted: path, method, credential, body, model scope,
    rate limits, the domain's policy and agents, and the token the agent gets."""
    target = _target(inc, alias, tail)
    if inc.method not in ("GET", "POST"):
        raise GatewayError(
            405,
            f"method {inc.method} is not supported",
            code="bad_method",
            headers={"Allow": "GET, POST"},
        )
    ex.caller = caller = await _authenticate(gw, inc, alias)
    _require_inference(gw, caller)
    if is_content_encoded(inc.headers):
        # Its model could not be read (so not checked against the credential's scope), and
        # the agent refuses encoded bodies anyway.
        raise GatewayError(
            415, "request bodies must not be content-encoded", code="unsupported_content_encoding"
        )
    body: bytes | None = None
    if inc.method == "POST":
        body = await read_body()
        ex.model = await _request_model(inc, body, ollama)
    if ex.model is not None and not caller.may_use_model(ex.model, ollama_names=ollama):
        raise GatewayError(
            403, f"this credential may not use the model {ex.model!r}", code="model_forbidden"
        )
    ex.limits = await _admit(gw, caller)
    policy = await gw.load_policy(caller.domain_id)
    agents = await gw.agents(caller.domain_id)
    candidates = [a for a in agents if a.serves(ex.model, ollama=ollama)]
    if not candidates:
        if not [a for a in agents if a.spec.enabled]:
            raise GatewayError(503, "this domain has no backends", code="no_backends")
        what = f"the model {ex.model!r}" if ex.model else "this API"
        raise GatewayError(404, f"no backend of this domain serves {what}", code="no_backend")
    if is_e2e(inc.headers):
        candidates = _sealed_for(inc, candidates)
    try:
        token = gw.forward_token(caller, ex.model)
    except AuthError as exc:
        raise GatewayError(exc.status, exc.message, code=exc.code) from None
    return Prepared(candidates, policy, target, body, _upstream_headers(inc, token))


async def _admit(gw: Gateway, caller: Caller) -> DomainLimits:
    """The domain's limits, once the request fits under them (else 429 with Retry-After)."""
    limits = await gw.cache.limits(caller.domain_id)
    try:
        await gw.admit(caller, limits)
    except LimitExceeded as exc:
        gw.metrics.rate_limited.labels(limit=exc.which).inc()
        raise GatewayError(
            429,
            f"rate limit reached ({exc.which.replace('_', ' ')} per minute); "
            f"retry in {exc.retry_after} s",
            code="rate_limited",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return limits


def _sealed_for(inc: Incoming, candidates: list[Agent]) -> list[Agent]:
    """A sealed body opens only at the agent whose HPKE key the client verified: the client
    names it in ``Cube-E2E-Agent`` (an earlier ``X-Cube-Agent``). Route there, without failover
    to agents that could not open it; an unknown id falls back to every candidate (that agent
    answers 421 and the client verifies again)."""
    wanted = inc.headers.get(E2E_AGENT_HEADER)
    if wanted:
        chosen = [a for a in candidates if a.id == wanted]
        if chosen:
            return chosen
    return candidates


def _domain(request: web.Request) -> str:
    alias = request.match_info["domain"]
    if alias in RESERVED_ALIASES:
        raise web.HTTPNotFound()
    return alias


async def domain_openai(request: web.Request) -> web.StreamResponse:
    info = request.match_info
    return await _serve(request, _domain(request), "/v1/", info["tail"], ollama=False)


async def domain_ollama(request: web.Request) -> web.StreamResponse:
    info = request.match_info
    return await _serve(request, _domain(request), "/api/", info["tail"], ollama=True)


async def plain_openai(request: web.Request) -> web.StreamResponse:
    return await _serve(request, None, "/v1/", request.match_info["tail"], ollama=False)


# -- evidence pass-through -------------------------------------------------------------------------


async def domain_attestation(request: web.Request) -> web.StreamResponse:
    """``GET /{domain}/attestation?nonce=HEX[&agent=ID]``: an agent's evidence, unchanged.

    The agent is one that passes the gate (so the fetch goes over its pinned connection); the
    client verifies the document itself against the nonce it chose, and may name the agent
    (``X-Cube-Agent`` of an earlier answer) to check the one that served it.
    """
    gw = request.app[GATEWAY]
    alias = _domain(request)
    ex = Exchange(route="attestation")
    try:
        ex.caller = caller = await _authenticate(gw, incoming(request), alias)
        _require_inference(gw, caller)
        nonces = request.query.getall("nonce", [])
        if len(nonces) != 1:
            raise GatewayError(
                400,
                "give exactly one 'nonce' query parameter (hex, 32 to 64 bytes)",
                code="invalid_nonce",
            )
        await _admit(gw, caller)
        policy = await gw.load_policy(caller.domain_id)
        agents = [a for a in await gw.agents(caller.domain_id) if a.spec.enabled]
        wanted = request.query.get("agent")
        if wanted is not None:
            agents = [a for a in agents if a.id == wanted]
            if not agents:
                raise GatewayError(404, "no such agent in this domain", code="no_backend")
        if not agents:
            raise GatewayError(503, "this domain has no backends", code="no_backends")
        failures: list[AgentFailure] = []
        passed: web.Response | None = None
        for agent in gw.pool.order(agents):
            try:
                passed = await _pass_evidence(gw, ex, agent, policy, nonces[0])
                break
            except AgentFailure as failure:
                failures.append(failure)
        if passed is None:
            raise _no_agent(gw, failures, agents)
        response = passed
    except GatewayError as error:
        response = _error(ex, error)
    except asyncio.CancelledError:
        ex.status = _STATUS_CLIENT_CLOSED
        raise
    finally:
        waiter = finish(gw, ex, request.setdefault(LOG_FIELDS, {}))
    return await _durably(request, ex, response, waiter)


async def _pass_evidence(
    gw: Gateway, ex: Exchange, agent: Agent, policy: LoadedPolicy, nonce: str
) -> web.Response:
    target = "/attestation?" + urlencode({"nonce": nonce})
    changed = False
    fresh = False
    while True:
        trust = await gw.gate.trust(agent, policy)
        t0 = time.perf_counter()
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(gw.settings.attestation_timeout):
                upstream = await gw.upstream.request(
                    agent.base_url,
                    trust.cert_sha256,
                    method="GET",
                    target=target,
                    headers=[("Accept", "application/json")],
                    fresh=fresh,
                )
                body = await upstream.read(gw.settings.max_evidence_bytes)
        except CertificateMismatch:
            ex.upstream_wait += time.perf_counter() - t0
            ex.sent_bytes = None  # nothing reached the agent
            gw.gate.certificate_changed(agent, trust)
            if changed:
                raise AgentFailure(
                    f"agent {agent.id} keeps presenting a certificate that is not the attested one",
                    code="certificate_mismatch",
                    attestation=True,
                ) from None
            changed = True
            continue
        except StaleConnection:
            ex.upstream_wait += time.perf_counter() - t0
            ex.sent_bytes = None  # nothing reached the agent
            if fresh:
                raise AgentFailure(
                    f"agent {agent.id} closed the connection",
                    code="agent_unreachable",
                    attestation=False,
                ) from None
            fresh = True
            continue
        except (UpstreamError, TimeoutError) as exc:
            ex.upstream_wait += time.perf_counter() - t0
            agent.mark_down(
                f"evidence request failed ({type(exc).__name__})", gw.settings.down_seconds
            )
            raise AgentFailure(
                f"agent {agent.id} is unreachable", code="agent_unreachable", attestation=False
            ) from None
        finally:
            if upstream is not None:
                if upstream.done:
                    upstream.release()
                else:
                    upstream.close()
        ex.upstream_wait += time.perf_counter() - t0
        ex.agent, ex.trust, ex.status = agent, trust, upstream.status
        headers = {
            hdrs.CONTENT_TYPE: upstream.headers.get(hdrs.CONTENT_TYPE, "application/json"),
            hdrs.CACHE_CONTROL: "no-store",
            "X-Cube-Agent": agent.id,
            PROXY_MS_HEADER: ex.added_ms(),
        }
        retry_after = upstream.headers.get("Retry-After")
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return web.Response(body=body, status=upstream.status, headers=headers)


# -- routes ----------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup(app: web.Application) -> None:
    """Add the forwarding routes. Register after every fixed route (admin API, JWKS, ops):
    ``/{domain}/...`` would otherwise shadow a fixed path whose second segment is ``v1``,
    ``api`` or ``attestation``."""
    router = app.router
    router.add_route("*", "/v1/{tail:.*}", plain_openai)
    router.add_get("/{domain}/attestation", domain_attestation, allow_head=False)
    router.add_route("*", "/{domain}/v1/{tail:.*}", domain_openai)
    router.add_route("*", "/{domain}/api/{tail:.*}", domain_ollama)
