"""``cube-e2e/1`` envelopes (cube_client.e2e) and the agent's replay cache: what opens, and what
is refused (tampering, another key, replays, truncated or reordered streams, plaintext posing as
sealed records)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from agent.e2e import ReplayCache
from agent.identity import HPKE_SUITE as AGENT_SUITE
from cube_client import e2e
from cube_client.e2e import EnvelopeError

BODY = json.dumps(
    {"model": "cube-tiny", "messages": [{"role": "user", "content": "PROMPT-SECRET"}]}
).encode()


class Key:
    def __init__(self) -> None:
        self.private = x25519.X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id = e2e.key_id(self.public)

    def decrypt(self, ciphertext: bytes, info: bytes) -> bytes:
        return e2e.HPKE_SUITE.decrypt(ciphertext, self.private, info=info)

    def open(self, envelope: bytes) -> e2e.OpenedRequest:
        return e2e.open_request(envelope, recipient_key_id=self.id, decrypt=self.decrypt)


@pytest.fixture
def key() -> Key:
    return Key()


def seal(key: Key, body: bytes = BODY, **kw: object) -> tuple[bytes, e2e.RequestMeta]:
    args: dict[str, object] = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "cube-tiny",
    }
    args.update(kw)
    return e2e.seal_request(body, key.public, **args)  # type: ignore[arg-type]


def test_the_suite_is_the_agents() -> None:
    # The agent's key is generated for agent.identity.HPKE_SUITE; the codec must use the same.
    key = Key()
    sealed = e2e.HPKE_SUITE.encrypt(b"x", key.private.public_key(), info=b"i")
    assert AGENT_SUITE.decrypt(sealed, key.private, info=b"i") == b"x"


def test_request_round_trip(key: Key) -> None:
    envelope, meta = seal(key)
    assert envelope.startswith(b"cube-e2e/1\x01" + key.id)
    assert b"PROMPT-SECRET" not in envelope and b"cube-tiny" not in envelope
    opened = key.open(envelope)
    assert opened.body == BODY
    assert opened.meta == meta
    assert opened.meta.path == "/v1/chat/completions" and opened.meta.model == "cube-tiny"
    assert len(opened.meta.response_key) == 32 and len(opened.meta.request_id) == 16
    assert opened.enc == envelope[43:75]


def test_each_sealing_is_fresh(key: Key) -> None:
    a, meta_a = seal(key)
    b, meta_b = seal(key)
    assert a != b
    assert meta_a.request_id != meta_b.request_id
    assert meta_a.response_key != meta_b.response_key


def test_metadata_never_shows_the_response_key(key: Key) -> None:
    _, meta = seal(key)
    assert meta.response_key.hex() not in repr(meta)
    assert base64.b64encode(meta.response_key).decode() not in repr(meta)


@pytest.mark.parametrize("where", [0, 5, 10, 11, 42, 43, 74, 75, 100, -1])
def test_any_tampered_byte_is_refused(key: Key, where: int) -> None:
    envelope, _ = seal(key)
    tampered = bytearray(envelope)
    tampered[where] ^= 0x01
    with pytest.raises(EnvelopeError) as info:
        key.open(bytes(tampered))
    if 0 <= where < 11:
        assert info.value.code == "e2e_malformed"
    elif 0 <= where < 43:
        assert info.value.code == "e2e_wrong_recipient" and info.value.status == 421
    else:
        assert info.value.code == "e2e_undecryptable" and info.value.status == 400


def test_truncated_envelopes_are_refused(key: Key) -> None:
    envelope, _ = seal(key)
    for size in (0, 10, 43, 75, 90, len(envelope) - 1):
        with pytest.raises(EnvelopeError):
            key.open(envelope[:size])


def test_another_agents_key_is_refused(key: Key) -> None:
    other = Key()
    envelope, _ = seal(other)
    with pytest.raises(EnvelopeError) as info:
        key.open(envelope)
    assert info.value.code == "e2e_wrong_recipient"
    # Relabelled for this key, it still does not open: the recipient is bound through `info`.
    relabelled = envelope[:11] + key.id + envelope[43:]
    with pytest.raises(EnvelopeError) as info:
        key.open(relabelled)
    assert info.value.code == "e2e_undecryptable"


def test_a_plain_body_is_not_an_envelope(key: Key) -> None:
    with pytest.raises(EnvelopeError) as info:
        key.open(BODY)
    assert info.value.code == "e2e_malformed"


def test_error_messages_carry_no_content(key: Key) -> None:
    envelope, _ = seal(key)
    for bad in (BODY, envelope[:-1], envelope[:11] + Key().id + envelope[43:]):
        with pytest.raises(EnvelopeError) as info:
            key.open(bad)
        assert "PROMPT" not in str(info.value) and "cube-tiny" not in str(info.value)


def test_whole_response_round_trip(key: Key) -> None:
    _, meta = seal(key)
    sealed = e2e.seal_whole(meta, b'{"answer": "RESPONSE-SECRET"}', "application/json")
    assert sealed.startswith(b"cube-e2e/1\x02\x01")
    assert b"RESPONSE-SECRET" not in sealed
    assert e2e.open_whole(meta, sealed) == (b'{"answer": "RESPONSE-SECRET"}', "application/json")


def test_whole_response_refusals(key: Key) -> None:
    _, meta = seal(key)
    _, other_meta = seal(key)
    sealed = e2e.seal_whole(meta, b"{}", "application/json")
    with pytest.raises(EnvelopeError):  # another request's key
        e2e.open_whole(other_meta, sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(EnvelopeError):
        e2e.open_whole(meta, bytes(tampered))
    with pytest.raises(EnvelopeError):  # a plaintext body
        e2e.open_whole(meta, b'{"answer": "forged"}')
    # A stream record is not a whole body, even under the right key.
    record = e2e.ResponseSealer(meta).seal(e2e.EVENT, b"{}")
    with pytest.raises(EnvelopeError):
        e2e.open_whole(meta, b"cube-e2e/1\x02" + record)


@pytest.mark.parametrize(("sealed_status", "wire_status"), [(200, 400), (400, 200), (200, 503)])
def test_the_status_of_a_whole_answer_is_sealed_with_it(
    key: Key, sealed_status: int, wire_status: int
) -> None:
    """A relay that turns an answer into an error (the SDK would retry: the agent infers
    again) or an error into an answer (the SDK would parse it as one) is caught."""
    _, meta = seal(key)
    sealed = e2e.seal_whole(meta, b"{}", "application/json", sealed_status)
    assert e2e.open_whole(meta, sealed, sealed_status) == (b"{}", "application/json")
    with pytest.raises(EnvelopeError) as info:
        e2e.open_whole(meta, sealed, wire_status)
    assert info.value.code == "e2e_status_mismatch"


def test_whole_answer_metadata_must_carry_the_status(key: Key) -> None:
    _, meta = seal(key)
    framed = e2e._frame({"content_type": "application/json"}, b"{}")  # no status
    sealed = b"cube-e2e/1\x02" + e2e.ResponseSealer(meta).seal(e2e.WHOLE, framed)
    with pytest.raises(EnvelopeError) as info:
        e2e.open_whole(meta, sealed, 200)
    assert info.value.code == "e2e_malformed"


EVENTS = [
    b'data: {"choices":[{"delta":{"content":"RESP"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"ONSE-SECRET"}}]}\n\n',
    b"data: [DONE]\n\n",
]


def sealed_stream(meta: e2e.RequestMeta, framing: e2e.Framing = "sse") -> list[bytes]:
    sealer = e2e.ResponseSealer(meta)
    out = [sealer.event(event, framing) for event in EVENTS]
    out.append(e2e.usage_record(11, 4, framing))
    out.append(sealer.end(framing))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 100000])
def test_stream_round_trip_whatever_the_chunking(key: Key, chunk: int) -> None:
    _, meta = seal(key)
    wire = b"".join(sealed_stream(meta))
    assert b"SECRET" not in wire and b"DONE" not in wire
    decoder = e2e.StreamDecoder(meta, "sse")
    out = b"".join(decoder.feed(wire[i : i + chunk]) for i in range(0, len(wire), chunk))
    decoder.finish()
    assert out == b"".join(EVENTS)
    assert decoder.usage == {"prompt_tokens": 11, "completion_tokens": 4}


def test_ndjson_stream_round_trip(key: Key) -> None:
    _, meta = seal(key)
    wire = b"".join(sealed_stream(meta, "ndjson"))
    assert all(json.loads(line) for line in wire.splitlines())
    decoder = e2e.StreamDecoder(meta, "ndjson")
    out = decoder.feed(wire)
    decoder.finish()
    assert out == b"".join(EVENTS)


def test_a_truncated_stream_is_detected(key: Key) -> None:
    _, meta = seal(key)
    records = sealed_stream(meta)
    decoder = e2e.StreamDecoder(meta, "sse")
    decoder.feed(b"".join(records[:-1]))  # everything but the end marker
    with pytest.raises(EnvelopeError) as info:
        decoder.finish()
    assert info.value.code == "e2e_truncated"
    # Cut in the middle of a record.
    decoder = e2e.StreamDecoder(meta, "sse")
    wire = b"".join(records)
    decoder.feed(wire[: len(records[0]) + 20])
    with pytest.raises(EnvelopeError):
        decoder.finish()


def test_dropped_reordered_or_repeated_records_are_refused(key: Key) -> None:
    _, meta = seal(key)
    records = sealed_stream(meta)
    for wire in (
        records[0] + records[2],  # dropped
        records[1] + records[0],  # reordered
        records[0] + records[0],  # repeated
    ):
        decoder = e2e.StreamDecoder(meta, "sse")
        with pytest.raises(EnvelopeError) as info:
            decoder.feed(wire)
        assert info.value.code == "e2e_undecryptable"


def test_a_plaintext_event_in_a_sealed_stream_is_refused(key: Key) -> None:
    _, meta = seal(key)
    records = sealed_stream(meta)
    decoder = e2e.StreamDecoder(meta, "sse")
    with pytest.raises(EnvelopeError) as info:
        decoder.feed(records[0] + b'data: {"choices":[{"delta":{"content":"forged"}}]}\n\n')
    assert info.value.code == "e2e_plaintext"


def test_deeply_nested_json_anywhere_is_an_envelope_error(key: Key) -> None:
    """JSON nested past Python's recursion limit — in a request's metadata (anyone holding the
    public key can seal one), or injected into a stream by whoever relays it — is refused
    like any other malformed input, never a bare RecursionError."""
    import struct

    meta_bytes = b"[" * 5000
    plaintext = struct.pack(">I", len(meta_bytes)) + meta_bytes + b"{}"
    sealed = e2e.HPKE_SUITE.encrypt(
        plaintext,
        x25519.X25519PublicKey.from_public_bytes(key.public),
        info=e2e._REQUEST_INFO + key.id,
    )
    with pytest.raises(EnvelopeError) as info:
        key.open(e2e.MAGIC + b"\x01" + key.id + sealed)
    assert info.value.code == "e2e_malformed"
    _, meta = seal(key)
    ndjson = e2e.StreamDecoder(meta, "ndjson")
    with pytest.raises(EnvelopeError):
        ndjson.feed(b"[" * 5000 + b"\n")
    sse = e2e.StreamDecoder(meta, "sse")  # an unreadable usage event is the proxy's loss only
    assert sse.feed(b"event: cube-usage\ndata: " + b"[" * 5000 + b"\n\n") == b""
    assert sse.usage == {}


def test_nothing_after_the_end_marker(key: Key) -> None:
    _, meta = seal(key)
    records = sealed_stream(meta)
    sealer = e2e.ResponseSealer(meta)
    decoder = e2e.StreamDecoder(meta, "sse")
    decoder.feed(b"".join(records))
    with pytest.raises(EnvelopeError):
        decoder.feed(sealer.event(b"data: late\n\n", "sse"))


def test_stream_of_another_request_is_refused(key: Key) -> None:
    _, meta = seal(key)
    _, other = seal(key)
    decoder = e2e.StreamDecoder(other, "sse")
    with pytest.raises(EnvelopeError):
        decoder.feed(b"".join(sealed_stream(meta)))


def test_split_records_keeps_every_byte() -> None:
    data = b"data: a\n\ndata: b\r\n\r\ndata: c\n\ntail"
    parts = list(e2e.split_records(data, "sse"))
    assert b"".join(parts) == data
    assert parts == [b"data: a\n\n", b"data: b\r\n\r\n", b"data: c\n\n", b"tail"]
    assert list(e2e.split_records(b'{"a":1}\n{"b":2}\n', "ndjson")) == [b'{"a":1}\n', b'{"b":2}\n']


def test_usage_header_round_trip() -> None:
    value = e2e.usage_header(11, 4)
    assert value == "prompt_tokens=11, completion_tokens=4"
    assert e2e.parse_usage_header(value) == {"prompt_tokens": 11, "completion_tokens": 4}
    assert e2e.parse_usage_header("prompt_tokens=x, completion_tokens=3") == {
        "completion_tokens": 3
    }


# -- the agent's replay cache ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_replay_is_refused() -> None:
    clock = Clock()
    cache = ReplayCache(window=300, clock=clock)
    cache.admit(b"a" * 32, int(clock.now))
    with pytest.raises(EnvelopeError) as info:
        cache.admit(b"a" * 32, int(clock.now))
    assert info.value.code == "e2e_replay" and info.value.status == 409
    cache.admit(b"b" * 32, int(clock.now))


def test_timestamps_outside_the_window_are_refused() -> None:
    clock = Clock()
    cache = ReplayCache(window=300, clock=clock)
    for issued in (clock.now - 301, clock.now + 301):
        with pytest.raises(EnvelopeError) as info:
            cache.admit(b"c" * 32, int(issued))
        assert info.value.code == "e2e_stale"
    cache.admit(b"c" * 32, int(clock.now - 299))
    cache.admit(b"d" * 32, int(clock.now + 299))


def test_entries_expire_only_when_their_replay_would_be_stale() -> None:
    clock = Clock()
    cache = ReplayCache(window=300, clock=clock)
    issued = int(clock.now)
    cache.admit(b"e" * 32, issued)
    clock.now += 300  # still inside the window: still remembered
    with pytest.raises(EnvelopeError, match="replay"):
        cache.admit(b"e" * 32, issued)
    clock.now += 301  # the entry may go now: a replay is refused by its timestamp instead
    cache.admit(b"f" * 32, int(clock.now))
    assert len(cache) == 1
    with pytest.raises(EnvelopeError) as info:
        cache.admit(b"e" * 32, issued)
    assert info.value.code == "e2e_stale"


def test_the_cache_is_bounded_and_fails_closed() -> None:
    clock = Clock()
    cache = ReplayCache(window=300, max_entries=3, clock=clock)
    for i in range(3):
        cache.admit(bytes([i]) * 32, int(clock.now))
    with pytest.raises(EnvelopeError) as info:
        cache.admit(b"z" * 32, int(clock.now))
    assert info.value.code == "e2e_busy" and info.value.status == 503
    clock.now += 601
    cache.admit(b"z" * 32, int(clock.now))
    assert len(cache) == 1


def test_an_ollama_stream_ends_at_its_top_level_done_only() -> None:
    """A tool call's arguments may hold ``"done": true``: that line is not the end (the rest
    of a sealed Ollama stream was held back until the real end); the top-level one is."""
    tool = b'{"message":{"tool_calls":[{"function":{"arguments":{"done": true}}}]},"done":false}\n'
    assert not e2e.is_last_event(tool)
    assert e2e.is_last_event(tool + b'{"message":{"content":""},"done":true,"eval_count":3}\n')
    assert e2e.is_last_event(b"data: [DONE]\n\n")
    assert not e2e.is_last_event(b'data: {"choices":[]}\n\n')
