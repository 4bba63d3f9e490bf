# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Audit rows and usage: one row per request (who, domain, model, status, tokens, latency, the
evidence that served it, never text), attestation failures as events, and the batching writer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from proxy.directory import AuditRecord
from proxy.gateway.metering import AuditWriter
from proxy.gateway.metrics import GatewayMetrics
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
)


def test_every_request_is_audited_without_text(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    server = proxy()
    secret_prompt = "PROMPT-TEXT-5b1e"
    ok = server.post(
        f"/{dom.alias}/v1/chat/completions",
        {"model": "cube-tiny", "messages": [{"role": "user", "content": secret_prompt}]},
        token=dom.pat,
    )
    assert ok.status == 200
    forbidden = server.post(
        f"/{dom.alias}/v1/chat/completions",
        {"model": "no-such-model", "messages": []},
        token=dom.pat,
    )
    assert forbidden.status == 404
    server.flush()
    rows = [r for r in directory.audits if r.event == "request"]
    assert len(rows) == 2
    row: AuditRecord = rows[0]
    assert row.domain_id == directory.domains[dom.alias]
    assert row.user_id == "user-acme"
    assert row.token_id == directory.tokens[dom.pat].token_id
    assert row.model == "cube-tiny" and row.status == 200
    assert row.route == "/v1/chat/completions"
    assert (row.prompt_tokens, row.completion_tokens) == (11, 4)
    assert row.evidence_digest == ok.header("X-Cube-Evidence")
    assert row.backend_id == "acme-agent-1"
    assert row.latency_ms is not None and row.latency_ms > 0
    assert rows[1].status == 404 and rows[1].model == "no-such-model"
    assert rows[1].evidence_digest is None
    dump = repr(directory.audits) + repr(directory.usage)
    for text in (secret_prompt, "Hello", dom.pat):
        assert text not in dump
    assert directory.usage == [
        {
            "domain_id": directory.domains[dom.alias],
            "user_id": "user-acme",
            "model": "cube-tiny",
            "prompt_tokens": 11,
            "completion_tokens": 4,
            "requests": 1,
        }
    ]


def test_a_credential_without_inference_is_refused_and_audited(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    """Like a refusal for a model outside its scope, the attempt leaves a row in its domain."""
    dom = one_domain(directory, agents)
    reader = directory.pat(dom.alias, "user-acme", actions=frozenset({"read_audit"}))
    server = proxy()
    chat = {"model": "cube-tiny", "messages": []}
    refused = server.post(f"/{dom.alias}/v1/chat/completions", chat, token=reader)
    assert refused.status == 403 and refused.json()["error"]["code"] == "forbidden"
    evidence = server.get(f"/{dom.alias}/attestation?nonce={'ab' * 32}", token=reader)
    assert evidence.status == 403
    server.flush()
    rows = [(r.route, r.status, r.token_id) for r in directory.audits if r.event == "request"]
    token_id = directory.tokens[reader].token_id
    assert rows == [("/v1/chat/completions", 403, token_id), ("attestation", 403, token_id)]


def _row(n: int) -> AuditRecord:
    return AuditRecord(
        domain_id="d", user_id=f"u{n}", route="/v1/models", status=200, when=datetime.now(UTC)
    )


def test_the_writer_batches_and_sums_usage() -> None:
    class Counting(FakeDirectory):
        concurrent = 0
        peak = 0

        async def record_audit(self, row: AuditRecord) -> None:
            self.concurrent += 1
            self.peak = max(self.peak, self.concurrent)
            await asyncio.sleep(0.01)
            self.concurrent -= 1
            await super().record_audit(row)

    directory = Counting()

    async def main() -> None:
        writer = AuditWriter(directory, GatewayMetrics(), flush_interval=0.02)
        writer.start()
        for n in range(50):
            writer.audit(_row(n))
            writer.usage(
                domain_id="d", user_id="u", model="m", prompt_tokens=2, completion_tokens=3
            )
        await writer.flushed()
        await writer.close()

    asyncio.run(main())
    assert [r.user_id for r in directory.audits] == [f"u{n}" for n in range(50)]
    assert directory.peak > 1  # written together (a group-committing directory batches them)
    assert directory.usage == [
        {
            "domain_id": "d",
            "user_id": "u",
            "model": "m",
            "prompt_tokens": 100,
            "completion_tokens": 150,
            "requests": 50,  # the rows it sums
        }
    ]


def test_a_failing_directory_is_counted_not_fatal() -> None:
    class Failing(FakeDirectory):
        async def record_audit(self, row: AuditRecord) -> None:
            raise RuntimeError("database is down")

    metrics = GatewayMetrics()

    async def main() -> AuditWriter:
        writer = AuditWriter(Failing(), metrics, flush_interval=0.01, max_queue=3)
        writer.start()
        for n in range(5):  # two over the queue's bound
            writer.audit(_row(n))
        await writer.flushed()
        writer.audit(_row(9))  # still working after a failure
        await writer.close()
        return writer

    writer = asyncio.run(main())
    assert metrics.audit_dropped._value.get() == 2 + 3 + 1
    assert writer.written == 0


def test_a_directory_taking_batches_gets_whole_batches() -> None:
    class Batching(FakeDirectory):
        batches: list[int]

        async def record_audits(self, rows: list[AuditRecord]) -> None:
            self.batches.append(len(rows))
            self.audits.extend(rows)

    directory = Batching()
    directory.batches = []

    async def main() -> None:
        writer = AuditWriter(directory, GatewayMetrics(), flush_interval=0.05)
        writer.start()
        for n in range(30):
            writer.audit(_row(n))
        await writer.close()

    asyncio.run(main())
    assert directory.batches == [30]
    assert len(directory.audits) == 30
