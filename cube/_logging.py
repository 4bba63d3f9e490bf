"""JSON log lines shared by cube-agent and cube-proxy.

One object per line; exceptions appear as their type and stack frames only, never their message
(a message can quote request content, which must never reach the logs).
"""

from __future__ import annotations

import json
import logging
import select
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any

__all__ = ["BatchingStreamHandler", "JsonFormatter", "configure_logging", "log_line"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's ``fields`` extra.

    Exceptions are rendered as their type and stack frames only: an exception's message can
    quote request content, which must never reach the logs."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, _, tb = record.exc_info
            out["exc_type"] = exc_type.__name__
            out["stack"] = "".join(traceback.format_tb(tb))
        return json.dumps(out, default=str, ensure_ascii=False)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines written in batches: every ``interval`` seconds, at once for warnings and errors,
    when 64 KiB wait, and at exit (``logging.shutdown`` flushes every handler).

    Why: an access-log line per request was, measured under load, about a quarter of the
    proxy's CPU per request, most of it one ``write`` system call per line (``sys.stderr`` is
    line-buffered). A batch goes out in writes of at most ``PIPE_BUF`` bytes, cut at line ends:
    such a write is atomic on a pipe, so worker processes sharing one stderr never interleave
    inside a line. What a SIGKILL loses is at most ``interval`` seconds of info lines (as
    nginx's ``access_log ... buffer= flush=``)."""

    def __init__(self, stream: Any, interval: float) -> None:
        super().__init__(stream)
        self.interval = interval
        self._lines: list[str] = []
        self._size = 0
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._run, name="log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            self._size += len(line)
            urgent = record.levelno >= logging.WARNING or self._size >= _BATCH_BYTES
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines, self._size = self._lines, [], 0
            chunk: list[str] = []
            size = 0
            try:
                for line in lines:
                    length = len(line) if line.isascii() else len(line.encode())
                    if chunk and size + length > select.PIPE_BUF:
                        self.stream.write("".join(chunk))
                        self.stream.flush()
                        chunk, size = [], 0
                    chunk.append(line)
                    size += length
                if chunk:
                    self.stream.write("".join(chunk))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone (closed pipe, interpreter shutting down): nowhere to log

    def write_line(self, line: str) -> None:
        """A formatted line (no trailing newline), batched like a record's."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line + "\n")
            self._size += len(line) + 1
            urgent = self._size >= _BATCH_BYTES
        if urgent:
            self.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            if self._lines:
                self.flush()


_BATCH_BYTES = 64 * 1024
#: The root handler when it batches: :func:`log_line` writes to it directly.
_batcher: BatchingStreamHandler | None = None


def log_line(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra={"fields": fields})``, the same JSON line, without building a
    log record when the process logs through a :class:`BatchingStreamHandler` only (the
    access log's per-request path: a record and its formatting cost more than the line)."""
    batcher = _batcher
    if batcher is None or logger.handlers or not logger.propagate:
        logger.info(msg, extra={"fields": fields})
        return
    if not logger.isEnabledFor(logging.INFO):
        return
    out: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": logger.name,
        "msg": msg,
    }
    for key, value in fields.items():
        out.setdefault(key, value)
    batcher.write_line(json.dumps(out, default=str, ensure_ascii=False))


def configure_logging(
    level: str = "info", *, stream: Any = None, batch_seconds: float | None = None
) -> logging.Handler:
    """JSON logs to stderr (or ``stream``) for the whole process; with ``batch_seconds``,
    written in batches (:class:`BatchingStreamHandler`)."""
    # The access log writes a line per request: skip what a record would otherwise compute
    # and nobody reads (the caller's source line walks the stack; thread and process names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    target = stream if stream is not None else sys.stderr
    handler: logging.StreamHandler = (  # type: ignore[type-arg]
        BatchingStreamHandler(target, batch_seconds)
        if batch_seconds
        else logging.StreamHandler(target)
    )
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    global _batcher  # noqa: PLW0603 - one logging configuration per process
    _batcher = handler if isinstance(handler, BatchingStreamHandler) else None
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # it prints raw request lines
    return handler
