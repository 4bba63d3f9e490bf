"""``cube-e2e/1`` against its specification (docs/e2e-encryption.md), byte by byte, and the codec's
refusals that the round-trip tests in test_envelope.py cannot see: envelopes and records built
here by hand from the documented labels, nonces and framing must open (so a codec whose labels,
nonce layout or AAD drifted from the document fails), and every structural rule of the format —
record kinds, the end marker, metadata keys, types and lengths, plaintext in a sealed stream —
is enforced even on input that authenticates."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cube_client import e2e
from cube_client.e2e import EnvelopeError

# The documented constants, spelled out here rather than taken from the codec.
MAGIC = b"cube-e2e/1"
REQUEST_INFO = b"cube-e2e/1 request\x00"
RESPONSE_AAD = b"cube-e2e/1 response\x00"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
BODY = b'{"model":"cube-tiny","messages":[{"role":"user","content":"PROMPT-SECRET"}]}'
CHAT = "/v1/chat/completions"


class Key:
    def __init__(self) -> None:
        self.private = x25519.X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id = e2e.key_id(self.public)

    def decrypt(self, ciphertext: bytes, info: bytes) -> bytes:
        return SUITE.decrypt(ciphertext, self.private, info=info)

    def open(self, envelope: bytes) -> e2e.OpenedRequest:
        return e2e.open_request(envelope, recipient_key_id=self.id, decrypt=self.decrypt)

    def envelope(self, plaintext: bytes) -> bytes:
        """An envelope built from the document alone, around any inner plaintext."""
        sealed = SUITE.encrypt(plaintext, self.private.public_key(), info=REQUEST_INFO + self.id)
        return MAGIC + b"\x01" + self.id + sealed


@pytest.fixture
def key() -> Key:
    return Key()


def good_meta(**change: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "issued_at": 1_800_000_000,
        "method": "POST",
        "model": "cube-tiny",
        "path": CHAT,
        "request_id": "ab" * 16,
        "response_key": base64.b64encode(b"k" * 32).decode(),
    }
    meta.update(change)
    return meta


def frame(meta: object, body: bytes = BODY) -> bytes:
    encoded = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack(">I", len(encoded)) + encoded + body


def meta_of(key: Key) -> e2e.RequestMeta:
    return e2e.seal_request(BODY, key.public, method="POST", path=CHAT, model="cube-tiny")[1]


def record(meta: e2e.RequestMeta, index: int, kind: int, plaintext: bytes) -> bytes:
    """A response record built from the document: nonce = index (96-bit big-endian), AAD =
    label || request id || kind."""
    nonce = index.to_bytes(12, "big")
    aad = RESPONSE_AAD + meta.request_id + bytes([kind])
    return bytes([kind]) + ChaCha20Poly1305(meta.response_key).encrypt(nonce, plaintext, aad)


def sse(rec: bytes) -> bytes:
    return b"event: cube-e2e\ndata: " + base64.b64encode(rec) + b"\n\n"


def refused(code: str, call: object, *args: object) -> None:
    with pytest.raises(EnvelopeError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.code == code, info.value.code


# -- requests -------------------------------------------------------------------------------------


def test_a_request_built_from_the_document_opens(key: Key) -> None:
    opened = key.open(key.envelope(frame(good_meta())))
    assert opened.body == BODY
    assert opened.meta.path == CHAT and opened.meta.issued_at == 1_800_000_000
    assert opened.meta.response_key == b"k" * 32


def test_the_codecs_request_opens_with_the_documented_info(key: Key) -> None:
    envelope, meta = e2e.seal_request(BODY, key.public, method="post", path=CHAT, model="m")
    assert envelope[:11] == MAGIC + b"\x01" and envelope[11:43] == key.id
    plaintext = SUITE.decrypt(envelope[43:], key.private, info=REQUEST_INFO + key.id)
    (size,) = struct.unpack(">I", plaintext[:4])
    assert plaintext[4 + size :] == BODY
    inner = plaintext[4 : 4 + size]
    assert inner == json.dumps(meta.to_json(), separators=(",", ":"), sort_keys=True).encode()
    assert json.loads(inner)["method"] == "POST"
    # Without the recipient's key id in `info` it does not open.
    with pytest.raises(InvalidTag):
        SUITE.decrypt(envelope[43:], key.private, info=REQUEST_INFO)


@pytest.mark.parametrize(
    "meta",
    [
        good_meta(extra="x"),  # exactly the documented keys
        {k: v for k, v in good_meta().items() if k != "model"},
        good_meta(issued_at="1800000000"),
        good_meta(issued_at=1_800_000_000.5),
        good_meta(issued_at=True),
        good_meta(path="v1/chat/completions"),  # a path as the agent receives it starts with /
        good_meta(method=1),
        good_meta(model=7),
        good_meta(request_id="ab" * 15),
        good_meta(request_id="zz" * 16),
        good_meta(response_key=base64.b64encode(b"k" * 31).decode()),
        good_meta(response_key="not base64!"),
        ["not", "an", "object"],
    ],
)
def test_request_metadata_must_have_exactly_the_documented_shape(key: Key, meta: object) -> None:
    refused("e2e_malformed", key.open, key.envelope(frame(meta)))


def test_request_metadata_is_at_most_4096_bytes(key: Key) -> None:
    def padded(size: int) -> dict[str, object]:
        meta = good_meta(model="")
        meta["model"] = "m" * (size - len(frame(meta, b"")) + 4)
        return meta

    at_limit = frame(padded(4096))
    assert struct.unpack(">I", at_limit[:4])[0] == 4096
    assert key.open(key.envelope(at_limit)).body == BODY
    over = frame(padded(4097))
    assert struct.unpack(">I", over[:4])[0] == 4097
    refused("e2e_malformed", key.open, key.envelope(over))


def test_a_metadata_length_past_the_plaintext_is_refused(key: Key) -> None:
    encoded = json.dumps(good_meta(), separators=(",", ":"), sort_keys=True).encode()
    for claimed in (len(encoded) + 1, len(encoded) + 100):
        refused("e2e_malformed", key.open, key.envelope(struct.pack(">I", claimed) + encoded))
    refused("e2e_malformed", key.open, key.envelope(b"\x00\x00"))


# -- response records -----------------------------------------------------------------------------


def test_a_stream_built_from_the_document_opens(key: Key) -> None:
    meta = meta_of(key)
    events = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    wire = b"".join(sse(record(meta, i, e2e.EVENT, event)) for i, event in enumerate(events))
    wire += sse(record(meta, len(events), e2e.END, b""))
    decoder = e2e.StreamDecoder(meta, "sse")
    assert decoder.feed(wire) == b"".join(events)
    decoder.finish()


def test_the_codecs_records_open_with_the_documented_nonce_and_aad(key: Key) -> None:
    meta = meta_of(key)
    sealer = e2e.ResponseSealer(meta)
    aead = ChaCha20Poly1305(meta.response_key)
    for index, (kind, plaintext) in enumerate(
        [(e2e.EVENT, b"a"), (e2e.EVENT, b"b"), (e2e.END, b"")]
    ):
        rec = sealer.seal(kind, plaintext)
        assert rec[0] == kind
        aad = RESPONSE_AAD + meta.request_id + bytes([kind])
        assert aead.decrypt(index.to_bytes(12, "big"), rec[1:], aad) == plaintext


def test_a_whole_answer_built_from_the_document_opens(key: Key) -> None:
    meta = meta_of(key)
    inner = frame({"content_type": "application/json", "status": 201}, b'{"ok":1}')
    body = MAGIC + b"\x02" + record(meta, 0, e2e.WHOLE, inner)
    assert e2e.open_whole(meta, body, 201) == (b'{"ok":1}', "application/json")


def test_records_are_bound_to_their_kind(key: Key) -> None:
    """A relay cannot turn an event into the end marker (cutting the stream short unnoticed),
    nor the end marker into an event, nor an event into a whole answer: the kind is in the AAD.
    (Records sealed by the codec itself, so this holds whatever its labels are.)"""
    meta = meta_of(key)
    event = e2e.ResponseSealer(meta).seal(e2e.EVENT, b"data: x\n\n")
    refused("e2e_undecryptable", e2e.ResponseOpener(meta).open, bytes([e2e.END]) + event[1:])
    end = e2e.ResponseSealer(meta).seal(e2e.END, b"")
    refused("e2e_undecryptable", e2e.ResponseOpener(meta).open, bytes([e2e.EVENT]) + end[1:])
    whole = MAGIC + b"\x02" + bytes([e2e.WHOLE]) + event[1:]
    refused("e2e_undecryptable", e2e.open_whole, meta, whole)
    decoder = e2e.StreamDecoder(meta, "sse")
    refused("e2e_undecryptable", decoder.feed, sse(bytes([e2e.END]) + event[1:]))
    assert not decoder.ended


def test_records_are_bound_to_their_request_id(key: Key) -> None:
    """Even under the same key, a record of another request id does not open (the request id is
    in the AAD, not only implied by a fresh key)."""
    meta = meta_of(key)
    other = dataclasses.replace(meta, request_id=bytes(16))
    rec = e2e.ResponseSealer(other).seal(e2e.EVENT, b"data: x\n\n")
    refused("e2e_undecryptable", e2e.ResponseOpener(meta).open, rec)
    assert e2e.ResponseOpener(other).open(rec) == (e2e.EVENT, b"data: x\n\n")


def test_an_authentic_record_after_the_end_marker_is_refused(key: Key) -> None:
    meta = meta_of(key)
    opener = e2e.ResponseOpener(meta)
    opener.open(record(meta, 0, e2e.EVENT, b"data: x\n\n"))
    opener.open(record(meta, 1, e2e.END, b""))
    refused("e2e_trailing", opener.open, record(meta, 2, e2e.EVENT, b"data: late\n\n"))
    decoder = e2e.StreamDecoder(meta, "sse")
    decoder.feed(sse(record(meta, 0, e2e.END, b"")))
    refused("e2e_trailing", decoder.feed, sse(record(meta, 1, e2e.EVENT, b"data: late\n\n")))


def test_a_torn_record_after_the_end_marker_fails_the_stream(key: Key) -> None:
    meta = meta_of(key)
    decoder = e2e.StreamDecoder(meta, "sse")
    decoder.feed(
        sse(record(meta, 0, e2e.EVENT, b"data: x\n\n")) + sse(record(meta, 1, e2e.END, b""))
    )
    assert decoder.ended
    decoder.feed(b"event: cube-e2e\ndata: AAAA")  # no blank line: an unfinished record
    refused("e2e_truncated", decoder.finish)


def test_a_whole_record_inside_a_stream_is_refused(key: Key) -> None:
    meta = meta_of(key)
    inner = frame({"content_type": "text/event-stream", "status": 200}, b"data: x\n\n")
    refused("e2e_malformed", e2e.StreamDecoder(meta, "sse").feed, sse(record(meta, 0, 1, inner)))


@pytest.mark.parametrize("kind", [0x00, 0x04, 0xFF])
def test_an_unknown_record_kind_is_refused_even_if_it_authenticates(key: Key, kind: int) -> None:
    meta = meta_of(key)
    rec = record(meta, 0, kind, b"data: x\n\n")
    refused("e2e_malformed", e2e.ResponseOpener(meta).open, rec)
    refused("e2e_malformed", e2e.StreamDecoder(meta, "sse").feed, sse(rec))


def test_a_whole_answer_must_carry_the_response_direction(key: Key) -> None:
    meta = meta_of(key)
    inner = frame({"content_type": "application/json", "status": 200}, b"{}")
    rec = record(meta, 0, e2e.WHOLE, inner)
    refused("e2e_malformed", e2e.open_whole, meta, MAGIC + b"\x01" + rec)
    refused("e2e_malformed", e2e.open_whole, meta, b"cube-e2e/2\x02" + rec)


def test_whole_answer_metadata_has_exactly_its_two_keys(key: Key) -> None:
    meta = meta_of(key)
    for bad in (
        {"content_type": "application/json", "status": 200, "extra": 1},
        {"content_type": "application/json", "status": "200"},
        {"content_type": 1, "status": 200},
    ):
        body = MAGIC + b"\x02" + record(meta, 0, e2e.WHOLE, frame(bad, b"{}"))
        refused("e2e_malformed", e2e.open_whole, meta, body, 200)


def test_the_sealer_seals_nothing_after_the_end(key: Key) -> None:
    meta = meta_of(key)
    sealer = e2e.ResponseSealer(meta)
    sealer.end("sse")
    refused("e2e_ended", sealer.event, b"data: late\n\n", "sse")
    refused("e2e_ended", sealer.end, "sse")
    whole = e2e.ResponseSealer(meta)
    whole.whole(b"{}", "application/json", 200)
    refused("e2e_ended", whole.seal, e2e.EVENT, b"late")


# -- plaintext inside a sealed stream -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b'{"message":{"content":"forged"},"done":true}\n',
        b'{"cube-e2e":"AAAA","message":"forged"}\n',
        b'{"cube-e2e":1}\n',
        b'["cube-e2e"]\n',
    ],
)
def test_a_plaintext_ndjson_line_in_a_sealed_stream_is_refused(key: Key, line: bytes) -> None:
    refused("e2e_plaintext", e2e.StreamDecoder(meta_of(key), "ndjson").feed, line)


def test_usage_records_keep_only_integer_counts(key: Key) -> None:
    meta = meta_of(key)
    sse_decoder = e2e.StreamDecoder(meta, "sse")
    usage = b'{"prompt_tokens": "11", "completion_tokens": 4, "total_tokens": true}'
    assert sse_decoder.feed(b"event: cube-usage\ndata: " + usage + b"\n\n") == b""
    assert sse_decoder.usage == {"completion_tokens": 4}
    ndjson = e2e.StreamDecoder(meta, "ndjson")
    assert ndjson.feed(b'{"cube-usage":{"prompt_tokens":1.5,"completion_tokens":3}}\n') == b""
    assert ndjson.usage == {"completion_tokens": 3}


def test_usage_header_parts_must_parse_whole() -> None:
    assert e2e.parse_usage_header("prompt_tokens=11x, completion_tokens=4") == {
        "completion_tokens": 4
    }
    assert e2e.parse_usage_header("prompt_tokens=1;completion_tokens=2") == {}
    assert e2e.parse_usage_header("prompt_tokens=1234567890123") == {}
    assert e2e.parse_usage_header(" prompt_tokens=5 ,completion_tokens=6 ") == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
    }
