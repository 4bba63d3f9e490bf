"""Hardening found by review: a JWKS that crashed start-up or killed its refresher, request heads
that held megabytes per unauthenticated connection, one peer starving every verifier of
evidence, shutdown cutting streams after 20 s, /ready racing itself, a token with an absurd
``exp`` answering 500, and JWKS parsing on the event loop."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent import auth
from agent import forward as agent_forward
from agent.app import create_app
from agent.auth import MAX_JWKS_KEYS, AuthError, JwksError, JwksFetcher, KeySet, TokenVerifier
from agent.config import ConfigError
from agent.evidence_endpoint import EvidenceService, PeerRateLimit, peer_key
from agent.identity import AgentIdentity
from agent.metrics import AgentMetrics
from agent.server import MAX_HEADER_BYTES, MAX_HEADERS
from attestation.evidence import EvidenceCollector
from attestation.guest import ConfigfsTsm
from attestation.sim import EmulatedConfigfsTsm
from tests.agent.backends import FakeOpenAI, Gate, serving
from tests.agent.conftest import RunningAgent, StartAgent
from tests.agent.test_identity import config
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer

CHAT = "/v1/chat/completions"


def _jwks_with(issuer: TokenIssuer, **fields: Any) -> bytes:
    doc = issuer.jwks()
    doc["keys"][0].update(fields)
    return json.dumps(doc).encode()


# -- F1: a key whose "alg" is not a string ---------------------------------------------------


@pytest.mark.parametrize("alg", [["EdDSA"], {"EdDSA": 1}, 5, True])
def test_a_jwks_key_whose_alg_is_not_a_string_is_a_jwks_error(alg: object, tmp_path: Any) -> None:
    data = _jwks_with(TokenIssuer(), alg=alg)
    with pytest.raises(JwksError, match="does not fit"):
        auth.parse_jwks(data)
    # The callers that refuse to start with one clear line catch JwksError (and ConfigError).
    path = tmp_path / "jwks.json"
    path.write_bytes(data)
    with pytest.raises(JwksError):
        KeySet.from_file(path)
    with pytest.raises(ConfigError, match="jwks"):
        config(jwks_file=None, jwks=data.decode()).validate()


@pytest.fixture
def jwks_server() -> Iterator[tuple[dict[str, bytes], str, ssl.SSLContext, asyncio.Runner]]:
    """A TLS server answering its current ``state["doc"]`` (run on the yielded runner)."""
    state: dict[str, bytes] = {}
    identity = AgentIdentity.generate()
    runner = asyncio.Runner()

    async def handle(request: web.Request) -> web.Response:
        del request
        return web.Response(body=state["doc"], content_type="application/json")

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/jwks.json", handle)
        web_runner = web.AppRunner(app, access_log=None)
        await web_runner.setup()
        await web.TCPSite(web_runner, "127.0.0.1", 0, ssl_context=identity.ssl_context()).start()
        return web_runner

    web_runner = runner.run(start())
    url = f"https://127.0.0.1:{web_runner.addresses[0][1]}/jwks.json"
    client = ssl.create_default_context(cadata=identity.cert_pem.decode())
    try:
        yield state, url, client, runner
    finally:
        runner.run(web_runner.cleanup())
        runner.close()


async def _until(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


def test_the_jwks_refresher_survives_any_bad_document(
    jwks_server: tuple[dict[str, bytes], str, ssl.SSLContext, asyncio.Runner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad document (a list for "alg"), or anything at all raising while a fetch is handled,
    keeps the old keys and the refresher alive: the issuer's next rotation is still picked up."""
    state, url, client, runner = jwks_server
    first, rotated = TokenIssuer(), TokenIssuer()
    rotated.keys = {"ed-2": rotated.keys["ed-1"]}
    state["doc"] = json.dumps(first.jwks()).encode()
    keys = KeySet()
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    fetcher = JwksFetcher(url, keys, ssl_context=client, refresh=0.05, retry=0.05)
    real_parse = auth.parse_jwks

    async def main() -> None:
        ctx = fetcher.cleanup_ctx(web.Application())
        await ctx.__anext__()
        try:
            assert fetcher.fetches == 1
            task = next(t for t in asyncio.all_tasks() if t.get_name() == "jwks-refresh")
            state["doc"] = _jwks_with(first, alg=["EdDSA"])
            await asyncio.sleep(0.3)  # several failed fetches
            assert not task.done()

            def broken(data: bytes) -> Any:
                raise RuntimeError("something unforeseen")

            monkeypatch.setattr(auth, "parse_jwks", broken)
            await asyncio.sleep(0.3)
            assert not task.done()
            assert verifier.verify(first.token()).subject == "user-1"  # the old keys stay
            monkeypatch.setattr(auth, "parse_jwks", real_parse)
            before = fetcher.fetches
            state["doc"] = json.dumps(rotated.jwks()).encode()
            assert await _until(lambda: fetcher.fetches > before)
            assert verifier.verify(rotated.token(kid="ed-2")).subject == "user-1"
        finally:
            with pytest.raises(StopAsyncIteration):
                await ctx.__anext__()  # (cancel_and_wait would re-raise a dead task's error)

    runner.run(main())


# -- F7: JWKS parsing off the loop, and a bounded key count ----------------------------------


def test_a_jwks_with_too_many_keys_is_refused() -> None:
    issuer = TokenIssuer()
    key = issuer.jwks()["keys"][0]
    many = {"keys": [{**key, "kid": f"k{i}"} for i in range(MAX_JWKS_KEYS + 1)]}
    with pytest.raises(JwksError, match=f"more than {MAX_JWKS_KEYS}"):
        auth.parse_jwks(json.dumps(many).encode())
    many["keys"].pop()
    assert len(auth.parse_jwks(json.dumps(many).encode())) == MAX_JWKS_KEYS


def test_a_fetched_jwks_is_parsed_off_the_event_loop(
    jwks_server: tuple[dict[str, bytes], str, ssl.SSLContext, asyncio.Runner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, url, client, runner = jwks_server
    state["doc"] = json.dumps(TokenIssuer().jwks()).encode()
    threads: list[threading.Thread] = []
    real_parse = auth.parse_jwks

    def recording(data: bytes) -> Any:
        threads.append(threading.current_thread())
        return real_parse(data)

    monkeypatch.setattr(auth, "parse_jwks", recording)
    fetcher = JwksFetcher(url, KeySet(), ssl_context=client)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await fetcher.fetch_once(session)

    runner.run(main())
    assert fetcher.fetches == 1
    assert threads and threads[0] is not threading.main_thread()


# -- F6: an absurd exp -----------------------------------------------------------------------


@pytest.mark.parametrize("exp", [10**400, -(10**400)])
def test_a_token_with_an_enormous_exp_is_refused_with_401(exp: int) -> None:
    issuer = TokenIssuer()
    keys = KeySet(auth.parse_jwks(json.dumps(issuer.jwks()).encode()))
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    token = issuer.token(exp=exp)
    with pytest.raises(AuthError) as err:
        verifier.verify(token)
    assert err.value.status == 401


# -- F2: bounded request heads ---------------------------------------------------------------


def _raw_request(agent: RunningAgent, head: bytes) -> int:
    conn = agent.connection(timeout=10)
    conn.connect()
    assert conn.sock is not None
    conn.sock.sendall(head)
    response = http.client.HTTPResponse(conn.sock)
    response.begin()
    status = response.status
    conn.close()
    return status


def test_request_heads_are_bounded(start_agent: StartAgent) -> None:
    """Few headers, none much longer than the longest token auth accepts: an unfinished head
    holds little memory (128 headers of 32 KiB each held about 8.5 MiB a connection)."""
    agent = start_agent()
    assert MAX_HEADERS <= 32
    assert 16 * 1024 + len("Bearer ") < MAX_HEADER_BYTES <= 18 * 1024
    assert agent.server._runner is not None
    server = agent.server._runner.server
    assert server is not None
    kwargs = server._kwargs
    assert kwargs["max_headers"] == MAX_HEADERS
    assert kwargs["max_field_size"] == MAX_HEADER_BYTES
    base = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    assert _raw_request(agent, base + b"\r\n") == 200
    many = b"".join(b"X-Pad-%d: a\r\n" % i for i in range(MAX_HEADERS + 8))
    assert 400 <= _raw_request(agent, base + many + b"\r\n") < 500
    long = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n"
    assert 400 <= _raw_request(agent, base + long + b"\r\n") < 500
    # The longest token auth considers still reaches auth (a JSON 401, not aiohttp's 400).
    token = b"a" * (16 * 1024)
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    assert _raw_request(agent, head) == 401


# -- F3: evidence rate limits per peer -------------------------------------------------------


def test_peer_rate_limit_unit() -> None:
    now = [0.0]
    limit = PeerRateLimit(1.0, 2, factor=2, max_peers=3, clock=lambda: now[0])
    assert [limit.take("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert limit.take("10.0.0.1") > 0  # this peer is over its rate...
    assert limit.take("10.0.0.2") == 0.0  # ...another is not
    assert limit.take("10.0.0.2") == 0.0
    assert limit.take("10.0.0.3") > 0  # the shared ceiling (2 x 2) is spent
    assert limit.take("10.0.0.3") > 0  # (refused by the ceiling: its own bucket kept)
    now[0] = 2.0
    assert limit.take("10.0.0.3") == 0.0
    for i in range(10):
        limit.take(f"10.0.1.{i}")
    assert len(limit) == 3  # bounded
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert peer_key(None) == ""


def test_one_peer_cannot_starve_another_of_evidence() -> None:
    """Peer A loops on /attestation; peer B still gets evidence."""
    emulation = EmulatedConfigfsTsm.snp()
    issuer = TokenIssuer()
    app = create_app(
        config(evidence_rate_per_second=0.01, evidence_burst=2),
        identity=AgentIdentity.generate(),
        collector=EvidenceCollector(tee=ConfigfsTsm(emulation.root, fs=emulation)),
        keys=KeySet(auth.parse_jwks(json.dumps(issuer.jwks()).encode())),
    )

    @web.middleware
    async def peer_from_header(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(
            request.clone(remote=request.headers["X-Peer"])
        )
        return response

    app.middlewares.insert(0, peer_from_header)

    async def main() -> tuple[list[int], int]:
        async with TestClient(TestServer(app)) as client:
            url = "/attestation?nonce=" + "ab" * 32
            a = [(await client.get(url, headers={"X-Peer": "192.0.2.1"})).status for _ in range(6)]
            b = (await client.get(url, headers={"X-Peer": "192.0.2.2"})).status
            return a, b

    a, b = asyncio.run(main())
    assert a == [200, 200, 429, 429, 429, 429]
    assert b == 200


# -- F5: concurrent /ready polls share one trial ---------------------------------------------


def test_concurrent_ready_polls_share_one_trial() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    now = [1000.0]
    metrics = AgentMetrics()
    service = EvidenceService(
        config=config(),
        identity=AgentIdentity.generate(),
        collector=EvidenceCollector(tee=ConfigfsTsm(emulation.root, fs=emulation)),
        metrics=metrics,
        clock=lambda: now[0],
    )

    async def main() -> list[tuple[bool, str]]:
        await service.collect(bytes(32))  # the start-up self-test
        now[0] += 61  # a quiet minute: the next poll runs a trial
        return list(await asyncio.gather(*(service.obtainable() for _ in range(3))))

    results = asyncio.run(main())
    assert all(ok for ok, _ in results), results
    ok = metrics.registry.get_sample_value("cube_agent_evidence_total", {"outcome": "ok"})
    assert ok == 2  # the self-test and one shared trial


# -- F4: shutdown ends streams in flight at once ---------------------------------------------


class _MeteredEachChunk(FakeOpenAI):
    """Reports the usage so far in every chunk (vLLM's continuous_usage_stats)."""

    def _events(
        self, kind: str, model: str, created: int, usage: dict[str, int] | None
    ) -> list[bytes]:
        events = super()._events(kind, model, created, usage)
        running = b'"usage": {"prompt_tokens": 11, "completion_tokens": 1}'
        return [events[0].replace(b'"usage": null', running), *events[1:]]


@pytest.fixture
def held_backend() -> Iterator[_MeteredEachChunk]:
    backend = _MeteredEachChunk()
    with serving(backend):
        yield backend
        for gate in (backend.gate, backend.hold):
            if gate is not None:
                gate.open()


def _chat(stream: bool) -> str:
    body = {"model": "cube-tiny", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps(body)


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """Requests in flight get half a second to finish once stopping begins."""
    monkeypatch.setattr(agent_forward, "SHUTDOWN_GRACE_SECONDS", 0.5)
    return 0.5


def test_stopping_ends_a_stream_in_flight_after_the_grace_with_an_error_and_the_usage(
    start_agent: StartAgent, held_backend: _MeteredEachChunk, short_grace: float
) -> None:
    held_backend.gate = Gate()  # the backend sends its first event, then waits for ever
    agent = start_agent({"backend_url": held_backend.url})
    conn = agent.connection(timeout=30)
    headers = {"Authorization": f"Bearer {agent.token()}", "Content-Type": "application/json"}
    conn.request("POST", CHAT, body=_chat(stream=True), headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    first = response.read1(65536)
    assert first.startswith(b"data: ")
    started = time.monotonic()
    stopper = threading.Thread(target=agent.stop)
    stopper.start()
    rest = response.read()  # the stream ends cleanly (no IncompleteRead)
    stopper.join(30)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert rest.endswith(b"\n\n")
    assert b': cube-usage {"prompt_tokens": 11, "completion_tokens": 1}\n\n' in rest
    error_line = next(line for line in rest.splitlines() if line.startswith(b"data: "))
    assert json.loads(error_line[6:])["error"]["code"] == "agent_shutting_down"
    assert rest.index(b"cube-usage") < rest.index(b"event: error")
    assert held_backend.cancelled.wait(5), "the backend was not told"


def test_stopping_answers_a_request_waiting_on_the_backend_with_503(
    start_agent: StartAgent, held_backend: _MeteredEachChunk, short_grace: float
) -> None:
    held_backend.hold = Gate()  # a non-streamed answer the backend never finishes
    agent = start_agent({"backend_url": held_backend.url})
    conn = agent.connection(timeout=30)
    headers = {"Authorization": f"Bearer {agent.token()}", "Content-Type": "application/json"}
    conn.request("POST", CHAT, body=_chat(stream=False), headers=headers)
    assert held_backend.held.wait(5)
    started = time.monotonic()
    stopper = threading.Thread(target=agent.stop)
    stopper.start()
    response = conn.getresponse()
    body = response.read()
    stopper.join(30)
    assert time.monotonic() - started < 5
    assert response.status == 503
    assert json.loads(body)["error"]["code"] == "agent_shutting_down"
    assert held_backend.cancelled.wait(5), "the backend was not told"


def test_a_request_that_finishes_within_the_grace_is_answered_whole(
    start_agent: StartAgent, held_backend: _MeteredEachChunk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping does not cut what would finish anyway: the grace lets it end normally."""
    monkeypatch.setattr(agent_forward, "SHUTDOWN_GRACE_SECONDS", 20.0)
    held_backend.hold = Gate()
    agent = start_agent({"backend_url": held_backend.url})
    conn = agent.connection(timeout=30)
    headers = {"Authorization": f"Bearer {agent.token()}", "Content-Type": "application/json"}
    conn.request("POST", CHAT, body=_chat(stream=False), headers=headers)
    assert held_backend.held.wait(5)
    stopper = threading.Thread(target=agent.stop)
    stopper.start()
    time.sleep(0.5)  # stopping has begun...
    held_backend.hold.open()  # ...and the backend answers within the grace
    response = conn.getresponse()
    body = response.read()
    stopper.join(30)
    assert response.status == 200, body
    assert json.loads(body)["choices"]
