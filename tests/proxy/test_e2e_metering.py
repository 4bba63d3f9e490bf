# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""End-to-end encrypted traffic through the gateway (contract §3, docs/e2e-encryption.md):
``application/cube-e2e`` bodies pass byte for byte, are routed by ``Cube-E2E-Model``, and are
metered from the agent's plaintext ``Cube-Usage`` header (whole answers) or its
``event: cube-usage`` SSE event (streams). The agent is a stub (HTTPS, genuine simulated
evidence) that answers the way an encrypting agent does. Also ``durable_audit``: the answer
completes only once its audit row is committed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from proxy.directory import AuditRecord
from proxy.gateway.metering import UsageScanner, estimated_prompt_tokens, parse_usage_header
from tests.agent.backends import BackgroundLoop
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    ProxyFactory,
    ProxyServer,
    Reply,
    directory,
    proxy,
    sim_policy,
)
from tests.proxy.stubs import StubAgent, header

E2E = "application/cube-e2e"
#: Opaque bytes, as a sealed envelope is to the proxy: not JSON, not UTF-8, includes CR/LF and
#: a '"usage"' lookalike that must not be metered.
SEALED = (
    b"cube-e2e/1\x00" + os.urandom(64) + b'\r\n"usage":{"prompt_tokens":999}' + bytes(range(256))
)


@pytest.fixture
def stub() -> Iterator[StubAgent]:
    loop = BackgroundLoop()
    agent = StubAgent(loop).start()
    try:
        yield agent
    finally:
        agent.stop()
        loop.close()


def _domain(
    directory: FakeDirectory, stub: StubAgent, *, pat_models: frozenset[str] | None = None
) -> str:
    directory.add_domain("acme", policy=sim_policy())
    directory.add_member("acme", "user-7")
    directory.add_backend("acme", stub.url, backend_id="stub", models=("cube-tiny", "other"))
    return directory.pat("acme", "user-7", models=pat_models)


def _post_sealed(
    server: ProxyServer, token: str, model: str | None = "cube-tiny", body: bytes = SEALED
) -> Reply:
    headers = {"Content-Type": E2E}
    if model is not None:
        headers["Cube-E2E-Model"] = model
    return server.request(
        "POST", "/acme/v1/chat/completions", token=token, body=body, headers=headers
    )


def test_sealed_request_passes_byte_for_byte_and_is_metered_from_the_header(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    answer = b"\x01sealed-answer\x00" + os.urandom(32)
    stub.body, stub.content_type = answer, E2E
    stub.headers = {"Cube-Usage": "prompt_tokens=21, completion_tokens=8"}
    pat = _domain(directory, stub)
    server = proxy()
    reply = _post_sealed(server, pat)
    assert reply.status == 200, reply.body
    assert reply.body == answer
    assert reply.header("Content-Type") == E2E
    assert reply.header("Cube-Usage") == "prompt_tokens=21, completion_tokens=8"
    seen = stub.seen[-1]
    assert seen.body == SEALED
    assert header(seen.headers, "Content-Type") == E2E
    assert header(seen.headers, "Cube-E2E-Model") == "cube-tiny"
    # The forwarded token is scoped to the model the header named.
    token = header(seen.headers, "Authorization").removeprefix("Bearer ")
    claims = directory.signer.decode(token, audience="acme")
    assert "model:cube-tiny" in claims["scope"].split()
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    assert [(r.model, r.prompt_tokens, r.completion_tokens) for r in rows] == [("cube-tiny", 21, 8)]
    assert [(u["model"], u["prompt_tokens"], u["completion_tokens"]) for u in directory.usage] == [
        ("cube-tiny", 21, 8)
    ]


def test_sealed_body_is_never_metered_from_its_bytes(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    stub.body, stub.content_type = b'{"usage":{"prompt_tokens":5,"completion_tokens":5}}', E2E
    pat = _domain(directory, stub)
    server = proxy()
    assert _post_sealed(server, pat).status == 200
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    # No count came (no Cube-Usage header): the prompt is estimated from the sealed request's
    # size, never read from the answer's bytes.
    estimate = estimated_prompt_tokens(len(SEALED))
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(estimate, None)]
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in directory.usage] == [
        (estimate, 0)
    ]


def test_sealed_stream_is_metered_from_the_cube_usage_event(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    stub.events = [
        b"event: cube-e2e\ndata: c2VhbGVkLTE=\n\n",
        b"event: cube-e2e\ndata: c2VhbGVkLTI=\n\nevent: cube-usage\n",  # split across writes
        b'data: {"prompt_tokens": 13, "completion_tokens": 2}\n\n',
        b"event: cube-e2e\ndata: ZW5k\n\n",
    ]
    pat = _domain(directory, stub)
    server = proxy()
    reply = _post_sealed(server, pat)
    assert reply.status == 200
    assert reply.body == b"".join(stub.events)
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    assert [(r.model, r.prompt_tokens, r.completion_tokens) for r in rows] == [("cube-tiny", 13, 2)]


def test_sealed_request_needs_a_model_header_and_respects_model_scope(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    pat = _domain(directory, stub, pat_models=frozenset({"other"}))
    server = proxy()
    missing = _post_sealed(server, pat, model=None)
    assert missing.status == 400
    assert missing.json()["error"]["code"] == "missing_model"
    forbidden = _post_sealed(server, pat, model="cube-tiny")
    assert forbidden.status == 403
    unknown = _post_sealed(server, pat, model="other\x00")
    assert unknown.status == 400
    assert stub.seen == []  # nothing reached the agent
    allowed = _post_sealed(server, pat, model="other")
    assert allowed.status == 200
    assert header(stub.seen[-1].headers, "Cube-E2E-Model") == "other"


def test_a_non_json_body_is_routed_by_the_model_header(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    stub.body = b'{"ok":true}'
    pat = _domain(directory, stub)
    server = proxy()
    reply = server.request(
        "POST",
        "/acme/v1/chat/completions",
        token=pat,
        body=b"\x00\x01not json",
        headers={"Content-Type": "application/octet-stream", "Cube-E2E-Model": "no-such-model"},
    )
    assert reply.status == 404  # no backend serves the model the header named
    assert stub.seen == []


def test_sealed_request_goes_to_the_agent_it_was_sealed_for(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    """Two agents serve the model; ``Cube-E2E-Agent`` names the one whose HPKE key the client
    verified, and every sealed request goes there (the other could not open it)."""
    loop = BackgroundLoop()
    second = StubAgent(loop).start()
    try:
        stub.body = second.body = b"sealed"
        stub.content_type = second.content_type = E2E
        pat = _domain(directory, stub)
        directory.add_backend("acme", second.url, backend_id="second", models=("cube-tiny",))
        server = proxy()
        for _ in range(4):
            reply = server.request(
                "POST",
                "/acme/v1/chat/completions",
                token=pat,
                body=SEALED,
                headers={
                    "Content-Type": E2E,
                    "Cube-E2E-Model": "cube-tiny",
                    "Cube-E2E-Agent": "second",
                },
            )
            assert reply.status == 200, reply.body
            assert reply.header("X-Cube-Agent") == "second"
        assert len(second.seen) == 4 and stub.seen == []
        # Without the header (or naming no agent of the domain) both take turns.
        for agent_id in (None, "no-such-agent", None, "no-such-agent"):
            headers = {"Content-Type": E2E, "Cube-E2E-Model": "cube-tiny"}
            if agent_id:
                headers["Cube-E2E-Agent"] = agent_id
            reply = server.request(
                "POST", "/acme/v1/chat/completions", token=pat, body=SEALED, headers=headers
            )
            assert reply.status == 200
        assert stub.seen and len(second.seen) > 4
    finally:
        second.stop()
        loop.close()


def test_usage_header_parsing() -> None:
    assert parse_usage_header("prompt_tokens=5, completion_tokens=9") is not None
    usage = parse_usage_header(" completion_tokens=9 ,prompt_tokens=5")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (5, 9)
    for bad in ("", "prompt_tokens=-1", "prompt_tokens=x", "tokens=5", "prompt_tokens=5; x=1"):
        assert parse_usage_header(bad) is None, bad


def test_scanner_ignores_data_of_other_events() -> None:
    scanner = UsageScanner()
    scanner.feed(b'event: other\ndata: {"prompt_tokens": 1, "completion_tokens": 1}\n\n')
    assert not scanner.finish().known
    scanner = UsageScanner()
    scanner.feed(b"event: cube-usage\r\n")
    scanner.feed(b'data: {"prompt_tokens": 4, "completion_tokens": 6}\r\n\r\n')
    usage = scanner.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, 6)


# -- durable audit (--durable-audit) ---------------------------------------------------------

SLOW_BATCHES = replace(TEST_SETTINGS, audit_flush_interval=30.0)


def _rows(directory: FakeDirectory) -> list[AuditRecord]:
    return [r for r in directory.audits if r.event == "request"]


def test_batched_audit_rows_are_written_after_the_answer(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    """The default: the row waits for its batch (here 30 s), so the answer comes first. This
    is the crash-loss window durable_audit closes."""
    pat = _domain(directory, stub)
    server = proxy(SLOW_BATCHES)
    assert _post_sealed(server, pat).status == 200
    assert _rows(directory) == []


@pytest.mark.parametrize("streaming", [False, True])
def test_durable_audit_commits_the_row_before_the_answer_completes(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent, streaming: bool
) -> None:
    if streaming:
        stub.events = [b"event: cube-e2e\ndata: QQ==\n\n"]
    pat = _domain(directory, stub)
    server = proxy(replace(SLOW_BATCHES, durable_audit=True))
    reply = _post_sealed(server, pat)
    assert reply.status == 200
    rows = _rows(directory)  # no flush: already committed when the answer ended
    assert [(r.status, r.model) for r in rows] == [(200, "cube-tiny")]


def test_durable_audit_refuses_an_answer_it_cannot_audit(
    directory: FakeDirectory, proxy: ProxyFactory, stub: StubAgent
) -> None:
    async def broken(row: AuditRecord) -> None:
        raise OSError("disk full")

    pat = _domain(directory, stub)
    directory.record_audit = broken  # type: ignore[method-assign]
    server = proxy(replace(TEST_SETTINGS, durable_audit=True))
    reply = _post_sealed(server, pat)
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "audit_unavailable"


def test_scanner_reads_the_usage_line_of_an_encrypted_ndjson_stream() -> None:
    scanner = UsageScanner()
    scanner.feed(b'{"cube-e2e":"QUJD"}\n')
    scanner.feed(
        b'{"cube-usage":{"prompt_tokens":9,"completion_tokens":12}}\n{"cube-e2e":"RU5E"}\n'
    )
    usage = scanner.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 12)
