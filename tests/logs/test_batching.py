"""cube/_logging.py: the batching handler cube-proxy logs through, and ``log_line``."""

from __future__ import annotations

import io
import json
import logging
import select
import time
from collections.abc import Iterator

import pytest

from cube import _logging
from cube._logging import BatchingStreamHandler, configure_logging, log_line


class _Writes(io.StringIO):
    """A stream that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[_Writes]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, _logging._batcher)
    out = _Writes()
    handler = configure_logging("info", stream=out, batch_seconds=0.2)
    yield out
    handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    _logging._batcher = saved[2]


def _lines(out: _Writes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_info_lines_wait_for_the_batch_and_warnings_do_not(stream: _Writes) -> None:
    log = logging.getLogger("cube.test.batch")
    log.info("first", extra={"fields": {"n": 1}})
    log_line(log, "second", {"n": 2})
    assert stream.calls == []  # batched, not yet written
    log.warning("third")
    assert [line["msg"] for line in _lines(stream)] == ["first", "second", "third"]
    assert len(stream.calls) == 1  # one write for the three lines


def test_the_flusher_writes_within_the_interval(stream: _Writes) -> None:
    log_line(logging.getLogger("cube.test.batch"), "later", {"route": "/v1/{tail}"})
    deadline = time.monotonic() + 5
    while not stream.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = _lines(stream)
    assert line["msg"] == "later" and line["route"] == "/v1/{tail}"
    assert line["level"] == "info" and line["logger"] == "cube.test.batch"


def test_writes_are_cut_at_line_ends_within_pipe_buf(stream: _Writes) -> None:
    log = logging.getLogger("cube.test.batch")
    for n in range(200):
        log_line(log, "x" * 100, {"n": n})
    logging.getLogger().handlers[0].flush()
    assert len(stream.calls) > 1
    for call in stream.calls:
        assert len(call.encode()) <= select.PIPE_BUF and call.endswith("\n")
    assert [line["n"] for line in _lines(stream)] == list(range(200))


def test_log_line_is_the_same_line_as_a_record(stream: _Writes) -> None:
    log = logging.getLogger("cube.test.batch")
    log.info("request", extra={"fields": {"status": 200, "msg": "not overridden"}})
    log_line(log, "request", {"status": 200, "msg": "not overridden"})
    log.warning("flush")
    a, b, _ = _lines(stream)
    del a["ts"], b["ts"]
    assert a == b


def test_a_disabled_logger_writes_nothing(stream: _Writes) -> None:
    log = logging.getLogger("cube.test.quiet")
    log.setLevel(logging.WARNING)
    try:
        log_line(log, "request", {"status": 200})
        logging.getLogger().handlers[0].flush()
        assert stream.getvalue() == ""
    finally:
        log.setLevel(logging.NOTSET)


def test_close_flushes() -> None:
    out = _Writes()
    handler = BatchingStreamHandler(out, 60)
    handler.setFormatter(_logging.JsonFormatter())
    handler.handle(logging.makeLogRecord({"msg": "pending", "levelno": 20, "levelname": "INFO"}))
    assert out.calls == []
    handler.close()
    assert json.loads(out.getvalue())["msg"] == "pending"
