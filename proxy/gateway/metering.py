"""Usage from the backend's own fields, and the audit/usage writer.

Usage is read from what the agent relays; the proxy forwards bodies unchanged. A cube agent
asks its backend for a stream's usage whether or not the client did (the client gets the
usage chunk only if it asked) and writes the counts as an SSE comment, ``: cube-usage
{"prompt_tokens": n, "completion_tokens": n}``, just before ``data: [DONE]`` (SSE clients skip
comments), so token limits hold for every stream. OpenAI-shaped answers carry
``"usage": {"prompt_tokens", "completion_tokens"}`` (in a whole
body, or in a stream's last records; the last one counts, as vLLM may repeat it cumulatively);
Ollama's carry ``prompt_eval_count`` and ``eval_count`` in the final object. A ``"usage"`` inside
generated text cannot match: JSON escapes its quotes.

A stream whose counts never arrive (the client leaves, the agent dies or sends none) is
charged one completion token per record relayed (SSE ``data:`` lines, NDJSON objects; about
one token each), its audit row saying so: a client cannot read a whole answer and close just
before the usage to escape token limits. Its prompt, which the backend processed before the
first record, is charged as estimated from the request body (:func:`estimated_prompt_tokens`:
a token per 4 bytes, which over-counts JSON a little), and so is that of any inference
request sent to an agent whose answer came without counts: an answer that has none (Ollama's
legacy ``/api/embeddings``), or a request the client abandoned before the answer.

End-to-end encrypted answers (docs/e2e-encryption.md) are opaque, so the agent reports their
token counts in plaintext: a whole answer in the response header
``Cube-Usage: prompt_tokens=<n>, completion_tokens=<n>`` (:func:`parse_usage_header`; it wins
over anything in a body), a stream in an SSE event ``event: cube-usage`` whose ``data:`` is
``{"prompt_tokens": n, "completion_tokens": n}``, an NDJSON (Ollama) stream in a line
``{"cube-usage": {...}}``. Sealed events (``event: cube-e2e``) carry base64, which cannot
contain ``"usage"``.

Audit rows and usage are written by :class:`AuditWriter` in batches off the request path, so a
database write never adds to a request's latency; usage is summed per (domain, user, model)
within a batch. The crash-loss window, precisely: a row is queued when its response has been
handed to the client (a stream: after its last byte), then waits up to
``audit_flush_interval`` (50 ms) for its batch, then for the batch's transaction to commit
(one fsync on SQLite; under load, batches grow and commits follow one another). A process
killed with SIGKILL (or a power loss) in that window loses those rows and their usage,
although the client got its answer; rows refused because the queue was full are counted
(``cube_proxy_audit_dropped``). A clean shutdown (SIGTERM) writes them all.

With ``durable_audit`` (``cube-proxy --durable-audit true``) the window is closed: the
response does not complete until its row is committed — a whole answer is held back until
then, a stream's end (the chunked terminator) is withheld — and a row that cannot be written
turns the answer into a 503 (a stream is cut without its clean end). Durable rows skip the
batching delay; concurrent requests still share commits (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from cube._tasks import cancel_and_wait
from proxy.db.engine import is_unavailable
from proxy.directory import AuditRecord, Directory
from proxy.gateway.metrics import GatewayMetrics

__all__ = [
    "USAGE_HEADER",
    "AuditWriter",
    "Usage",
    "UsageScanner",
    "estimated_prompt_tokens",
    "parse_usage_header",
]

log = logging.getLogger("cube.proxy.audit")

_CARRY_LIMIT: Final = 256 * 1024
_OLLAMA_PROMPT: Final = re.compile(rb'"prompt_eval_count"\s*:\s*(\d{1,15})\b')
_OLLAMA_EVAL: Final = re.compile(rb'"eval_count"\s*:\s*(\d{1,15})\b')
#: A usage object is a few hundred bytes; an agent's answer is not trusted to keep it so.
_USAGE_OBJECT_MAX: Final = 4096
_USAGE_CANDIDATES_MAX: Final = 16
_DECODER: Final = json.JSONDecoder()
USAGE_HEADER: Final = "Cube-Usage"
_USAGE_EVENT: Final = b"cube-usage"
_USAGE_COMMENT: Final = b": cube-usage "
#: The start of a stream record: an SSE data line, or an NDJSON object.
_RECORD_START: Final = re.compile(rb"^(?:data:|\{)", re.M)
_USAGE_PAIR: Final = re.compile(r"\s*(prompt_tokens|completion_tokens)\s*=\s*(\d{1,12})\s*")


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: The completion count is the number of records relayed, not the backend's own count (a
    #: stream cut before its usage arrived).
    estimated: bool = False
    #: The prompt count is the proxy's estimate from the request's size (no count came).
    prompt_estimated: bool = False

    @property
    def known(self) -> bool:
        return self.prompt_tokens is not None or self.completion_tokens is not None

    @property
    def total(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


def estimated_prompt_tokens(body_bytes: int) -> int:
    """A prompt's tokens, estimated from its request body's size (about 4 bytes a token in
    English text; the JSON around it makes this over-count, never under-count much)."""
    return -(-body_bytes // 4)


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40:
        return value
    return None


def parse_usage_header(value: str) -> Usage | None:
    """``prompt_tokens=<n>, completion_tokens=<n>`` (either may be absent); None if malformed
    (then nothing is metered from it, and the agent is not trusted with a partial reading)."""
    usage = Usage()
    for part in value.split(","):
        if not part.strip():
            continue
        match = _USAGE_PAIR.fullmatch(part)
        if match is None:
            return None
        setattr(usage, match.group(1), _count(int(match.group(2))))
    return usage if usage.known else None


class UsageScanner:
    """Finds usage in a whole body (:meth:`whole`) or a stream (:meth:`feed` + :meth:`finish`)."""

    __slots__ = ("_carry", "_in_usage_event", "records", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self._carry = b""
        self._in_usage_event = False
        #: SSE ``data:`` lines and NDJSON objects relayed so far: about one token each.
        self.records = 0

    def whole(self, body: bytes) -> Usage:
        self._scan(body)
        return self.usage

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._carry = data if len(data) <= _CARRY_LIMIT else b""
            return
        self._carry = data[cut + 1 :]
        if len(self._carry) > _CARRY_LIMIT:
            self._carry = b""
        complete = data[: cut + 1]
        self.records += len(_RECORD_START.findall(complete))
        self._scan(complete)

    def finish(self) -> Usage:
        if self._carry:
            self._scan(self._carry)
            self._carry = b""
        return self.usage

    def charged(self) -> Usage:
        """The usage to charge for a stream: the backend's counts if they arrived, else as
        many completion tokens as records were relayed — so neither a client leaving just
        before the counts nor an agent that never sends them (not a cube agent, or a request
        its backend streamed without being asked for usage) escapes token limits."""
        usage = self.finish()
        if usage.completion_tokens is None and self.records:
            return Usage(usage.prompt_tokens, self.records, estimated=True)
        return usage

    def _scan(self, data: bytes) -> None:
        if self._in_usage_event or _USAGE_EVENT in data:
            self._usage_events(data)
        if b'"usage"' in data:
            self._openai(data, b'"usage"')
        if b'"cube-usage"' in data:  # an encrypted Ollama stream's plaintext usage line
            self._openai(data, b'"cube-usage"')
        if b'eval_count"' in data:
            prompt = _OLLAMA_PROMPT.findall(data)
            completion = _OLLAMA_EVAL.findall(data)
            if prompt:
                self.usage.prompt_tokens = _count(int(prompt[-1]))
            if completion:
                self.usage.completion_tokens = _count(int(completion[-1]))

    def _usage_events(self, data: bytes) -> None:
        """SSE ``event: cube-usage`` / ``data: {...}`` (an event may span two feeds)."""
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()  # not a blank line: the end of the last one
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                self._in_usage_event = False  # the blank line ends an event
            elif line.startswith(_USAGE_COMMENT):
                # The agent's comment before a plain stream's [DONE] (SSE clients skip it).
                try:
                    self._take(json.loads(line[len(_USAGE_COMMENT) :]))
                except (ValueError, RecursionError):
                    continue
            elif line.startswith(b"event:"):
                self._in_usage_event = line[6:].strip() == _USAGE_EVENT
            elif self._in_usage_event and line.startswith(b"data:"):
                try:
                    value = json.loads(line[5:])
                except (ValueError, RecursionError):
                    continue
                self._take(value)

    def _take(self, value: object) -> bool:
        """Usage from ``{"prompt_tokens": n, "completion_tokens": n}``, if it is one."""
        if not isinstance(value, dict):
            return False
        prompt = _count(value.get("prompt_tokens"))
        completion = _count(value.get("completion_tokens"))
        if prompt is None and completion is None:
            return False
        self.usage.prompt_tokens = prompt
        self.usage.completion_tokens = completion
        return True

    def _openai(self, data: bytes, key: bytes) -> None:
        """The last ``key: {...}`` that holds counts. Bounded work whatever the answer holds:
        at most a few candidates from the end, each decoded from a bounded slice."""
        at = data.rfind(key)
        for _ in range(_USAGE_CANDIDATES_MAX):
            if at < 0:
                return
            colon = data.find(b":", at + len(key))
            if colon < 0:
                return
            start = colon + 1
            while start < len(data) and data[start : start + 1] in b" \t\r\n":
                start += 1
            if data[start : start + 1] == b"{":
                try:
                    text = data[start : start + _USAGE_OBJECT_MAX].decode("utf-8", "replace")
                    value, _ = _DECODER.raw_decode(text)
                except (ValueError, RecursionError):
                    value = None
                if self._take(value):
                    return
            at = data.rfind(key, 0, at)


@dataclass(frozen=True)
class _Waited:
    """An audit row whose request waits until it is committed (``durable_audit``)."""

    row: AuditRecord
    done: asyncio.Future[None]


class _Outage(Exception):
    """The store cannot be reached (not: it refused a row); the batch is written again later."""


@dataclass(frozen=True)
class _UsageRow:
    domain_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class AuditWriter:
    """Queues audit rows and usage; a task owned by the application writes them in batches."""

    def __init__(
        self,
        directory: Directory,
        metrics: GatewayMetrics,
        *,
        flush_interval: float = 0.05,
        max_queue: int = 100_000,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self._queue: deque[AuditRecord | _UsageRow | _Waited] = deque()
        self._waiting = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()  # flushed() waits: write without gathering a batch
        self.written = 0

    def _put(self, item: AuditRecord | _UsageRow | _Waited) -> None:
        if len(self._queue) >= self.max_queue:
            self.metrics.audit_dropped.inc()
            log.error("audit queue full: a row was dropped")
            if isinstance(item, _Waited):
                item.done.set_exception(RuntimeError("the audit queue is full"))
                item.done.exception()
            return
        if isinstance(item, _Waited):
            self._waiting += 1
            self._hurry.set()
        self._queue.append(item)
        self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()

    def audit(self, row: AuditRecord) -> None:
        """Queue an audit row (never blocks; safe in ``finally`` of a cancelled handler)."""
        self._put(row)

    def audit_durably(self, row: AuditRecord) -> asyncio.Future[None]:
        """Queue an audit row; the future is done once it is committed (or failed)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(_Waited(row, done))
        return done

    def usage(
        self,
        *,
        domain_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        self._put(_UsageRow(domain_id, user_id, model, prompt_tokens, completion_tokens))

    async def flushed(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        async with asyncio.timeout(timeout):
            while self._queue or not self._idle.is_set():
                self._hurry.set()
                self._wake.set()
                await self._idle.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await self.flushed(timeout)
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiting and not self._hurry.is_set():
                # Let a batch gather (cut short by flushed() and by a durable row).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self.flush_interval)
            backoff = 0.25
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                try:
                    await self._write(batch)
                except _Outage:
                    # Requests go on (answered from the identity cache): keep their rows and
                    # try again, rather than lose them to a database restart.
                    log.warning(
                        "audit store unavailable; retrying",
                        extra={"fields": {"rows": len(batch), "retry_in": backoff}},
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            if not self._queue:
                self._hurry.clear()
                self._idle.set()

    async def _write(self, batch: list[AuditRecord | _UsageRow | _Waited]) -> None:
        waited = [item for item in batch if isinstance(item, _Waited)]
        self._waiting -= len(waited)
        failed: set[int] = {id(item.row) for item in waited}  # until written
        try:
            failed = await self._write_rows(batch)
        except _Outage:
            # Durable requests are told now (503); the other rows wait in the queue.
            kept = [item for item in batch if not isinstance(item, _Waited)]
            room = max(0, self.max_queue - len(self._queue))
            if len(kept) > room:
                self.metrics.audit_dropped.inc(len(kept) - room)
                kept = kept[len(kept) - room :]
            self._queue.extendleft(reversed(kept))
            raise
        finally:
            for item in waited:
                if item.done.done():
                    continue
                if id(item.row) in failed:
                    item.done.set_exception(RuntimeError("the audit row could not be written"))
                    item.done.exception()  # retrieved: its request may be gone
                else:
                    item.done.set_result(None)

    async def _write_rows(self, batch: list[AuditRecord | _UsageRow | _Waited]) -> set[int]:
        """Write one batch: every row at once (a directory with group commit then commits the
        whole batch in one transaction), usage summed per (domain, user, model). Returns the
        ``id()`` of each audit row that could not be written."""
        rows = [
            item.row if isinstance(item, _Waited) else item
            for item in batch
            if isinstance(item, (AuditRecord, _Waited))
        ]
        usage: dict[tuple[str, str, str], list[int]] = {}
        for item in batch:
            if isinstance(item, _UsageRow):
                sums = usage.setdefault((item.domain_id, item.user_id, item.model), [0, 0, 0])
                sums[0] += item.prompt_tokens
                sums[1] += item.completion_tokens
                sums[2] += 1
        # A directory may take a whole batch at once (one transaction); else row by row, all
        # at once, so that a group-committing directory still commits them together.
        failed: list[AuditRecord] = []
        many: Callable[[list[AuditRecord]], Awaitable[None]] | None = getattr(
            self.directory, "record_audits", None
        )
        if many is not None and rows:
            try:
                await many(rows)
                self.written += len(rows)
                rows = []
            except Exception as exc:
                if is_unavailable(exc):
                    raise _Outage from None
                if len(rows) == 1:
                    failed, rows = rows, []
                else:
                    # One row the store refuses must not take its batch — other requests',
                    # other tenants' — with it: each alone, one transaction each.
                    log.warning(
                        "writing a batch of audit rows failed; writing them one by one",
                        extra={"fields": {"rows": len(rows)}},
                    )
                    for row in rows:
                        try:
                            await many([row])
                            self.written += 1
                        except Exception:
                            failed.append(row)
                    rows = []
        writes: list[Awaitable[None]] = [self.directory.record_audit(row) for row in rows]
        writes += [
            self.directory.record_usage(
                domain_id=domain_id,
                user_id=user_id,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                requests=requests,
            )
            for (domain_id, user_id, model), (prompt, completion, requests) in usage.items()
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        failed += [
            row for row, r in zip(rows, results, strict=False) if isinstance(r, BaseException)
        ]
        self.written += len(rows) - sum(isinstance(r, BaseException) for r in results[: len(rows)])
        if failed:
            self.metrics.audit_dropped.inc(len(failed))
            log.error(  # the count only: a message could quote a row
                "writing audit rows failed", extra={"fields": {"rows": len(failed)}}
            )
        usage_failed = sum(isinstance(r, BaseException) for r in results[len(rows) :])
        if usage_failed:
            self.metrics.usage_dropped.inc(usage_failed)
            log.error("writing usage failed", extra={"fields": {"rows": usage_failed}})
        return {id(row) for row in failed}
