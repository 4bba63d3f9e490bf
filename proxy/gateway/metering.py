"""Usage from the backend's own fields, and the audit/usage writer.

Usage is read, never asked for: the body is forwarded unchanged, so a stream carries usage only
if the client asked for it (``stream_options.include_usage``) or the backend always sends it.
OpenAI-shaped answers carry ``"usage": {"prompt_tokens", "completion_tokens"}`` (in a whole
body, or in a stream's last records; the last one counts, as vLLM may repeat it cumulatively);
Ollama's carry ``prompt_eval_count`` and ``eval_count`` in the final object. A ``"usage"`` inside
generated text cannot match: JSON escapes its quotes.

Audit rows and usage are written by :class:`AuditWriter` in batches off the request path, so a
database write never adds to a request's latency; usage is summed per (domain, user, model)
within a batch. Rows waiting to be written are lost if the process is killed (at most
``audit_flush_interval`` worth); a clean shutdown writes them all.
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

from proxy.directory import AuditRecord, Directory
from proxy.gateway.metrics import GatewayMetrics

__all__ = ["AuditWriter", "Usage", "UsageScanner"]

log = logging.getLogger("cube.proxy.audit")

_CARRY_LIMIT: Final = 256 * 1024
_OLLAMA_PROMPT: Final = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_OLLAMA_EVAL: Final = re.compile(rb'"eval_count"\s*:\s*(\d+)')
_DECODER: Final = json.JSONDecoder()


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def known(self) -> bool:
        return self.prompt_tokens is not None or self.completion_tokens is not None

    @property
    def total(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40:
        return value
    return None


class UsageScanner:
    """Finds usage in a whole body (:meth:`whole`) or a stream (:meth:`feed` + :meth:`finish`)."""

    __slots__ = ("_carry", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self._carry = b""

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
        self._scan(data[: cut + 1])

    def finish(self) -> Usage:
        if self._carry:
            self._scan(self._carry)
            self._carry = b""
        return self.usage

    def _scan(self, data: bytes) -> None:
        if b'"usage"' in data:
            self._openai(data)
        if b'eval_count"' in data:
            prompt = _OLLAMA_PROMPT.findall(data)
            completion = _OLLAMA_EVAL.findall(data)
            if prompt:
                self.usage.prompt_tokens = int(prompt[-1])
            if completion:
                self.usage.completion_tokens = int(completion[-1])

    def _openai(self, data: bytes) -> None:
        at = data.rfind(b'"usage"')
        while at >= 0:
            colon = data.find(b":", at + 7)
            if colon < 0:
                return
            start = colon + 1
            while start < len(data) and data[start : start + 1] in b" \t\r\n":
                start += 1
            if data[start : start + 1] == b"{":
                try:
                    text = data[start:].decode("utf-8", "replace")
                    value, _ = _DECODER.raw_decode(text)
                except ValueError:
                    value = None
                if isinstance(value, dict):
                    prompt = _count(value.get("prompt_tokens"))
                    completion = _count(value.get("completion_tokens"))
                    if prompt is not None or completion is not None:
                        self.usage.prompt_tokens = prompt
                        self.usage.completion_tokens = completion
                        return
            at = data.rfind(b'"usage"', 0, at)


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
        self._queue: deque[AuditRecord | _UsageRow] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.written = 0

    def _put(self, item: AuditRecord | _UsageRow) -> None:
        if len(self._queue) >= self.max_queue:
            self.metrics.audit_dropped.inc()
            log.error("audit queue full: a row was dropped")
            return
        self._queue.append(item)
        self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()

    def audit(self, row: AuditRecord) -> None:
        """Queue an audit row (never blocks; safe in ``finally`` of a cancelled handler)."""
        self._put(row)

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
                self._wake.set()
                await self._idle.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await self.flushed(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # let a batch gather
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                await self._write(batch)
            if not self._queue:
                self._idle.set()

    async def _write(self, batch: list[AuditRecord | _UsageRow]) -> None:
        """Write one batch: every row at once (a directory with group commit then commits the
        whole batch in one transaction), usage summed per (domain, user, model)."""
        rows = [item for item in batch if isinstance(item, AuditRecord)]
        usage: dict[tuple[str, str, str], list[int]] = {}
        for item in batch:
            if isinstance(item, _UsageRow):
                sums = usage.setdefault((item.domain_id, item.user_id, item.model), [0, 0])
                sums[0] += item.prompt_tokens
                sums[1] += item.completion_tokens
        # A directory may take a whole batch at once (one transaction); else row by row, all
        # at once, so that a group-committing directory still commits them together.
        many: Callable[[list[AuditRecord]], Awaitable[None]] | None = getattr(
            self.directory, "record_audits", None
        )
        if many is not None and rows:
            try:
                await many(rows)
                self.written += len(rows)
            except Exception as exc:
                self.metrics.audit_dropped.inc(len(rows))
                log.error(  # noqa: TRY400 - the type only: a message could quote a row
                    "writing audit rows failed",
                    extra={"fields": {"rows": len(rows), "error": type(exc).__name__}},
                )
            rows = []
        writes: list[Awaitable[None]] = [self.directory.record_audit(row) for row in rows]
        writes += [
            self.directory.record_usage(
                domain_id=domain_id,
                user_id=user_id,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
            for (domain_id, user_id, model), (prompt, completion) in usage.items()
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        failed = [r for r in results[: len(rows)] if isinstance(r, BaseException)]
        self.written += len(rows) - len(failed)
        if failed:
            self.metrics.audit_dropped.inc(len(failed))
            log.error(
                "writing audit rows failed",
                extra={"fields": {"rows": len(failed), "error": type(failed[0]).__name__}},
            )
        if any(isinstance(r, BaseException) for r in results[len(rows) :]):
            log.error("writing usage failed")
