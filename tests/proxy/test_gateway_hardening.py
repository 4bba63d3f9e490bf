# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""The gateway against a hostile tenant or its agent, and against admin changes made while it
works: a model name no store can hold is a 400 (not a batch of other tenants' audit rows
lost), a row the store refuses loses only itself, a hostile agent's usage fields cost bounded
work and cannot push counts past any column, disabled backends are left alone, a request under
a new policy is judged under it, and a refusal says when to come back."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from proxy.directory import AuditRecord
from proxy.gateway.metering import AuditWriter, UsageScanner
from proxy.gateway.metrics import GatewayMetrics
from tests.agent.backends import FakeOpenAI
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    TEST_SETTINGS,
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
    sim_policy,
)
from tests.proxy.test_audit import _row
from tests.rawhttp import post_raw


def test_a_model_name_no_store_can_hold_is_refused(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    for model in ("\ud800", "a\x00b", "x" * 1000):
        reply = server.request(
            "POST",
            f"/{dom.alias}/v1/chat/completions",
            body=json.dumps({"model": model, "messages": []}).encode(),  # (escapes: ASCII)
            token=dom.member_token,
        )
        assert reply.status == 400, (model[:8], reply.body)
        assert reply.json()["error"]["code"] == "invalid_model"


def test_a_row_the_store_refuses_loses_only_itself() -> None:
    """A batch the store refuses is written again row by row: the others (other requests',
    other tenants') are kept, and a durable request waits only on its own row."""

    class Picky(FakeDirectory):
        async def record_audits(self, rows: list[AuditRecord]) -> None:
            if any(r.model == "poison" for r in rows):
                raise ValueError("cannot store that")
            self.audits.extend(rows)

    directory = Picky()
    metrics = GatewayMetrics()

    async def main() -> tuple[Any, Any]:
        writer = AuditWriter(directory, metrics, flush_interval=0.05)
        writer.start()
        good = [replace(_row(n), model="cube-tiny") for n in range(5)]
        waited_good = writer.audit_durably(good[0])
        waited_bad = writer.audit_durably(replace(_row(9), model="poison"))
        for row in good[1:]:
            writer.audit(row)
        results = await asyncio.gather(waited_good, waited_bad, return_exceptions=True)
        await writer.close()
        return results

    ok, refused = asyncio.run(main())
    assert ok is None and isinstance(refused, RuntimeError)
    assert sorted(r.model for r in directory.audits) == ["cube-tiny"] * 5
    assert metrics.audit_dropped._value.get() == 1


def test_a_hostile_agents_usage_fields_are_bounded() -> None:
    # Counts past what any column holds are not counts.
    huge = b'{"prompt_eval_count": 1000000000000000000000, "eval_count": 7, "done": true}'
    assert UsageScanner().whole(huge).prompt_tokens is None
    assert UsageScanner().whole(b'{"eval_count": ' + b"9" * 5000 + b"}").completion_tokens is None
    # Nesting past the recursion limit, and many "usage" keys before the real one.
    deep = b'{"usage": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    assert not UsageScanner().whole(deep).known
    body = b'{"x": [' + b'{"usage": {"n": 1}},' * 20000
    body += b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}]}'
    usage = UsageScanner().whole(body)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


def _evidence_served(agent: Any) -> float:
    return float(agent.prepared.metrics.evidence.labels(outcome="ok")._value.get())


def test_a_disabled_backend_is_neither_verified_nor_health_checked(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents, policy=sim_policy(max_evidence_age_seconds=2))
    second = agents.start(dom.alias)
    directory.add_backend(dom.alias, second.url, backend_id="acme-agent-2", models=("cube-tiny",))
    server = proxy(replace(TEST_SETTINGS, health_interval=0.3, discover_agents=True))
    time.sleep(1)
    specs = directory.backend_specs[directory.domains[dom.alias]]
    specs[0] = replace(specs[0], enabled=False)  # the admin disables agent 1
    assert server.chat(dom.alias, dom.member_token).status == 200
    before = _evidence_served(dom.agent)
    time.sleep(3)  # past the evidence's 2 s lifetime: an enabled agent is verified again
    assert _evidence_served(dom.agent) == before
    assert _evidence_served(second) > 0


def test_a_request_under_a_new_policy_is_judged_under_it(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    """The admin fixes a policy while a verification under the old one is in flight: a
    request made under the new policy does not get the old policy's refusal."""
    dom = one_domain(directory, agents, policy=sim_policy(agent_versions=["9.9.9"]))
    server = proxy()
    gate = server.gateway.gate
    real = gate._fetch

    async def slow(agent: Any, nonce: bytes) -> Any:
        out = await real(agent, nonce)
        await asyncio.sleep(1.0)
        return out

    gate._fetch = slow  # type: ignore[method-assign]
    replies: dict[str, Any] = {}
    old = threading.Thread(
        target=lambda: replies.__setitem__("old", server.chat(dom.alias, dom.member_token))
    )
    old.start()
    time.sleep(0.4)
    directory.set_policy(dom.alias, sim_policy())  # accepts the agent
    new = threading.Thread(
        target=lambda: replies.__setitem__("new", server.chat(dom.alias, dom.member_token))
    )
    new.start()
    old.join(30)
    new.join(30)
    assert replies["old"].status == 503
    assert replies["new"].status == 200, replies["new"].body


def test_a_refusal_says_when_the_agent_will_be_tried_again(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents, policy=sim_policy(agent_versions=["9.9.9"]))
    server = proxy(replace(TEST_SETTINGS, failure_retry_seconds=30.0))
    reply = server.chat(dom.alias, dom.member_token)
    assert reply.status == 503
    assert 25 <= int(reply.headers["Retry-After"]) <= 30


def test_a_database_outage_is_a_503_on_both_front_ends(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    """While the proxy's database cannot be reached, requests are told so (503, retry), not
    given a 500 with a traceback in the log."""
    dom = one_domain(directory, agents)
    server = proxy()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    directory.authenticate = down  # type: ignore[method-assign]
    for version in ("HTTP/1.1", "HTTP/1.0"):  # the fast path, then aiohttp's
        reply = server.chat(dom.alias, dom.member_token) if version == "HTTP/1.1" else None
        if reply is None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
            body = json.dumps({"model": "cube-tiny", "messages": []}).encode()
            conn.request(
                "POST",
                f"/{dom.alias}/v1/chat/completions",
                body=body,
                headers={"Authorization": f"Bearer {dom.member_token}"},
            )
            response = conn.getresponse()
            status, headers, data = response.status, dict(response.getheaders()), response.read()
            conn.close()
        else:
            status, headers, data = reply.status, reply.headers, reply.body
        assert status == 503, (version, data)
        assert json.loads(data)["error"]["code"] == "database_unavailable"
        assert headers["Retry-After"] == "1"


def test_audit_rows_wait_out_a_database_outage() -> None:
    """A store that cannot be reached for a moment (a database restart) loses no rows: they
    are written once it is back. A durable request is told at once (it cannot be committed)."""

    class Restarting(FakeDirectory):
        outage = 2

        async def record_audits(self, rows: list[AuditRecord]) -> None:
            if self.outage:
                self.outage -= 1
                raise ConnectionRefusedError(111, "Connection refused")
            self.audits.extend(rows)

    directory = Restarting()
    metrics = GatewayMetrics()

    async def main() -> BaseException | None:
        writer = AuditWriter(directory, metrics, flush_interval=0.01)
        writer.start()
        durable = writer.audit_durably(_row(0))
        for n in range(1, 6):
            writer.audit(_row(n))
        refused = await asyncio.gather(durable, return_exceptions=True)
        await writer.flushed(timeout=10)
        await writer.close()
        return refused[0]

    refused = asyncio.run(main())
    assert isinstance(refused, RuntimeError)
    assert sorted(r.status for r in directory.audits) == sorted(_row(n).status for n in range(1, 6))
    assert len(directory.audits) == 5
    assert metrics.audit_dropped._value.get() == 0


def test_request_metrics_hold_one_entry_per_label_whatever_the_paths() -> None:
    """Anyone can send requests to any number of paths: the per-label cache of metric
    children must not grow with them (it held one entry per raw path: memory without bound)."""
    from proxy.gateway.metrics import observe_request

    metrics = GatewayMetrics()
    for i in range(500):
        observe_request(metrics, f"/v1/unknown-{i}", 401, 0.1)
        observe_request(metrics, "/v1/chat/completions", 200, 0.1)
    assert len(metrics._request_children) == 2
    other = metrics.requests.labels(route="other", status="401")._value.get()
    assert other == 500


def test_a_large_body_is_parsed_without_holding_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model name of a large body is read in a worker thread, and the loop keeps running
    meanwhile: the C JSON parser alone holds the GIL for the whole document (a 48 MB body
    stalled every tenant's requests for ~0.8 s); the parse used must give it up as it goes."""
    import types

    import proxy.gateway.forward as forward

    spans: list[tuple[float, float]] = []

    def timed_loads(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return json.loads(*args, **kwargs)
        finally:
            spans.append((started, time.monotonic()))

    monkeypatch.setattr(forward, "json", types.SimpleNamespace(loads=timed_loads, dumps=json.dumps))
    message = {"role": "user", "content": "x"}
    body = json.dumps({"model": "cube-tiny", "messages": [message] * 300_000}).encode()

    async def main() -> tuple[str | None, list[float]]:
        ticks: list[float] = []
        parsing = True

        async def ticker() -> None:
            while parsing:
                ticks.append(time.monotonic())
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        model = await forward._read_model(body, False)
        parsing = False
        await task
        return model, ticks

    model, ticks = asyncio.run(main())
    assert model == "cube-tiny"
    ((started, ended),) = spans
    # The longest the loop went without a turn while the body was parsed, against the parse:
    # the plain C parse leaves one gap of nearly all of it (0.93 and 0.98 measured); this one
    # lets the loop turn every switch interval (its longest gap measured 0.2 of it: the
    # decode and garbage collection, which hold the GIL too).
    points = [started, *(t for t in ticks if started < t < ended), ended]
    longest = max(b - a for a, b in itertools.pairwise(points))
    assert longest < 0.5 * (ended - started), (longest, ended - started)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "x-unknown"])
@pytest.mark.parametrize("size", [100, 2_000_000], ids=["fast-path", "aiohttp"])
def test_an_encoded_request_body_is_refused_on_both_front_ends(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    encoding: str,
    size: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its model cannot be read (nor checked against the credential's scope): a JSON 415,
    nothing forwarded. aiohttp decoded gzip itself and answered br/zstd with plain text."""
    import gzip
    import logging

    dom = one_domain(directory, agents)
    server = proxy()
    body = json.dumps({"model": "cube-tiny", "messages": [], "pad": "a" * size}).encode()
    if encoding == "gzip":
        body = gzip.compress(body)
    reply = server.request(
        "POST",
        f"/{dom.alias}/v1/chat/completions",
        token=dom.pat,
        body=body,
        headers={"Content-Encoding": encoding},
    )
    assert reply.status == 415, reply.body[:200]
    assert reply.json()["error"] == {
        "message": "request bodies must not be content-encoded",
        "type": "invalid_request_error",
        "code": "unsupported_content_encoding",
    }
    assert fake_openai.received == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_every_content_encoding_header_counts(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """``identity`` then ``gzip`` in two headers is an encoded body (only the first was read)."""
    import http.client

    dom = one_domain(directory, agents)
    server = proxy()
    body = json.dumps({"model": "cube-tiny", "messages": []}).encode()
    status, answer = post_raw(
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=30),
        f"/{dom.alias}/v1/chat/completions",
        [
            ("Authorization", f"Bearer {dom.pat}"),
            ("Content-Type", "application/json"),
            ("Content-Encoding", "identity"),
            ("Content-Encoding", "gzip"),
        ],
        body,
    )
    assert status == 415, answer
    assert fake_openai.received == []
    # "identity" however it is spelled is no encoding.
    ok = server.request(
        "POST",
        f"/{dom.alias}/v1/chat/completions",
        token=dom.pat,
        body=body,
        headers={"Content-Encoding": " Identity "},
    )
    assert ok.status == 200


def test_the_openai_sdk_does_not_resend_what_reached_an_agent(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """A server error after the request reached an agent says ``x-should-retry: false``: the
    SDK retries 5xx twice by default, and the backend ran the prompt each time."""
    import openai

    dom = one_domain(directory, agents)
    server = proxy(replace(TEST_SETTINGS, max_answer_bytes=1024))
    fake_openai.tokens = ["x" * 3000]  # an answer over the proxy's limit: a 502 after the work
    client = openai.OpenAI(base_url=f"{server.url}/{dom.alias}/v1", api_key=dom.pat)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(
            model="cube-tiny", messages=[{"role": "user", "content": "hi"}]
        )
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 1
    # A refusal before anything was forwarded leaves the SDK's retry policy alone.
    refused = server.request("DELETE", f"/{dom.alias}/v1/models", token=dom.pat)
    assert refused.status == 405 and refused.header("Allow") == "GET, POST"
    assert refused.header("x-should-retry") is None


def test_a_durable_audit_failure_is_not_retried_on_either_front_end(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer ran on the backend, then its row could not be written: the 503 says
    ``x-should-retry: false`` on aiohttp's front end too (HTTP/1.0 goes there)."""
    import http.client

    dom = one_domain(directory, agents)

    async def broken(row: AuditRecord) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(directory, "record_audit", broken)
    server = proxy(replace(TEST_SETTINGS, durable_audit=True))
    body = json.dumps({"model": "cube-tiny", "messages": []}).encode()
    for version in (11, 10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        if version == 10:
            conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
        try:
            conn.request(
                "POST",
                f"/{dom.alias}/v1/chat/completions",
                body=body,
                headers={"Authorization": f"Bearer {dom.pat}", "Content-Type": "application/json"},
            )
            reply = conn.getresponse()
            assert reply.status == 503, reply.read()
            assert reply.getheader("x-should-retry") == "false", version
            assert json.loads(reply.read())["error"]["code"] == "audit_unavailable"
        finally:
            conn.close()
