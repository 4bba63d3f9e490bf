"""A sealed stream's last events reach the caller only with the whole response read and its end
marker checked, also when the end marker arrives in a later chunk than ``data: [DONE]`` (the
agent writes it separately): a caller that stops at ``[DONE]`` (the openai SDK) then closes a
finished exchange, which the proxy audits as delivered, not as abandoned (499); and a stream cut
off after ``[DONE]`` fails before ``[DONE]`` is seen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from cube_client import e2e
from cube_client._transport import _AsyncDecryptedStream, _DecryptedStream
from cube_client.e2e import EnvelopeError
from tests.client.test_envelope import EVENTS, Key, seal, sealed_stream


class Chunks:
    """The response body as the HTTP client hands it over, counting what was read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await asyncio.sleep(0)
            self.read += 1
            yield chunk


def split_after_done(meta: e2e.RequestMeta) -> list[bytes]:
    """Each event its own chunk, the end marker (with the usage record) in a later one."""
    *events, usage, end = sealed_stream(meta)
    assert len(events) == len(EVENTS)
    return [*events, usage + end]


def seen_at_done(stream: Iterator[bytes], body: Chunks) -> tuple[bytes, int]:
    received = b""
    for plain in stream:
        received += plain
        if b"data: [DONE]" in received:
            return received, body.read
    raise AssertionError("no [DONE]")


@pytest.fixture
def meta() -> e2e.RequestMeta:
    return seal(Key())[1]


def test_done_is_handed_over_only_with_the_response_read_to_its_end(meta: e2e.RequestMeta) -> None:
    body = Chunks(split_after_done(meta))
    received, read = seen_at_done(
        iter(_DecryptedStream(body, e2e.StreamDecoder(meta, "sse"))), body
    )
    assert received == b"".join(EVENTS)
    assert read == len(body.chunks)  # the end marker was read (and checked) before [DONE]


def test_a_stream_cut_off_after_done_fails_before_done_is_seen(meta: e2e.RequestMeta) -> None:
    body = Chunks(split_after_done(meta)[:-1])  # the end marker never comes
    received = b""
    with pytest.raises(EnvelopeError, match="without its end marker"):
        for plain in _DecryptedStream(body, e2e.StreamDecoder(meta, "sse")):
            received += plain
    assert b"[DONE]" not in received


def test_the_async_stream_does_the_same(meta: e2e.RequestMeta) -> None:
    async def main() -> tuple[bytes, int, bytes]:
        body = Chunks(split_after_done(meta))
        received = b""
        read_at_done = -1
        async for plain in _AsyncDecryptedStream(aiter(body), e2e.StreamDecoder(meta, "sse")):
            received += plain
            if b"[DONE]" in received and read_at_done < 0:
                read_at_done = body.read
        cut = Chunks(split_after_done(meta)[:-1])
        partial = b""
        try:
            async for plain in _AsyncDecryptedStream(aiter(cut), e2e.StreamDecoder(meta, "sse")):
                partial += plain
        except EnvelopeError:
            pass
        else:
            raise AssertionError("a cut-off stream was accepted")
        assert read_at_done == len(body.chunks)
        return received, read_at_done, partial

    received, _, partial = asyncio.run(main())
    assert received == b"".join(EVENTS)
    assert b"[DONE]" not in partial


def test_events_before_the_last_are_handed_over_as_they_come(meta: e2e.RequestMeta) -> None:
    body = Chunks(split_after_done(meta))
    stream = iter(_DecryptedStream(body, e2e.StreamDecoder(meta, "sse")))
    assert next(stream) == EVENTS[0] and body.read == 1  # streaming is not held back


def test_ollama_s_last_line_counts_as_the_last_event() -> None:
    meta = seal(Key())[1]
    sealer = e2e.ResponseSealer(meta)
    decoder = e2e.StreamDecoder(meta, "ndjson")
    decoder.feed(
        sealer.event(b'{"message":{"content":"\\"done\\": true"},"done":false}\n', "ndjson")
    )
    assert not decoder.last_event_seen  # the words inside a string are not the field
    decoder.feed(sealer.event(b'{"done":true,"eval_count":4}\n', "ndjson"))
    assert decoder.last_event_seen
