"""Usage and audit rows: written with group commit, read by domain.

Every request of the gateway produces an audit row and (for completions) a usage row. One
transaction — and on SQLite one fsync — per row would cap the proxy at a few hundred requests
per second, so rows are queued and one writer task commits everything queued in one
transaction. Each caller's ``await`` returns only once its row is committed (durable), so
nothing acknowledged is lost; under load, batches simply grow.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import sqlalchemy as sa

from cube._tasks import cancel_and_wait
from proxy.db import Database
from proxy.db.engine import is_unavailable
from proxy.db.schema import audit, usage
from proxy.directory import AuditRecord

__all__ = ["RecordWriter", "audit_values", "read_audit", "usage_summary"]

log = logging.getLogger("cube.proxy.records")
MAX_BATCH = 2000
#: A queued row: its table, its values, and the future of the call that queued it.
_Item = tuple[sa.Table, dict[str, Any], asyncio.Future[None]]


def storable(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters that every store can hold: no NUL (PostgreSQL
    text cannot) and no lone surrogate (not UTF-8). A row that cannot be stored would fail the
    whole batch it is committed with."""
    if not value.isascii() or "\x00" in value:
        value = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return value[:limit]


def audit_values(row: AuditRecord) -> dict[str, Any]:
    return {
        "at": row.when.timestamp(),
        "domain_id": row.domain_id,
        "user_id": row.user_id,
        "token_id": row.token_id,
        "event": storable(row.event, 64),
        "route": storable(row.route, 512),
        "status": row.status,
        "model": None if row.model is None else storable(row.model, 200),
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "latency_ms": row.latency_ms,
        "evidence_digest": row.evidence_digest,
        "backend_id": row.backend_id,
        "detail": None if row.detail is None else storable(row.detail, 1000),
        "extra": json.dumps(row.extra, sort_keys=True) if row.extra else None,
    }


class RecordWriter:
    """Queues inserts into ``usage`` and ``audit`` and commits them in batches."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def insert(self, table: sa.Table, values: dict[str, Any]) -> None:
        await self.insert_many(table, [values])

    async def insert_many(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Queue ``rows``; returns once they are committed (one waiter for them all)."""
        if self._closed:
            raise RuntimeError("the record writer is closed")
        if not rows:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.extend((table, values, future) for values in rows)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="cube-record-writer")
        assert self._wake is not None
        self._wake.set()
        # Shielded: a caller that goes away (client disconnect) does not unqueue its row.
        await asyncio.shield(future)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                cut = min(MAX_BATCH, len(self._pending))
                # A waiter's rows stay in one transaction: it returns when they all are.
                while (
                    cut < len(self._pending) and self._pending[cut][2] is self._pending[cut - 1][2]
                ):
                    cut += 1
                batch, self._pending = self._pending[:cut], self._pending[cut:]
                await self._commit(batch)

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            await self._insert(batch)
        except Exception as exc:
            waiters = list(dict.fromkeys(future for _, _, future in batch))
            if len(waiters) == 1 or is_unavailable(exc):
                self._failed(batch, exc)
                return
            # One waiter's rows the database refuses (a value out of range) must not take the
            # others' — other requests', other tenants' — with them: each alone.
            for index, waiter in enumerate(waiters):
                own = [item for item in batch if item[2] is waiter]
                try:
                    await self._insert(own)
                except Exception as exc_own:
                    if is_unavailable(exc_own):
                        # The database went away meanwhile: the rest fail at once, not one
                        # connection timeout each.
                        rest = {id(w) for w in waiters[index:]}
                        self._failed([i for i in batch if id(i[2]) in rest], exc_own)
                        return
                    self._failed(own, exc_own)
                    continue
                self._succeeded(own)
            return
        self._succeeded(batch)

    async def _insert(self, batch: list[_Item]) -> None:
        async with self._db.write() as conn:
            for table in (usage, audit):
                rows = [values for t, values, _ in batch if t is table]
                if rows:
                    await conn.execute(sa.insert(table), rows)

    @staticmethod
    def _failed(batch: list[_Item], exc: Exception) -> None:
        """Every waiter of ``batch`` learns of the failure."""
        log.error(  # no traceback: it could quote row values
            "could not store %d usage/audit rows: %s", len(batch), type(exc).__name__
        )
        for _, _, future in batch:
            if not future.done():
                future.set_exception(exc)

    @staticmethod
    def _succeeded(batch: list[_Item]) -> None:
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._pending:
            batch, self._pending = self._pending, []
            await self._commit(batch)
        await cancel_and_wait(self._task)
        self._task = None


def _audit_row(row: Any) -> dict[str, Any]:
    out = dict(row)
    extra = out.pop("extra", None)
    out["extra"] = json.loads(extra) if extra else {}
    return out


async def read_audit(
    db: Database,
    domain_id: str,
    *,
    limit: int = 100,
    before_id: int | None = None,
    event: str | None = None,
) -> list[dict[str, Any]]:
    """The domain's audit rows, newest first."""
    query = sa.select(audit).where(audit.c.domain_id == domain_id)
    if before_id is not None:
        query = query.where(audit.c.id < before_id)
    if event is not None:
        query = query.where(audit.c.event == event)
    query = query.order_by(audit.c.id.desc()).limit(limit)
    async with db.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [_audit_row(r) for r in rows]


async def usage_summary(
    db: Database, domain_id: str, *, since: float | None = None
) -> list[dict[str, Any]]:
    """Tokens per user and model in a domain (since a time, or ever)."""
    query = (
        sa.select(
            usage.c.user_id,
            usage.c.model,
            sa.func.sum(usage.c.requests).label("requests"),
            sa.func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(usage.c.completion_tokens).label("completion_tokens"),
        )
        .where(usage.c.domain_id == domain_id)
        .group_by(usage.c.user_id, usage.c.model)
        .order_by(usage.c.user_id, usage.c.model)
    )
    if since is not None:
        query = query.where(usage.c.at >= since)
    async with db.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [
        {
            "user_id": r["user_id"],
            "model": r["model"],
            "requests": int(r["requests"]),
            "prompt_tokens": int(r["prompt_tokens"] or 0),
            "completion_tokens": int(r["completion_tokens"] or 0),
        }
        for r in rows
    ]
