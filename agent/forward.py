"""OpenAI-compatible forwarding to the backend on loopback (vLLM, llama-server, Ollama's ``/v1``).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` (and, for an Ollama backend, its native API through :mod:`agent.ollama`).
Every request has already passed :mod:`agent.auth`, which set ``request[PRINCIPAL]``; here we
enforce the principal's endpoint and model scopes, then relay the request.

What the relay guarantees:

- **The body is passed through unchanged.** The client's bytes are forwarded as they came; the
  JSON is parsed only to find ``model`` (unknown fields are never touched, nothing is
  re-serialised). A body whose ``model`` could be read differently by the backend (a duplicate
  top-level key, or ``"Model"``: Go's JSON decoder, used by Ollama, matches keys
  case-insensitively) is refused rather than guessed at.
- **Headers the backend must not see are stripped**: credentials (``Authorization``, cookies,
  API-key headers), ``Proxy-*``, ``X-Forwarded-*``/``Forwarded``, and hop-by-hop headers.
- **Streams are relayed as they arrive.** Each chunk from the backend is written to the client
  at once; only an incomplete trailing record (half an SSE event or NDJSON line) waits for its
  end, so the client never receives a torn record and a backend that dies mid-stream can be
  reported with a well-formed final record (``event: error`` for SSE, an ``{"error": ...}``
  line for NDJSON) before the stream ends cleanly.
- **The client's disconnect cancels the upstream request**: the backend sees its connection
  closed, so it stops generating. This works whether or not the server cancels handlers on
  disconnect (aiohttp's ``handler_cancellation``): a cheap timer notices the closed transport.
- **Shutting down ends what is in flight cleanly** (an ``on_shutdown`` hook): new requests get
  a 503 ``agent_shutting_down``; those in flight get ``SHUTDOWN_GRACE_SECONDS`` (10 s) to
  finish, then each forwarder's upstream request is cancelled (the backend stops generating);
  a stream ends with its error record (code ``agent_shutting_down``) after the token counts so
  far (``: cube-usage``), a request not yet answered gets a 503 with that code.
- **Errors are JSON** in OpenAI's shape with the right status: a backend that is down gives
  503 within ``backend_connect_timeout``; a backend's own HTTP error keeps its status with its
  message extracted (never its HTML page); nothing here raises to the client.
- **Connection reuse that copes with servers closing kept-alive connections** (llama-server
  closes after every streamed response while advertising keep-alive): a request that fails with
  a connection reset before any response byte is retried once on a fresh connection, never
  after the response has begun.

Nothing here logs or meters prompt or response content: metrics carry endpoint, status, model
and token counts from the backend's ``usage`` fields only.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Literal

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from agent import e2e
from agent.app import CONFIG
from agent.config import AgentConfig
from agent.metrics import METRICS, AgentMetrics
from agent.principal import PRINCIPAL, Principal
from cube._http import is_content_encoded
from cube_client.e2e import SSE_DONE, split_records

__all__ = [
    "BACKEND",
    "BackendError",
    "Exchange",
    "Framing",
    "UsageParser",
    "backend_ready",
    "error_response",
    "fetch_json",
    "inspect_body",
    "metric_model",
    "model_allowed",
    "model_field",
    "openai_usage",
    "parse_body",
    "read_body",
    "relay",
    "require_model",
    "require_principal",
    "run_exchange",
    "setup",
    "upstream_headers",
]

log = logging.getLogger("cube.agent.forward")

#: The pooled client session to the backend (keep-alive; owned by a cleanup_ctx).
BACKEND = web.AppKey("backend", aiohttp.ClientSession)
#: A second session that never reuses a connection: the one retry after a stale connection.
_FRESH = web.AppKey("backend_fresh", aiohttp.ClientSession)

#: Record framing of a streamed response: SSE events or NDJSON lines.
Framing = Literal["sse", "ndjson"]

_KEEPALIVE_S: Final = 4.0  # below uvicorn's and llama-server's 5 s idle timeouts
_READY_TIMEOUT_S: Final = 2.0
_DISCONNECT_POLL_S: Final = 0.2
_ERROR_BODY_LIMIT: Final = 64 * 1024
_ERROR_MESSAGE_LIMIT: Final = 1000
_MAX_PENDING_RECORD: Final = 1024 * 1024  # flush a "record" that never ends rather than hold it
_PARSE_OFF_LOOP: Final = 1024 * 1024  # bodies above this are parsed in a worker thread
_LARGE_BODY: Final = 1024 * 1024  # bodies above this are sent in chunks
_STATUS_CLIENT_CLOSED: Final = 499  # nginx's "client closed request", for metrics and logs

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
# Never forwarded: credentials, client-network details, and what the client session sets.
_NOT_FORWARDED: Final = _HOP_BY_HOP | frozenset(
    {
        "authorization",
        "cookie",
        "cookie2",
        "api-key",
        "x-api-key",
        "forwarded",
        "x-real-ip",
        "host",
        "content-length",
        "accept-encoding",
        # Only "identity" gets this far (read_body refuses the rest): nothing to tell.
        "content-encoding",
        "expect",
    }
)
_NOT_FORWARDED_PREFIXES: Final = ("proxy-", "x-forwarded-", "cube-e2e-")
# Response headers copied from the backend (everything else is the agent's own).
_RESPONSE_HEADERS: Final = ("Content-Type", "X-Request-Id", "Retry-After")

_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# Connection failures that may mean "the pooled connection had gone stale": retried once.
_RETRYABLE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)
# Failures while reading a response body from the backend.
_READ_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError, TimeoutError)


# ---------------------------------------------------------------------------------------------
# Errors


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    code: str | int | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error in OpenAI's shape: ``{"error": {"message", "type", "code"?}}``."""
    error: dict[str, Any] = {"message": message, "type": error_type or _error_type(status)}
    if code is not None:
        error["code"] = code
    return web.json_response({"error": error}, status=status, headers=headers)


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class BackendError(Exception):
    """The request cannot be (or was not) served; becomes a JSON error with ``status``.

    ``payload`` replaces the generated error object (a backend's own error, reshaped).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        error_type: str | None = None,
        *,
        payload: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type
        self.payload = payload
        self.headers = headers

    def response(self) -> web.Response:
        headers = dict(self.headers or {})
        if self.status >= 500 and self.code != "backend_unavailable":
            # The backend had the request (only "unavailable" means it never connected): the
            # openai SDK would send it again, twice by default, running the prompt each time.
            headers["x-should-retry"] = "false"
        if self.payload is not None:
            return web.json_response(self.payload, status=self.status, headers=headers)
        return error_response(
            self.status, self.message, self.error_type, self.code, headers=headers
        )


def _backend_error_body(status: int, body: bytes, content_type: str) -> dict[str, Any]:
    """Turn a backend's error body into OpenAI's error object (message and type only).

    vLLM, llama-server and Ollama's ``/v1`` answer ``{"error": {"message", "type", ...}}`` (older
    vLLM: ``{"message", "type", "code"}`` at the top level), Ollama's native API
    ``{"error": "..."}``, FastAPI ``{"detail": ...}``. Anything else (an HTML page, a proxy's
    text) is replaced by a generic message: a client never sees a backend's page or traceback.
    """
    message: object = None
    error_type: object = None
    code: object = None
    if "json" in content_type or body[:1] in (b"{", b"["):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            inner = data.get("error")
            if isinstance(inner, dict):
                message, error_type, code = (
                    inner.get("message"),
                    inner.get("type"),
                    inner.get("code"),
                )
            elif isinstance(inner, str):
                message = inner
            elif isinstance(data.get("message"), str):
                message, error_type, code = data["message"], data.get("type"), data.get("code")
            elif isinstance(data.get("detail"), str):
                message = data["detail"]
    if not isinstance(message, str) or not message.strip():
        message = f"the backend answered HTTP {status}"
    error: dict[str, Any] = {
        "message": message[:_ERROR_MESSAGE_LIMIT],
        "type": error_type
        if isinstance(error_type, str) and error_type and len(error_type) <= 64
        else _error_type(status),
    }
    if isinstance(code, str | int) and not isinstance(code, bool) and len(str(code)) <= 64:
        error["code"] = code
    return {"error": error}


# ---------------------------------------------------------------------------------------------
# Request inspection


def parse_body(body: bytes, model_keys: Iterable[str] = ("model",)) -> dict[str, Any]:
    """Parse a JSON object body for inspection only (the bytes are forwarded, not this).

    Refuses (``BackendError`` 400) what the backend might read differently from us: invalid
    UTF-8 (Python would guess UTF-16/32 from bytes), a duplicated top-level key (parsers
    disagree on which wins) and a key that differs from one of ``model_keys`` only by case (Go's
    ``encoding/json`` matches struct fields case-insensitively, so Ollama would honour it).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BackendError(400, "the request body is not valid UTF-8", "invalid_body") from None
    duplicated = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Objects complete inner-first, so the last call is the top-level object.
        nonlocal duplicated
        obj = dict(pairs)
        duplicated = len(obj) != len(pairs)
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        raise BackendError(400, "the request body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise BackendError(400, "the request body must be a JSON object", "invalid_json")
    if duplicated:
        raise BackendError(400, "the request body repeats a top-level key", "duplicate_key")
    wanted = {k.casefold(): k for k in model_keys}
    for key in data:
        canonical = wanted.get(key.casefold())
        if canonical is not None and key != canonical:
            raise BackendError(
                400, f"ambiguous field {key!r}: use {canonical!r}", "ambiguous_field"
            )
    return data


def model_field(data: Mapping[str, Any], key: str = "model") -> str | None:
    """The string value of ``key`` (None if absent or null; 400 if another type)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BackendError(400, f"{key!r} must be a string", "invalid_model")
    return value


def model_allowed(config: AgentConfig, principal: Principal, model: str) -> bool:
    """Whether ``principal`` may use ``model`` (Ollama names compare by Ollama's rules)."""
    if principal.models is None:
        return True
    if config.backend == "ollama":
        from agent.ollama import canonical_model  # lazy: agent.ollama imports this module

        wanted = canonical_model(model)
        return any(canonical_model(m) == wanted for m in principal.models)
    return principal.allows_model(model)


def metric_model(config: AgentConfig, model: str) -> str:
    """The ``model`` label for token metrics, from a set that cannot grow with requests.

    Labels are only created when the backend reports usage, i.e. when it served the model:
    vLLM refuses names it does not serve, and Ollama's spellings of one model are folded into
    one. llama-server and similar ``openai`` backends serve one model whatever the request
    names, so their label is the configured model.
    """
    if config.backend == "ollama":
        from agent.ollama import short_model

        return short_model(model)
    if config.backend == "openai":
        return config.model_name
    return model


def upstream_headers(request: web.BaseRequest, *, has_body: bool) -> CIMultiDict[str]:
    """The client's headers minus everything the backend must not see."""
    named_by_connection = {
        token.strip().lower()
        for value in request.headers.getall(hdrs.CONNECTION, ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    sealed = request.get(e2e.SEALER) is not None
    for name, value in request.headers.items():
        lower = name.lower()
        if (
            (sealed and lower == "content-type")  # the opened body is JSON, not the envelope
            or lower in _NOT_FORWARDED
            or lower in named_by_connection
            or lower.startswith(_NOT_FORWARDED_PREFIXES)
        ):
            continue
        out.add(name, value)
    # Relay bytes as the backend produced them: no compression to undo, none to redo.
    out[hdrs.ACCEPT_ENCODING] = "identity"
    if has_body and hdrs.CONTENT_TYPE not in out:
        out[hdrs.CONTENT_TYPE] = "application/json"  # the body parsed as JSON
    return out


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in _RESPONSE_HEADERS:
        value = upstream.headers.get(name)
        if value is not None:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# One exchange: metrics, disconnect detection, and the relay


class Exchange:
    """Book-keeping for one forwarded request: metrics and how it ended.

    ``status`` is what the requests counter records: the HTTP status sent, except 499 when the
    client went away and 502 when the backend failed after a 200 had already been sent.
    """

    __slots__ = (
        "_first",
        "_loop",
        "_metrics",
        "counts",
        "endpoint",
        "model",
        "response",
        "started",
        "status",
        "stopping",
    )

    def __init__(self, request: web.Request, endpoint: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._metrics: AgentMetrics | None = request.app.get(METRICS)
        self._first = False
        self.endpoint = endpoint
        self.model: str | None = None  # the metrics label (see metric_model)
        self.started = self._loop.time()
        self.response: web.StreamResponse | None = None
        self.status: int | None = None
        self.counts: tuple[object, object] | None = None  # the backend's token counts
        #: The shutdown hook cancelled this exchange's task (and nothing has absorbed it yet).
        self.stopping = False

    def first_byte(self) -> None:
        if not self._first:
            self._first = True
            if self._metrics is not None:
                self._metrics.first_byte.labels(self.endpoint).observe(
                    self._loop.time() - self.started
                )

    def tokens(self, prompt: object, completion: object) -> None:
        self.counts = (prompt, completion)
        if self._metrics is None or self.model is None:
            return
        for kind, value in (("prompt", prompt), ("completion", completion)):
            if type(value) is int and value > 0:
                self._metrics.tokens.labels(self.model, kind).inc(value)

    def finish(self, status: int) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(self.endpoint, str(status)).inc()
            self._metrics.latency.labels(self.endpoint).observe(self._loop.time() - self.started)


class _DisconnectWatch:
    """Cancels the handler's task once the client's connection is gone.

    aiohttp only cancels handlers on disconnect when the server runs with
    ``handler_cancellation=True``; this makes the cancellation independent of that setting, so
    a backend generating for a client that left is always told (its connection is closed).
    """

    __slots__ = ("_handle", "_loop", "_request", "_task", "fired")

    def __init__(self, request: web.Request) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._request = request
        self._loop = asyncio.get_running_loop()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(
            _DISCONNECT_POLL_S, self._check
        )

    def _check(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self.fired = True
            self._handle = None
            self._task.cancel()
        else:
            self._handle = self._loop.call_later(_DISCONNECT_POLL_S, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _InFlight:
    """The exchanges running now, by task: the shutdown hook ends them."""

    __slots__ = ("stopping", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[asyncio.Task[Any], Exchange] = {}
        self.stopping = False


_IN_FLIGHT: Final = web.AppKey("forward_in_flight", _InFlight)


#: At shutdown, how long requests in flight get to finish before they are ended.
SHUTDOWN_GRACE_SECONDS = 10.0


async def _stop_in_flight(app: web.Application) -> None:
    """``on_shutdown``: new requests get a 503; those in flight get
    :data:`SHUTDOWN_GRACE_SECONDS` to finish, then are cancelled (each ends itself promptly;
    see :func:`run_exchange` and :func:`_relay_stream`). Without this aiohttp waited its whole
    shutdown timeout for them, then cut streams without an error record."""
    in_flight = app.get(_IN_FLIGHT)
    if in_flight is None:
        return
    in_flight.stopping = True
    running = [task for task in in_flight.tasks if not task.done()]
    if running:
        await asyncio.wait(running, timeout=SHUTDOWN_GRACE_SECONDS)
    for task, exchange in list(in_flight.tasks.items()):
        if not task.done() and not exchange.stopping:
            exchange.stopping = True
            task.cancel()
    if in_flight.tasks:
        log.info(
            "agent shutting down; requests in flight ended",
            extra={"fields": {"requests": len(in_flight.tasks)}},
        )


def _absorb_stop(exchange: Exchange) -> bool:
    """In an ``except CancelledError``: True (the cancellation undone) when the only pending
    cancellation is the shutdown hook's; the caller then ends the exchange itself."""
    task = asyncio.current_task()
    if exchange.stopping and task is not None and task.cancelling() == 1:
        task.uncancel()
        exchange.stopping = False
        return True
    return False


def _shutting_down() -> BackendError:
    return BackendError(503, "the agent is shutting down", "agent_shutting_down", "server_error")


Handler = Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]]
#: Extracts ``(prompt_tokens, completion_tokens)`` from a body or a run of streamed records.
UsageParser = Callable[[bytes], tuple[object, object] | None]


async def run_exchange(request: web.Request, endpoint: str, handler: Handler) -> web.StreamResponse:
    """Run one forwarding handler with metrics, disconnect handling and no escaping errors."""
    exchange = Exchange(request, endpoint)
    in_flight = request.app.get(_IN_FLIGHT)
    task = asyncio.current_task()
    assert task is not None
    if in_flight is not None:
        if in_flight.stopping:
            exchange.finish(503)
            # Nothing reached the backend: a retry (another replica, or after the restart) is
            # safe, so no x-should-retry: false here.
            return error_response(
                503,
                "the agent is shutting down",
                "server_error",
                "agent_shutting_down",
                headers={"Retry-After": "1"},
            )
        in_flight.tasks[task] = exchange
    watch = _DisconnectWatch(request)
    try:
        response = await handler(request, exchange)
    except asyncio.CancelledError:
        watch.stop()
        if watch.fired and not exchange.stopping and task.uncancel() == 0:
            # Our own cancellation: the client is gone; nothing more can reach it.
            exchange.finish(_STATUS_CLIENT_CLOSED)
            log.info(
                "client disconnected; upstream request cancelled",
                extra={"fields": {"endpoint": endpoint, "status": _STATUS_CLIENT_CLOSED}},
            )
            return exchange.response or web.Response(status=_STATUS_CLIENT_CLOSED)
        if exchange.stopping and not watch.fired and _absorb_stop(exchange):
            # The agent is shutting down (the upstream request was closed on the way out).
            if exchange.response is not None:  # (a stream cancelled outside its relay loop)
                exchange.finish(503)
                return exchange.response
            response = _shutting_down().response()
        else:
            exchange.finish(_STATUS_CLIENT_CLOSED)
            raise
    except BackendError as exc:
        response = exc.response()
    except Exception:
        # A bug, not a client error: log it (no request content is in scope), answer 500.
        log.exception("forwarding failed", extra={"fields": {"endpoint": endpoint}})
        response = error_response(500, "internal error while forwarding", "server_error")
    finally:
        watch.stop()
        if in_flight is not None:
            in_flight.tasks.pop(task, None)
    response = await e2e.seal_response(
        request, response, exchange.counts
    )  # a sealed request's answer
    exchange.finish(exchange.status or response.status)
    return response


#: How long a request body may take to arrive (the proxy's own request deadline is 60 s).
BODY_READ_SECONDS = 60.0


async def read_body(request: web.Request, config: AgentConfig) -> bytes:
    """The request body, refusing more than ``max_body_bytes`` with a 413 (a JSON error)."""
    if is_content_encoded(request.headers):
        # Decoded here, the body would reach the backend under a header that no longer fits
        # it; undecodable, it failed as a 500. No client of these APIs compresses requests.
        raise BackendError(
            415, "request bodies must not be content-encoded", "unsupported_content_encoding"
        )
    limit = config.max_body_bytes
    too_large = BackendError(
        413, f"the request body exceeds the limit of {limit} bytes", "body_too_large"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        # A body that stops arriving holds a connection and its buffers: not for ever.
        raise BackendError(
            408, f"the request body did not arrive within {BODY_READ_SECONDS:.0f} s", "timeout"
        ) from None
    if len(body) > limit:
        raise too_large
    try:
        return await e2e.open_body(request, body)  # the plaintext of a sealed body
    except e2e.EnvelopeError as exc:
        raise BackendError(exc.status, exc.message, exc.code) from None


async def inspect_body(body: bytes, model_keys: Iterable[str] = ("model",)) -> dict[str, Any]:
    """:func:`parse_body`, off the event loop for large bodies."""
    if len(body) > _PARSE_OFF_LOOP:
        return await asyncio.to_thread(parse_body, body, tuple(model_keys))
    return parse_body(body, model_keys)


def require_principal(request: web.Request, endpoint: str) -> Principal:
    """The authenticated caller, allowed to use ``endpoint`` (401/403 otherwise)."""
    try:
        principal = request[PRINCIPAL]
    except KeyError:  # the auth middleware did not run: refuse, never forward
        raise BackendError(
            401, "authentication required", "unauthenticated", "authentication_error"
        ) from None
    if not principal.allows_endpoint(endpoint):
        raise BackendError(
            403, f"this token may not use the {endpoint!r} endpoint", "endpoint_not_allowed"
        )
    return principal


def require_model(config: AgentConfig, principal: Principal, model: str) -> None:
    if not model_allowed(config, principal, model):
        raise BackendError(403, f"this token may not use the model {model!r}", "model_not_allowed")


async def _open(
    app: web.Application, method: str, url: URL, body: bytes | None, headers: CIMultiDict[str]
) -> aiohttp.ClientResponse:
    """Send the request; retry once on a fresh connection if it failed before any response."""
    session = app[BACKEND]
    for attempt in (1, 2):
        # A large body goes out in chunks, yielding to the loop between them (BytesIO shares
        # the bytes; it does not copy them).
        data: bytes | io.BytesIO | None = (
            io.BytesIO(body) if body is not None and len(body) > _LARGE_BODY else body
        )
        try:
            return await session.request(
                method, url, data=data, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            raise BackendError(
                503, "the backend is unavailable", "backend_unavailable", "backend_unavailable"
            ) from None
        except _RETRYABLE:
            if attempt == 2:
                raise BackendError(
                    502,
                    "the backend closed the connection without answering",
                    "backend_disconnected",
                    "backend_error",
                ) from None
            # A kept-alive connection the backend had already closed (llama-server does so
            # after every streamed response). Nothing was received: safe to send again.
            session = app[_FRESH]
        except (aiohttp.ClientError, TimeoutError):
            # Not HTTP, a malformed status line or headers, or a timeout while sending.
            raise BackendError(
                502, "the backend answered with an invalid response", "backend_invalid"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def relay(
    request: web.Request,
    exchange: Exchange,
    method: str,
    path: str,
    body: bytes | None,
    *,
    usage: UsageParser,
    strip_usage: bool = False,
) -> web.StreamResponse:
    """Forward one request and relay the backend's answer (streamed or whole) to the client.

    A ``text/event-stream`` answer is relayed as SSE, ``application/x-ndjson`` as NDJSON, any
    other as one body. ``usage`` extracts ``(prompt_tokens, completion_tokens)`` from a whole
    body or from a run of complete streamed records, or returns None.
    """
    app = request.app
    url = URL(app[CONFIG].backend_url).with_path(path).with_query(request.rel_url.raw_query_string)
    headers = upstream_headers(request, has_body=body is not None)
    upstream = await _open(app, method, url, body, headers)
    try:
        if upstream.status >= 300:
            raise await _backend_failure(upstream, exchange)
        content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "").lower()
        if content_type.startswith(("text/event-stream", "application/x-ndjson")):
            framing: Framing = "sse" if content_type.startswith("text/") else "ndjson"
            return await _relay_stream(
                request, upstream, exchange, framing, usage, strip_usage=strip_usage
            )
        return await _relay_whole(upstream, exchange, usage)
    finally:
        _done_with(upstream)


def _done_with(upstream: aiohttp.ClientResponse) -> None:
    # After a complete read the connection goes back to the pool; otherwise (client gone,
    # backend failed, cancellation) it is closed, which tells the backend to stop.
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def _backend_failure(upstream: aiohttp.ClientResponse, exchange: Exchange) -> BackendError:
    """The backend's HTTP error (or redirect) as a :class:`BackendError` keeping its status."""
    body = b""
    try:
        while len(body) < _ERROR_BODY_LIMIT:
            chunk = await upstream.content.read(_ERROR_BODY_LIMIT - len(body))
            if not chunk:
                break
            body += chunk
    except _READ_ERRORS:
        pass  # what arrived is all there is
    exchange.first_byte()
    status = upstream.status
    if status < 400:  # a redirect: nothing a client of the agent could (or should) follow
        log.warning("backend answered a redirect", extra={"fields": {"status": status}})
        return BackendError(502, "the backend answered with a redirect", "backend_invalid")
    log.info(
        "backend answered an error",
        extra={"fields": {"endpoint": exchange.endpoint, "status": status}},
    )
    headers = {}
    if "Retry-After" in upstream.headers:
        headers["Retry-After"] = upstream.headers["Retry-After"]
    content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "").lower()
    payload = _backend_error_body(upstream.status, body, content_type)
    return BackendError(status, payload["error"]["message"], payload=payload, headers=headers)


async def _relay_whole(
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
    usage: UsageParser,
) -> web.Response:
    try:
        body = await upstream.read()
    except _READ_ERRORS:
        log.warning(
            "backend failed mid-response",
            extra={"fields": {"endpoint": exchange.endpoint, "status": 502}},
        )
        raise BackendError(
            502, "the backend failed while answering", "backend_disconnected", "backend_error"
        ) from None
    exchange.first_byte()
    counts = usage(body)
    if counts is not None:
        exchange.tokens(*counts)
    return web.Response(body=body, status=upstream.status, headers=_response_headers(upstream))


class _Framer:
    """Cuts a byte stream after its last complete record; holds only an unfinished record."""

    __slots__ = ("_pending", "_separators")

    def __init__(self, framing: Framing) -> None:
        # An SSE event ends with an empty line (lines end in LF, CRLF or CR); NDJSON with LF.
        self._separators: tuple[bytes, ...] = (
            (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n") if framing == "sse" else (b"\n",)
        )
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        start = max(0, len(self._pending) - 3)
        data = self._pending + chunk if self._pending else chunk
        cut = -1
        for sep in self._separators:
            at = data.rfind(sep, start)
            if at >= 0:
                cut = max(cut, at + len(sep))
        if cut < 0:
            if len(data) > _MAX_PENDING_RECORD:  # not record-shaped after all: stop holding it
                self._pending = b""
                return data
            self._pending = data
            return b""
        self._pending = data[cut:]
        return data if cut == len(data) else data[:cut]

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    @property
    def mid_record(self) -> bool:
        return bool(self._pending)


def _stream_error_record(framing: Framing, *, shutting_down: bool = False) -> bytes:
    message, code, type_ = "the backend failed mid-stream", "backend_stream_error", "backend_error"
    if shutting_down:
        message, code, type_ = "the agent is shutting down", "agent_shutting_down", "server_error"
    if framing == "sse":
        error = {"error": {"message": message, "type": type_, "code": code}}
        return b"event: error\ndata: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"
    # NDJSON is Ollama's framing, and Ollama's error line is {"error": "<text>"}.
    return json.dumps({"error": message, "code": code}, separators=(",", ":")).encode() + b"\n"


async def _relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
    framing: Framing,
    usage: UsageParser,
    *,
    strip_usage: bool = False,
) -> web.StreamResponse:
    headers = _response_headers(upstream)
    headers[hdrs.CACHE_CONTROL] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=upstream.status, headers=headers)
    exchange.response = response
    await response.prepare(request)
    framer = _Framer(framing)
    sealing = e2e.stream_sealing(request, framing)  # a sealed request: each record sealed
    try:
        return await _pump(
            response, upstream.content, exchange, framing, framer, sealing, usage, strip_usage
        )
    except asyncio.CancelledError:
        if not _absorb_stop(exchange):
            raise
    # The agent is shutting down: end the stream well-formed, with the token counts so far
    # (the upstream request is closed by relay() on the way out: the backend stops).
    last_usage = exchange.counts
    exchange.status = 503
    log.info(
        "agent shutting down; stream ended",
        extra={"fields": {"endpoint": exchange.endpoint, "status": 503}},
    )
    record = _stream_error_record(framing, shutting_down=True)
    if sealing is not None:
        ended = sealing.ended
        record = b"" if ended else sealing.seal(record) + sealing.finish(last_usage)
    elif framing == "sse":
        record = _usage_comment(last_usage) + record
    try:
        if record:
            await response.write(record)
        await response.write_eof()
    except ConnectionError:
        exchange.status = _STATUS_CLIENT_CLOSED
    if last_usage is not None:
        exchange.tokens(*last_usage)
    return response


async def _pump(  # noqa: PLR0917
    response: web.StreamResponse,
    content: aiohttp.StreamReader,
    exchange: Exchange,
    framing: Framing,
    framer: _Framer,
    sealing: e2e.StreamSealing | None,
    usage: UsageParser,
    strip_usage: bool,
) -> web.StreamResponse:
    """Relay records from the backend until its stream ends (or fails, or the client goes)."""
    last_usage: tuple[object, object] | None = None
    while True:
        try:
            chunk = await content.readany()
        except _READ_ERRORS:
            # The backend died mid-stream: end the client's stream with a well-formed error
            # record (any torn record it had half-sent is dropped), then close cleanly.
            exchange.status = 502
            log.warning(
                "backend failed mid-stream",
                extra={"fields": {"endpoint": exchange.endpoint, "status": 502}},
            )
            record = _stream_error_record(framing)
            if sealing is not None:
                record = sealing.seal(record) + sealing.finish(None)
            try:
                await response.write(record)
                await response.write_eof()
            except ConnectionError:
                exchange.status = _STATUS_CLIENT_CLOSED
            break
        if not chunk:
            out = framer.flush()
        else:
            exchange.first_byte()
            out = framer.feed(chunk)
        if out:
            found = usage(out)
            if found is not None:
                last_usage = found
                exchange.counts = found  # (so far: a shutdown reports it)
            if framing == "sse" and (
                (strip_usage and b'"usage"' in out) or (sealing is None and b"[DONE]" in out)
            ):
                out = _usage_records(out, None if sealing else last_usage, strip=strip_usage)
            if sealing is not None:
                out = sealing.seal(out)
            try:
                if out:
                    await response.write(out)
            except ConnectionError:
                exchange.status = _STATUS_CLIENT_CLOSED
                log.info(
                    "client disconnected; upstream request cancelled",
                    extra={
                        "fields": {"endpoint": exchange.endpoint, "status": _STATUS_CLIENT_CLOSED}
                    },
                )
                return response
        if not chunk:
            break
    if sealing is not None and not sealing.ended:  # (a failed backend's stream is ended)
        try:
            await response.write(sealing.finish(last_usage))
        except ConnectionError:
            exchange.status = _STATUS_CLIENT_CLOSED
    if last_usage is not None:
        # Usage is cumulative (vLLM's continuous_usage_stats repeats it): count the last one.
        exchange.tokens(*last_usage)
    return response


# ---------------------------------------------------------------------------------------------
# Token usage


_USAGE_RE: Final = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


def openai_usage(data: bytes) -> tuple[object, object] | None:
    """``(prompt_tokens, completion_tokens)`` from the last ``"usage": {...}`` object in ``data``.

    Works on a whole JSON body and on SSE records alike without parsing megabytes of embeddings.
    A ``"usage"`` inside generated text cannot match: JSON escapes its quotes.
    """
    last: tuple[object, object] | None = None
    for match in _USAGE_RE.finditer(data):
        try:
            usage = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(usage, dict):
            last = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    return last


# ---------------------------------------------------------------------------------------------
# Handlers


def _asks_for_usage(data: Mapping[str, Any]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_NO_CHOICES: Final = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def _usage_records(out: bytes, last_usage: tuple[object, object] | None, *, strip: bool) -> bytes:
    """``out`` (complete SSE records) with the usage-only chunk dropped when the client did not
    ask for it (``strip``), and the token counts as an SSE comment (``: cube-usage {...}``,
    which SSE clients ignore) just before ``data: [DONE]``: the proxy meters from it even when
    the client closes at ``[DONE]``."""
    kept: list[bytes] = []
    for record in split_records(out, "sse"):
        if strip and _NO_CHOICES.search(record) and _is_usage_chunk(record):
            continue
        if last_usage is not None and SSE_DONE.search(record):
            kept.append(_usage_comment(last_usage))
        kept.append(record)
    return b"".join(kept)


def _usage_comment(last_usage: tuple[object, object] | None) -> bytes:
    """The token counts as an SSE comment, ``: cube-usage {...}`` (empty without counts)."""
    if last_usage is None:
        return b""
    prompt, completion = last_usage
    counts = {
        k: v
        for k, v in (("prompt_tokens", prompt), ("completion_tokens", completion))
        if type(v) is int and v >= 0
    }
    return b": cube-usage " + json.dumps(counts).encode() + b"\n\n" if counts else b""


def _is_usage_chunk(record: bytes) -> bool:
    """An SSE record whose data is the stream's usage-only chunk (``"choices": []``)."""
    for line in record.splitlines():
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except (ValueError, RecursionError):
                return False
            return isinstance(data, dict) and data.get("choices") == [] and "usage" in data
    return False


_ASK_USAGE: Final = b'"stream_options":{"include_usage":true},'


def _with_usage_asked(body: bytes, data: dict[str, Any]) -> bytes:
    """``body`` asking the backend for a stream's usage. Usually by inserting the member after
    the opening brace (the object has ``stream``, so a member follows; parse_body refused
    duplicate keys, so none is made): re-encoding a large body would hold the GIL, and the
    event loop, for as long as it takes."""
    options = data.get("stream_options")
    if options is None and "stream_options" not in data:
        brace = len(body) - len(body.lstrip())
        return body[: brace + 1] + _ASK_USAGE + body[brace + 1 :]
    options = dict(options) if isinstance(options, dict) else {}
    data["stream_options"] = {**options, "include_usage": True}
    return json.dumps(data).encode()


def _inference(endpoint: str, path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request, exchange: Exchange) -> web.StreamResponse:
        config = request.app[CONFIG]
        principal = require_principal(request, endpoint)
        body = await read_body(request, config)
        # "Stream" or "STREAM_OPTIONS" would be read by one parser and not another.
        data = await inspect_body(body, ("model", "stream", "stream_options"))
        # No model: the backend serves its default one, which is the configured model.
        model = model_field(data) or config.model_name
        require_model(config, principal, model)
        exchange.model = metric_model(config, model)
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            # vLLM streams for "true", 1, "yes", "on" too: such a stream would go unmetered.
            raise BackendError(400, "'stream' must be true or false", "invalid_stream")
        strip_usage = False
        if stream is True and not _asks_for_usage(data):
            # Token counts are metered (and token rate limits charged) whether or not the
            # client asked for them: ask the backend, and give the client what it asked for.
            body = _with_usage_asked(body, data)
            strip_usage = True
        return await relay(
            request, exchange, "POST", path, body, usage=openai_usage, strip_usage=strip_usage
        )

    async def handler(request: web.Request) -> web.StreamResponse:
        return await run_exchange(request, endpoint, handle)

    handler.__name__ = f"{endpoint}_handler"
    return handler


async def fetch_json(request: web.Request, exchange: Exchange, path: str) -> Any:
    """GET ``path`` from the backend and parse its JSON (a :class:`BackendError` otherwise)."""
    url = URL(request.app[CONFIG].backend_url).with_path(path)
    upstream = await _open(request.app, "GET", url, None, upstream_headers(request, has_body=False))
    try:
        if upstream.status >= 300:
            raise await _backend_failure(upstream, exchange)
        try:
            body = await upstream.read()
        except _READ_ERRORS:
            raise BackendError(
                502, "the backend failed while answering", "backend_disconnected", "backend_error"
            ) from None
        exchange.first_byte()
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise BackendError(
                502, "the backend answered something that is not JSON", "backend_invalid"
            ) from None
    finally:
        _done_with(upstream)


async def _list_models(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    config = request.app[CONFIG]
    principal = require_principal(request, "models")
    data = await fetch_json(request, exchange, "/v1/models")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BackendError(502, "the backend's model list is malformed", "backend_invalid")
    # Filter even for an unrestricted principal: a malformed entry is dropped, not relayed.
    data["data"] = [
        entry
        for entry in data["data"]
        if isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and model_allowed(config, principal, entry["id"])
    ]
    return web.json_response(data)


async def list_models(request: web.Request) -> web.StreamResponse:
    return await run_exchange(request, "models", _list_models)


# ---------------------------------------------------------------------------------------------
# Readiness and the client session


async def backend_ready(app: web.Application) -> tuple[bool, str]:
    """Whether the backend answers and lists the configured model (for ``/ready``).

    Asks ``/api/tags`` (Ollama) or ``/v1/models`` (vLLM, llama-server) with a short timeout.
    """
    config = app[CONFIG]
    session = app.get(BACKEND)
    if session is None or session.closed:
        return False, "the backend client is not running"
    ollama = config.backend == "ollama"
    url = URL(config.backend_url).with_path("/api/tags" if ollama else "/v1/models")
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=_READY_TIMEOUT_S),
            headers={hdrs.ACCEPT_ENCODING: "identity"},
        ) as resp:
            if resp.status != 200:
                return False, f"the backend answered HTTP {resp.status}"
            data = json.loads(await resp.read())
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False, "the backend is unreachable"
    except (ValueError, RecursionError):
        return False, "the backend's model list is not JSON"
    names: list[str] = []
    if isinstance(data, dict):
        entries = data.get("models" if ollama else "data")
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict):
                    names.extend(
                        v for k in ("name", "model", "id") if isinstance(v := entry.get(k), str)
                    )
    if ollama:
        from agent.ollama import canonical_model

        found = canonical_model(config.model_name) in {canonical_model(n) for n in names}
    else:
        found = config.model_name in names
    if not found:
        return False, f"the backend does not serve the model {config.model_name!r}"
    return True, f"the backend serves the model {config.model_name!r}"


async def _backend_client(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(
        total=None,  # a generation may take minutes; the client's disconnect ends it
        connect=config.backend_connect_timeout,
        sock_connect=config.backend_connect_timeout,
    )
    common: dict[str, Any] = {
        "timeout": timeout,
        "auto_decompress": False,  # relay the bytes as sent (we ask for identity anyway)
        "cookie_jar": aiohttp.DummyCookieJar(),  # never carry one caller's cookie to another
        "trust_env": False,  # never route loopback traffic through an environment proxy
        "raise_for_status": False,
    }
    pooled = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S), **common
    )
    fresh = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), **common
    )
    app[BACKEND] = pooled
    app[_FRESH] = fresh
    try:
        yield
    finally:
        await pooled.close()
        await fresh.close()


def setup(app: web.Application) -> None:
    """Add the OpenAI-compatible routes (and Ollama's, for an Ollama backend) and the client."""
    config = app[CONFIG]
    app.cleanup_ctx.append(_backend_client)
    app[_IN_FLIGHT] = _InFlight()
    app.on_shutdown.append(_stop_in_flight)
    router = app.router
    router.add_get("/v1/models", list_models, allow_head=False)
    router.add_post("/v1/chat/completions", _inference("chat", "/v1/chat/completions"))
    router.add_post("/v1/completions", _inference("completions", "/v1/completions"))
    router.add_post("/v1/embeddings", _inference("embeddings", "/v1/embeddings"))
    if config.backend == "ollama":
        from agent import ollama

        ollama.setup(app)
