# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""The listening side (proxy/gateway/edge.py): the fast path answers ordinary forwarding
requests itself and hands everything else, at a request boundary, to aiohttp — which then
answers exactly as it always did. Raw sockets, so the bytes on the wire are what is tested."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.agent.backends import FakeOpenAI
from tests.client_cli.conftest import self_signed
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    Agents,
    ProxyFactory,
    ProxyServer,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
)

CHAT = json.dumps({"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _request(
    path: str,
    token: str,
    body: bytes = CHAT,
    *,
    extra: str = "",
    version: str = "HTTP/1.1",
    method: str = "POST",
) -> bytes:
    head = (
        f"{method} {path} {version}\r\nHost: proxy\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


class _Wire:
    """One client connection that reads whole HTTP/1.1 responses."""

    def __init__(self, server: ProxyServer, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock = tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls else sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self) -> tuple[str, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed before a response head")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buffer) < size + 2:
                    self._fill()
                body += self.buffer[:size]
                self.buffer = self.buffer[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                if not self._fill():
                    break
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        return lines[0], headers, body

    def closed_by_server(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire_for(proxy: ProxyFactory):  # type: ignore[no-untyped-def]
    opened: list[_Wire] = []

    def make(server: ProxyServer) -> _Wire:
        wire = _Wire(server)
        opened.append(wire)
        return wire

    yield make
    for wire in opened:
        wire.close()


def test_forward_then_other_routes_on_one_connection(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    """A forwarded answer (fast path), then /health and the JWKS (aiohttp, after the hand-off),
    then another forwarded request (aiohttp now owns the connection): all answered in order."""
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    wire.send(
        _request(f"/{dom.alias}/v1/chat/completions", dom.pat, extra="X-Request-Id: abc12345\r\n")
    )
    status, headers, body = wire.response()
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body)["choices"][0]["message"]["content"]
    assert headers["x-request-id"] == "abc12345"
    assert headers["x-cube-agent"] == f"{dom.alias}-agent-1"
    assert float(headers["x-cube-proxy-ms"]) >= 0
    assert "date" in headers
    wire.send(b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n")
    status, _, body = wire.response()
    assert status.startswith("HTTP/1.1 200") and json.loads(body) == {"status": "ok"}
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat))
    status, _, body = wire.response()
    assert status.startswith("HTTP/1.1 200") and json.loads(body)["choices"]


def test_pipelined_requests_are_answered_in_order(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    server = proxy()
    wire = wire_for(server)
    first = _request(
        f"/{dom.alias}/v1/chat/completions", dom.pat, extra="X-Request-Id: first-0001\r\n"
    )
    second = _request(f"/{dom.alias}/v1/models", dom.pat, b"", method="GET")
    wire.send(first + second + first.replace(b"first-0001", b"third-0003"))
    answers = [wire.response() for _ in range(3)]
    assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 3
    assert answers[0][1]["x-request-id"] == "first-0001"
    assert answers[2][1]["x-request-id"] == "third-0003"
    assert json.loads(answers[1][2])["data"][0]["id"] == "cube-tiny"
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    assert [r.status for r in rows] == [200, 200, 200]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # Another HTTP version: aiohttp serves it (and forwards it).
        (lambda a, t: _request(f"/{a}/v1/chat/completions", t, version="HTTP/1.0"), 200),
        # A chunked request body: aiohttp reads it; the agent gets the same JSON.
        (
            lambda a, t: (
                (
                    f"POST /{a}/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
                    f"Authorization: Bearer {t}\r\nContent-Type: application/json\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                + b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT)
            ),
            200,
        ),
        # A percent-encoded dot segment: refused, as before the fast path existed.
        (lambda a, t: _request(f"/{a}/v1/%2e%2e/admin/users", t), 400),
        # Another method: 405 from the gateway's own handler.
        (lambda a, t: _request(f"/{a}/v1/chat/completions", t, method="PUT"), 405),
        # A folded header line: aiohttp's parser refuses it.
        (lambda a, t: _request(f"/{a}/v1/chat/completions", t, extra="X-A: b\r\n c\r\n"), 400),
        # Two different lengths: a smuggling attempt, refused.
        (lambda a, t: _request(f"/{a}/v1/chat/completions", t, extra="Content-Length: 3\r\n"), 400),
        # A reserved first segment is never a domain.
        (lambda a, t: _request("/admin/v1/chat/completions", t), 404),
        # A length in digits Python's int() reads but HTTP does not ("²", latin-1).
        (
            lambda a, t: (
                f"POST /{a}/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
                f"Authorization: Bearer {t}\r\nContent-Length: \u00b2\r\n\r\n"
            ).encode("latin-1"),
            400,
        ),
        # A control character in a header value.
        (lambda a, t: _request(f"/{a}/v1/chat/completions", t, extra="X-A: a\x01b\r\n"), 400),
    ],
    ids=[
        "http-1.0",
        "chunked-body",
        "encoded-dots",
        "put",
        "folded",
        "two-lengths",
        "reserved",
        "superscript-length",
        "control-character",
    ],
)
def test_unusual_requests_are_answered_by_aiohttp(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    wire_for,  # type: ignore[no-untyped-def]
    request_bytes,  # type: ignore[no-untyped-def]
    status: int,
) -> None:
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    wire.send(request_bytes(dom.alias, dom.pat))
    line, headers, body = wire.response()
    assert int(line.split(" ")[1]) == status, (line, body)
    if status == 200:
        assert json.loads(body)["choices"][0]["message"]["content"]
    elif headers.get("content-type", "").startswith("application/json"):
        assert json.loads(body)["error"]["message"]
        assert "x-request-id" in headers
    else:  # refused by aiohttp's parser itself, before any handler (as always)
        assert line.split(" ")[1] == "400"


def test_body_over_the_limit_is_413(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    wire = wire_for(proxy(replace(TEST_SETTINGS, max_body_bytes=1024)))
    big = json.dumps({"model": "cube-tiny", "prompt": "x" * 4096}).encode()
    wire.send(_request(f"/{dom.alias}/v1/completions", dom.pat, big))
    line, _, body = wire.response()
    assert line.split(" ")[1] == "413", body


def test_refusals_on_the_fast_path_are_json_and_audited(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    server = proxy()
    wire = wire_for(server)
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", "not-a-token"))
    line, headers, body = wire.response()
    assert line == "HTTP/1.1 401 Unauthorized"
    assert headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["content-type"].startswith("application/json")
    # The connection stays usable after a refusal.
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat))
    assert wire.response()[0] == "HTTP/1.1 200 OK"


def test_connection_close_is_honoured(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat, extra="Connection: close\r\n"))
    line, headers, _ = wire.response()
    assert line == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    assert wire.closed_by_server()


def test_stream_on_the_fast_path_is_chunked_and_complete(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    server = proxy()
    wire = wire_for(server)
    stream = json.dumps(
        {
            "model": "cube-tiny",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat, stream))
    line, headers, body = wire.response()
    assert line == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked" and headers["cache-control"] == "no-cache"
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    server.flush()
    (row,) = [r for r in directory.audits if r.event == "request"]
    assert row.status == 200 and row.completion_tokens


def test_https_front_door_fast_path_and_hand_off(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, tmp_path: Path
) -> None:
    """cube-proxy serving HTTPS: a forwarded request (fast path over the TLS transport), then
    /health on the same TLS connection (handed to aiohttp), then a stream."""
    dom = one_domain(directory, agents)
    cert, key = self_signed(tmp_path, "proxy.cube.test")
    server = proxy(tls=(cert, key))
    wire = _Wire(server, ssl.create_default_context(cafile=str(cert)))
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat))
    line, _, body = wire.response()
    assert line == "HTTP/1.1 200 OK" and json.loads(body)["choices"]
    wire.send(b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n")
    line, _, body = wire.response()
    assert line.startswith("HTTP/1.1 200") and json.loads(body) == {"status": "ok"}
    wire.close()
    wire = _Wire(server, ssl.create_default_context(cafile=str(cert)))
    stream = json.dumps({**json.loads(CHAT), "stream": True}).encode()
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat, stream))
    line, headers, body = wire.response()
    assert line == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert body.rstrip().endswith(b"data: [DONE]")
    wire.close()


@pytest.mark.slow  # ~25 s: 45 MB through three Python hops
def test_a_slow_reader_pauses_the_stream_back_to_the_backend(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    wire_for,  # type: ignore[no-untyped-def]
) -> None:
    """Write flow control on the fast path: a client that stops reading stops the proxy reading
    the agent, and so the backend writing (nothing is buffered whole); once it reads again the
    stream arrives complete."""
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    token = "x" * 2000
    fake_openai.tokens = [token] * 20_000  # ~45 MB of events: more than every buffer on the way
    stream = json.dumps({**json.loads(CHAT), "stream": True}).encode()
    wire.send(_request(f"/{dom.alias}/v1/chat/completions", dom.pat, stream))
    assert fake_openai.stream_started.wait(30)
    time.sleep(2)  # not reading
    assert not fake_openai.last_sent.is_set(), "the backend wrote everything: nothing paused"
    line, _, body = wire.response()
    assert line == "HTTP/1.1 200 OK"
    assert body.count(token.encode()) == 20_000
    assert body.rstrip().endswith(b"data: [DONE]")


def test_the_access_log_line_of_the_fast_path(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    wire_for,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same line aiohttp's middleware writes (route template, never the path; domain,
    backend, model), and neither the credential nor the prompt."""
    dom = one_domain(directory, agents)
    wire = wire_for(proxy(replace(TEST_SETTINGS, access_log=True)))
    caplog.set_level(logging.INFO, logger="cube.proxy.access")
    prompt = "PROMPT-IN-NO-LOG-7f3a"
    body = json.dumps({"model": "cube-tiny", "messages": [{"role": "user", "content": prompt}]})
    wire.send(
        _request(
            f"/{dom.alias}/v1/chat/completions?x=1",
            dom.pat,
            body.encode(),
            extra="X-Request-Id: line-0001\r\n",
        )
    )
    assert wire.response()[0] == "HTTP/1.1 200 OK"
    # The line is written after the answer (another thread here): wait for that record itself.
    deadline = time.monotonic() + 5
    access: list[logging.LogRecord] = []
    while time.monotonic() < deadline and not access:
        time.sleep(0.05)
        access = [r for r in caplog.records if r.name == "cube.proxy.access"]
    (record,) = access
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["route"] == "/{domain}/v1/{tail}" and fields["method"] == "POST"
    assert fields["status"] == 200 and fields["request_id"] == "line-0001"
    assert fields["domain"] == dom.alias and fields["model"] == "cube-tiny"
    assert fields["backend_id"] == f"{dom.alias}-agent-1" and fields["ms"] >= 0
    text = json.dumps(fields) + record.getMessage()
    assert dom.pat not in text and prompt not in text and "x=1" not in text


def test_a_large_body_is_not_read_before_the_credential_is_checked(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    """The fast path reads a body before checking the credential, so it takes only small
    ones: an anonymous head announcing 60 MiB is refused at once (aiohttp's handler checks
    the credential first), not buffered while the body trickles in."""
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    wire.send(
        (
            f"POST /{dom.alias}/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
            f"Content-Type: application/json\r\nContent-Length: {60 * 1024 * 1024}\r\n\r\n"
        ).encode()
        + b"x" * 65536
    )
    line, _, body = wire.response()
    assert line.split(" ")[1] == "401", body


def test_a_request_that_never_completes_is_closed(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    wire_for,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body that stops arriving ties up a connection only until the request deadline (as a
    head that never completes does)."""
    import proxy.gateway.edge as edge

    monkeypatch.setattr(edge, "HEAD_TIMEOUT_SECONDS", 1.0)
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    head = _request(f"/{dom.alias}/v1/chat/completions", dom.pat)
    wire.send(head[: len(head) - len(CHAT)] + CHAT[:10])  # the body never completes
    started = time.monotonic()
    assert wire.closed_by_server()
    assert time.monotonic() - started < 9  # the sweeper runs every 5 s


@pytest.mark.parametrize("path", ["fast", "aiohttp"])
def test_unusual_bodies_and_headers_are_forwarded_or_refused_never_a_500(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    wire_for,  # type: ignore[no-untyped-def]
    fake_openai: FakeOpenAI,
    path: str,
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    wire = wire_for(server)
    # The aiohttp path: HTTP/1.0 with keep-alive (the fast path takes only HTTP/1.1).
    version = "HTTP/1.1" if path == "fast" else "HTTP/1.0"
    keep = "" if path == "fast" else "Connection: keep-alive\r\n"
    target = f"/{dom.alias}/v1/chat/completions"
    # JSON nested past Python's recursion limit: no model to read, so the agent judges it.
    deep = b'{"model":"cube-tiny","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    wire.send(_request(target, dom.pat, deep, version=version, extra=keep))
    line, _, _ = wire.response()
    assert line.split(" ")[1] != "500", line
    # A header value that is not ASCII reaches the agent as the bytes the client sent.
    note = "caf\u00e9 \u20ac".encode()
    wire.send(
        _request(target, dom.pat, version=version, extra=keep).replace(
            b"Host: proxy\r\n", b"Host: proxy\r\nX-Note: " + note + b"\r\n"
        )
    )
    line, _, body = wire.response()
    assert line.split(" ")[1] == "200", (line, body)
    seen = fake_openai.requests_to("/v1/chat/completions")[-1]
    assert seen.headers["X-Note"].encode("utf-8", "surrogateescape") == note
    # Nothing leaked: every connection to the agent went back to the pool.
    assert server.gateway.upstream.opened == 1


def test_an_oversized_or_tabbed_head_goes_to_aiohttp_even_pipelined(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    target = f"/{dom.alias}/v1/chat/completions"
    first = _request(target, dom.pat)
    huge = _request(target, dom.pat, extra=f"Cookie: {'c' * 600_000}\r\n")  # aiohttp: 400
    wire.send(first + huge)  # the huge head is complete in the buffer when it is parsed
    assert wire.response()[0] == "HTTP/1.1 200 OK"
    line, _, _ = wire.response()
    assert line.split(" ")[1] in ("400", "431"), line
    tabbed = wire_for(proxy())
    tabbed.send(_request(f"/{dom.alias}/v1/chat/completions\tx", dom.pat))
    line, headers, _ = tabbed.response()
    assert line.split(" ")[1] == "400", line
    assert "x-cube-agent" not in headers  # refused here, not forwarded for the agent to refuse


def test_a_client_that_never_reads_cannot_fill_the_proxys_memory(
    directory: FakeDirectory, proxy: ProxyFactory
) -> None:
    """Anonymous pipelined requests whose answers are never read: the proxy stops reading once
    its buffers are full (1 MiB of requests, the transport's write limit of answers). Before,
    each answer resumed reading whatever was buffered: hundreds of MB in seconds."""
    directory.add_domain("acme")
    server = proxy()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    batch = b"GET /acme/v1/models HTTP/1.1\r\nHost: p\r\n\r\n" * 2000
    sent = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 5:
            try:
                sent += sock.send(batch)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        sock.close()
    # What the two sockets' kernel buffers hold, plus the proxy's bounded buffers.
    assert sent < 24 * 1024 * 1024, f"the proxy took {sent / 2**20:.0f} MiB"


def test_pipelined_requests_past_the_buffer_are_all_answered_once_the_client_reads(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, wire_for
) -> None:  # type: ignore[no-untyped-def]
    """Reading pauses while 1 MiB of requests wait and while answers go unread; it resumes, and
    every request is answered in order, once the client takes its answers."""
    dom = one_domain(directory, agents)
    wire = wire_for(proxy())
    pad = "x" * 8000
    count = 400  # ~3.2 MB: three times what the proxy buffers
    requests = b"".join(
        f"GET /{dom.alias}/v1/models HTTP/1.1\r\nHost: p\r\nX-Pad: {pad}\r\n"
        f"X-Request-Id: req-{i:05d}\r\n\r\n".encode()
        for i in range(count)
    )
    import threading

    sender = threading.Thread(target=wire.send, args=(requests,))
    sender.start()
    time.sleep(1)  # the client reads nothing meanwhile
    ids = [wire.response()[1]["x-request-id"] for _ in range(count)]
    sender.join(10)
    assert ids == [f"req-{i:05d}" for i in range(count)]
