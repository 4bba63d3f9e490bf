"""The proxy's listening side: a lean HTTP/1.1 server for the forwarding routes, in front of the
aiohttp application for everything else.

Why: profiled under load, aiohttp's server machinery (request objects, middlewares, router,
response objects, its writer) was the largest share of the ~0.7-1.1 ms of CPU cube-proxy spent
per forwarded request; the forwarding itself is small. So the requests that make up the
traffic — ``POST``/``GET`` to ``/{domain}/v1/...``, ``/{domain}/api/...`` and ``/v1/...`` —
are parsed here, straight off the transport, and go through the same exchange
(:func:`proxy.gateway.forward.prepare` / :func:`~proxy.gateway.forward.forward` /
:func:`~proxy.gateway.forward.finish`: authentication, scope, limits, the attestation gate,
pinned TLS, metering, audit) as aiohttp's handlers for those routes.

Anything else hands the connection to aiohttp (its ``RequestHandler`` protocol takes over the
transport with the bytes already read) at a request boundary, for good: the admin API, JWKS,
``/health``, ``/metrics``, evidence pass-through, and every request this parser does not take
as ordinary — another method or HTTP version, ``Transfer-Encoding``, ``Expect``, ``Upgrade``,
a folded or malformed header, a percent-encoded path, a head over 16 KiB or a header line over
8190 bytes, a body over 1 MiB (read here before the credential is checked, so only small ones;
aiohttp's handlers check it first). aiohttp's
strict parser and handlers then answer exactly as they did before this module existed.

What the fast path keeps of aiohttp's behaviour: keep-alive (idle connections closed after
:data:`KEEPALIVE_SECONDS`), pipelined requests answered in order, a client that disconnects
cancels its request (the agent connection is closed, the agent stops generating), ``Date``
and ``X-Request-Id`` on every answer, the JSON access-log line, JSON errors, write flow
control (a slow reader pauses the stream, never buffers it whole).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from cube._logging import log_line
from cube._tasks import cancel_and_wait
from proxy.db.engine import is_unavailable
from proxy.directory import RESERVED_ALIASES
from proxy.gateway.agents import Agent, Trust
from proxy.gateway.errors import DATABASE_UNAVAILABLE, GatewayError, error_document
from proxy.gateway.forward import (
    PROXY_MS_HEADER,
    SHOULD_RETRY_HEADER,
    Exchange,
    Incoming,
    client_gone,
    finish,
    forward,
    is_e2e,
    is_listing,
    is_ollama_route,
    is_stream,
    merged_listing,
    prepare,
    read_whole,
    record_error,
    response_headers,
    route_name,
    should_not_retry,
    stream_ended,
    whole_usage,
)
from proxy.gateway.metering import UsageScanner
from proxy.gateway.ops import ACCESS_LOG, access_log, request_id_for
from proxy.gateway.service import GATEWAY, Gateway
from proxy.gateway.upstream import UpstreamError, UpstreamResponse

__all__ = ["KEEPALIVE_SECONDS", "EdgeSite"]

log = logging.getLogger("cube.proxy")

#: Idle keep-alive connections are closed after this long (aiohttp's default).
KEEPALIVE_SECONDS: Final = 75.0
#: A request (head and body) not complete after this long closes the connection.
HEAD_TIMEOUT_SECONDS: Final = 60.0
#: At shutdown, how long answers in progress on the fast path get to finish before they are cut.
DRAIN_SECONDS: Final = 10.0
_MAX_HEAD: Final = 16 * 1024
_MAX_HEADER_LINE: Final = 8190  # aiohttp's limit: a longer line is aiohttp's to refuse
#: Bodies are read before the credential is checked here, so larger ones go to aiohttp, whose
#: handlers check it first: an anonymous client can make the fast path hold this much at most.
_MAX_FAST_BODY: Final = 1024 * 1024
_MAX_HEADERS: Final = 100
#: Pipelined bytes buffered beyond the request being answered before reading pauses.
_MAX_BUFFERED: Final = 1024 * 1024
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ROUTES: Final = {"v1": ("/v1/", False), "api": ("/api/", True)}
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}


class _Date:
    """The ``Date`` header, formatted once a second."""

    second = 0
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True)
        return cls.value


@dataclass(slots=True, kw_only=True)
class _Request:
    """One parsed request head (the body follows in the buffer)."""

    inc: Incoming
    alias: str | None
    prefix: str
    tail: str
    ollama: bool
    body_length: int
    close: bool


class _Reply:
    """A whole answer, written once its audit row is taken care of."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _HandOff(Exception):
    """This request is aiohttp's to answer."""


def _head_bytes(
    status: int, headers: list[tuple[str, str]], request_id: str, *, framing: str, close: bool
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append(f"X-Request-Id: {request_id}\r\nDate: {_Date.now()}\r\nServer: cube-proxy\r\n")
    lines.append(framing)
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _error_reply(ex: Exchange, error: GatewayError) -> _Reply:
    record_error(ex, error)
    document = error_document(
        error.status,
        error.message,
        type_=error.type,
        code=error.code,
        ollama=is_ollama_route(ex),
    )
    body = json.dumps(document).encode()
    headers = [("Content-Type", "application/json; charset=utf-8")]
    headers += list(error.headers.items())
    headers.append((PROXY_MS_HEADER, ex.added_ms()))
    if should_not_retry(ex, error):
        headers.append((SHOULD_RETRY_HEADER, "false"))
    return _Reply(error.status, headers, body)


class _Connection(asyncio.Protocol):
    """One client connection, until it is handed to aiohttp."""

    def __init__(self, site: EdgeSite) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.pending: _Request | None = None
        self.paused_writing = False
        self.drained: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.closing = False
        self.last_active = time.monotonic()
        #: When the request now being read began to arrive (None between requests).
        self.head_started: float | None = None
        self.streaming = False  # a stream's head was written for the request being answered

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.site.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.connections.discard(self)
        self.transport = None
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: stop the agent too
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if self.task is None and self.transport is not None:
            asyncio.get_running_loop().call_soon(self._next)  # held back while writes were

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next()
        # Bounded whatever the client does: pipelining requests without reading the answers
        # fills the buffer, and then nothing more is read until requests are taken from it.
        if (
            len(self.buffer) > _MAX_BUFFERED
            and not self.reading_paused
            and self.transport is not None
        ):
            self.transport.pause_reading()
            self.reading_paused = True

    def eof_received(self) -> bool | None:
        # As aiohttp: a client that ends its side has gone (its request is cancelled when the
        # transport, closing itself now, reports the connection lost).
        return None

    # -- requests ----------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next complete request in the buffer (or hand the connection over)."""
        if self.transport is None or self.task is not None:
            return
        if self.paused_writing:
            return  # the client is not reading its answers: no new one until it does
        if self.reading_paused and len(self.buffer) <= _MAX_BUFFERED:
            self.transport.resume_reading()
            self.reading_paused = False
        if self.closing:
            self._close()
            return
        buffer = self.buffer
        request = self.pending
        if request is None:
            if not buffer:
                self.head_started = None
                return
            if self.head_started is None:
                self.head_started = time.monotonic()
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > _MAX_HEAD:
                if len(buffer) > _MAX_HEAD:
                    self._hand_off()
                return
            try:
                parsed: _Request | None = self._parse(bytes(buffer[:end]))
            except (_HandOff, ValueError, UnicodeError):
                parsed = None  # anything this parser does not take, aiohttp's judges
            if parsed is None:
                self._hand_off()  # outside the except block: no exception context to carry
                return
            request = parsed
            del buffer[: end + 4]
            self.pending = request
        if len(buffer) < request.body_length:
            return
        body = bytes(buffer[: request.body_length])
        del buffer[: request.body_length]
        self.pending = None
        self.head_started = None
        self.task = asyncio.get_running_loop().create_task(self._serve(request, body))

    def _parse(self, head: bytes) -> _Request:
        """The request head, if the fast path takes it; else :class:`_HandOff`."""
        if _CONTROL.search(head.replace(b"\r\n", b"")) or b"\t" in head.split(b"\r\n", 1)[0]:
            raise _HandOff  # control characters (bare CR or LF, NUL, a tab in the request line)
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in ("GET", "POST"):
            raise _HandOff
        method, target = parts[0], parts[1]
        if len(lines) > _MAX_HEADERS or "%" in target or "#" in target:
            raise _HandOff
        path, _, query = target.partition("?")
        route = self._route(path) if self.site.fast else None
        if route is None:
            raise _HandOff
        headers: CIMultiDict[str] = CIMultiDict()
        length = 0
        close = False
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.fullmatch(name) or len(line) > _MAX_HEADER_LINE:
                raise _HandOff  # includes folded lines (a leading space)
            lower = name.lower()
            value = value.strip(" \t")
            if lower == "content-length":
                digits = value.isascii() and value.isdigit() and len(value) <= 18
                if not digits or "Content-Length" in headers:
                    raise _HandOff
                length = int(value)
            elif lower in ("transfer-encoding", "expect", "upgrade"):
                raise _HandOff
            elif lower == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "upgrade" in tokens:
                    raise _HandOff
                close = "close" in tokens
            headers.add(name, value)
        if length > min(self.site.max_body, _MAX_FAST_BODY):
            raise _HandOff  # aiohttp checks the credential first, and answers 413 past the limit
        alias, prefix, tail, ollama = route
        inc = Incoming(
            method=method,
            raw_path=path,
            query=query,
            headers=headers,
            request_id=request_id_for(headers.get("X-Request-Id")),
        )
        return _Request(
            inc=inc,
            alias=alias,
            prefix=prefix,
            tail=tail,
            ollama=ollama,
            body_length=length,
            close=close,
        )

    def _route(self, path: str) -> tuple[str | None, str, str, bool] | None:
        """(domain alias, route prefix, tail, Ollama?) of a forwarding path, else None."""
        if "//" in path or "\\" in path:
            return None
        if path.startswith("/v1/"):
            return None, "/v1/", path[4:], False
        parts = path.split("/", 3)
        if len(parts) != 4 or parts[0]:
            return None
        alias, kind, tail = parts[1], parts[2], parts[3]
        found = _ROUTES.get(kind)
        if found is None or not alias or alias in self.site.not_aliases:
            return None
        return alias, found[0], tail, found[1]

    def _hand_off(self) -> None:
        """aiohttp's ``RequestHandler`` takes this connection over, with the bytes read."""
        transport = self.transport
        if transport is None:
            return
        self.site.connections.discard(self)
        if self.reading_paused:
            transport.resume_reading()  # aiohttp's handler does its own flow control
            self.reading_paused = False
        handler = self.site.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        self.transport = None
        if data:
            handler.data_received(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- the exchange --------------------------------------------------------------------------

    async def _serve(self, request: _Request, body: bytes) -> None:
        site = self.site
        gw = site.gateway
        inc = request.inc
        ex = Exchange(route=route_name(request.prefix + request.tail))
        fields: dict[str, object] = {}
        reply: _Reply | None = None
        status = 500

        async def read_body() -> bytes:
            return body

        try:
            try:
                prep = await prepare(
                    gw,
                    ex,
                    inc,
                    request.alias,
                    request.tail,
                    ollama=request.ollama,
                    read_body=read_body,
                )
                if is_listing(ex, inc.method):
                    status, headers, listing = await merged_listing(gw, ex, prep)
                    ex.status = status
                    headers.append((PROXY_MS_HEADER, ex.added_ms()))
                    reply = _Reply(status, headers, listing)
                else:
                    reply = await forward(
                        gw,
                        ex,
                        inc.method,
                        prep,
                        lambda upstream, agent, trust: self._relay(
                            gw, ex, request, fields, upstream, agent=agent, trust=trust
                        ),
                    )
            except GatewayError as error:
                reply = _error_reply(ex, error)
            except asyncio.CancelledError:
                client_gone(gw, ex)
                raise
            finally:
                waiter = finish(gw, ex, fields)
            if reply is not None:
                if waiter is not None:
                    try:
                        await waiter
                    except Exception:
                        reply = _error_reply(
                            ex,
                            GatewayError(
                                503, "the request could not be audited", code="audit_unavailable"
                            ),
                        )
                self._write_reply(reply, inc.request_id, close=request.close)
            status = ex.status
        except asyncio.CancelledError:
            status = ex.status
            raise
        except Exception as exc:
            if is_unavailable(exc) and not self.streaming:
                log.error(  # noqa: TRY400 - the type only: an outage, not a bug to trace
                    "database unavailable: %s", type(exc).__name__
                )
                message, code = DATABASE_UNAVAILABLE
                outage = GatewayError(503, message, code=code, headers={"Retry-After": "1"})
                reply = _error_reply(ex, outage)
                self._write_reply(reply, inc.request_id, close=request.close)
                status = 503
                return
            log.exception(
                "unhandled error",
                extra={
                    "fields": {"route": self._route_label(request), "request_id": inc.request_id}
                },
            )
            status = 500
            self.closing = True
            if self.streaming:
                # A stream's head is out: no clean answer can follow; the client must see a cut.
                if self.transport is not None:
                    self.transport.abort()
            else:
                self._write_reply(
                    _error_reply(ex, GatewayError(500, "internal error", code="internal_error")),
                    inc.request_id,
                    close=True,
                )
        finally:
            if site.access_log:
                fields = {
                    "method": inc.method,
                    "route": self._route_label(request),
                    "status": status,
                    "ms": round((time.perf_counter() - ex.started) * 1000, 3),
                    "request_id": inc.request_id,
                    **fields,
                }
                log_line(access_log, "request", fields)
            self.task = None
            self.streaming = False
            self.last_active = time.monotonic()
            if request.close:
                self.closing = True
            if self.transport is not None:
                asyncio.get_running_loop().call_soon(self._next)

    @staticmethod
    def _route_label(request: _Request) -> str:
        """The route template, as aiohttp's access-log line names it."""
        if request.alias is None:
            return "/v1/{tail}"
        return "/{domain}" + request.prefix + "{tail}"

    def _write_reply(self, reply: _Reply, request_id: str, *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = _head_bytes(
            reply.status,
            reply.headers,
            request_id,
            framing=f"Content-Length: {len(reply.body)}\r\n",
            close=close,
        )
        transport.write(head + reply.body)

    async def _drain(self) -> None:
        if self.paused_writing and self.transport is not None:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained

    async def _relay(
        self,
        gw: Gateway,
        ex: Exchange,
        request: _Request,
        fields: dict[str, object],
        upstream: UpstreamResponse,
        *,
        agent: Agent,
        trust: Trust,
    ) -> _Reply | None:
        headers = response_headers(upstream, agent, trust)
        ex.status = upstream.status
        if not is_stream(upstream):
            body = await read_whole(gw, ex, upstream, agent)
            ex.usage = whole_usage(upstream, body)
            headers.append((PROXY_MS_HEADER, ex.added_ms()))
            return _Reply(upstream.status, headers, body)

        headers += [
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            (PROXY_MS_HEADER, ex.added_ms()),
        ]
        transport = self.transport
        if transport is None or transport.is_closing():
            raise asyncio.CancelledError
        out = _Coalescer(transport, ex)
        self.streaming = True
        out.add(
            _head_bytes(
                upstream.status,
                headers,
                request.inc.request_id,
                framing="Transfer-Encoding: chunked\r\n",
                close=request.close,
            )
        )
        scanner = UsageScanner()
        sealed = is_e2e(request.inc.headers)
        try:
            async for chunk in upstream.chunks():
                if not chunk:
                    continue
                scanner.feed(chunk)
                if transport.is_closing():
                    client_gone(gw, ex)
                    ex.usage = scanner.charged()
                    return None
                end = not ex.delivered and stream_ended(chunk, sealed=sealed)
                out.add(b"%x\r\n%b\r\n" % (len(chunk), chunk), last_event=end)
                if end:
                    ex.usage = scanner.charged()  # the answer is whole: its usage is known now
                if self.paused_writing:
                    try:
                        await self._drain()
                    except ConnectionError:
                        client_gone(gw, ex)
                        ex.usage = scanner.charged()
                        return None
        except UpstreamError:
            # The agent went away mid-stream: end the client's connection without a clean end
            # of stream, so it cannot take a truncated answer for a complete one.
            out.flush()
            ex.status = 502
            ex.detail = "agent disconnected mid-stream"
            ex.usage = scanner.charged()  # whatever counts arrived are charged
            transport.abort()
            return None
        except asyncio.CancelledError:
            ex.usage = scanner.charged()  # the client left: what it was sent is charged
            raise
        except Exception:
            ex.status = 500  # _serve aborts the connection (the head is out)
            ex.usage = scanner.charged()
            raise
        ex.usage = scanner.charged()
        if gw.settings.durable_audit:
            # The stream's clean end is withheld until its audit row is committed.
            out.flush()
            waiter = finish(gw, ex, fields)
            if waiter is not None:
                try:
                    await waiter
                except Exception:
                    transport.abort()
                    return None
        if transport.is_closing():
            ex.detail = "client closed before the end of the chunked stream"
        else:
            out.add(b"0\r\n\r\n")
        out.flush()
        return None


class _Coalescer:
    """A stream's frames, written together when they come in one turn of the event loop (an
    agent's burst of events read at once goes out in one write, not one system call each);
    a frame never waits longer than the end of the current turn."""

    __slots__ = ("ex", "frames", "last_event", "scheduled", "transport")

    def __init__(self, transport: asyncio.Transport, ex: Exchange) -> None:
        self.transport = transport
        self.ex = ex
        self.frames: list[bytes] = []
        self.scheduled = False
        self.last_event = False

    def add(self, frame: bytes, *, last_event: bool = False) -> None:
        self.frames.append(frame)
        self.last_event = self.last_event or last_event
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if not self.frames:
            return
        data = b"".join(self.frames)
        self.frames.clear()
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self.last_event:
            # The stream's last event was handed to the transport: a client closing after
            # it received the whole answer.
            self.ex.delivered = True


class EdgeSite(web.TCPSite):
    """A :class:`aiohttp.web.TCPSite` whose connections start on the fast path."""

    def __init__(self, runner: web.AppRunner, *args: object, **kwargs: object) -> None:
        super().__init__(runner, *args, **kwargs)  # type: ignore[arg-type]
        self.connections: set[_Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        app = runner.app
        gateway = app.get(GATEWAY)
        #: Without a gateway (an application of other routes only) every connection is aiohttp's.
        self.fast = gateway is not None
        self.gateway: Gateway = gateway  # type: ignore[assignment]  # only used when fast
        self.access_log = app.get(ACCESS_LOG, True)
        self.max_body = gateway.settings.max_body_bytes if gateway is not None else 0
        # First path segments of the application's other routes: never taken for a domain.
        self.not_aliases = set(RESERVED_ALIASES)
        for resource in app.router.resources():
            first = resource.canonical.split("/", 2)[1] if resource.canonical else ""
            if first and "{" not in first:
                self.not_aliases.add(first)

    def aiohttp_server(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = lambda: _Connection(self)  # noqa: E731
        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port
        self._sweeper = loop.create_task(self._sweep())

    async def stop(self) -> None:
        if self.fast:
            self.gateway.stopping = True
        await cancel_and_wait(self._sweeper)
        await super().stop()
        # Idle connections close now; one answering closes once its answer is written.
        for conn in list(self.connections):
            if conn.task is None:
                conn._close()
            else:
                conn.closing = True
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    async def _sweep(self) -> None:
        """Close idle keep-alive connections and requests (head and body) that never complete."""
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.task is not None:
                    continue  # answering
                if conn.paused_writing and now - conn.last_active > HEAD_TIMEOUT_SECONDS:
                    # Answers it does not read, requests waiting behind them: a client gone
                    # quiet, whose unsent bytes close() would wait for.
                    if conn.transport is not None:
                        conn.transport.abort()
                    continue
                started = conn.head_started
                if (started is not None and now - started > HEAD_TIMEOUT_SECONDS) or (
                    started is None
                    and not conn.buffer
                    and now - conn.last_active > KEEPALIVE_SECONDS
                ):
                    conn._close()
