"""``cube-e2e/1``: request and response bodies sealed end to end to an attested agent.

This module is the reference codec of the wire format (docs/e2e-encryption.md has it byte by
byte); both sides use it: the client (:mod:`cube_client`'s transport) seals requests and opens
responses, the agent (:mod:`agent.e2e`) opens requests and seals responses. It depends on
``cryptography`` only.

- A request is sealed with HPKE (RFC 9180, single-shot, DHKEM(X25519, HKDF-SHA256) /
  HKDF-SHA256 / ChaCha20-Poly1305) to the agent's attested HPKE key. Inside: request metadata
  (a random request id, the issue time, method, path, model, and a fresh 32-byte response key)
  and the original body.
- Responses are sealed with ChaCha20-Poly1305 under that response key: a whole body as one
  record, a stream as one record per event, then a sealed end marker. Record nonces are a
  counter, so records cannot be dropped, reordered, repeated or cut off unnoticed.
- Labels separate every use of a key: the HPKE ``info`` names the request direction and the
  recipient key; each response record's associated data names the response direction, the
  request id and the record kind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cube_client._errors import EncryptionError

__all__ = [
    "AGENT_HEADER",
    "CONTENT_TYPE",
    "END",
    "EVENT",
    "HPKE_SUITE",
    "MAGIC",
    "MODEL_HEADER",
    "SSE_DONE",
    "SSE_EVENT",
    "USAGE_EVENT",
    "USAGE_HEADER",
    "WHOLE",
    "EnvelopeError",
    "OpenedRequest",
    "RequestMeta",
    "ResponseOpener",
    "ResponseSealer",
    "StreamDecoder",
    "body_model",
    "is_last_event",
    "key_id",
    "open_request",
    "open_whole",
    "parse_usage_header",
    "request_enc",
    "request_key_id",
    "seal_request",
    "seal_whole",
    "split_records",
    "stream_record",
    "usage_header",
    "usage_record",
]

#: Content type of a sealed request and of a sealed non-streaming response (exact match).
CONTENT_TYPE: Final = "application/cube-e2e"
#: Routing metadata for the proxy, which cannot read the sealed body's ``model``.
MODEL_HEADER: Final = "Cube-E2E-Model"
#: The agent (id from the proxy's ``X-Cube-Agent``) whose key the body is sealed to.
AGENT_HEADER: Final = "Cube-E2E-Agent"
#: Token counts of a sealed non-streaming response: ``prompt_tokens=<n>, completion_tokens=<n>``.
USAGE_HEADER: Final = "Cube-Usage"
#: SSE event names: sealed records, and the plaintext token counts for metering.
SSE_EVENT: Final = "cube-e2e"
USAGE_EVENT: Final = "cube-usage"

MAGIC: Final = b"cube-e2e/1"
_REQUEST: Final = 0x01
_RESPONSE: Final = 0x02
_REQUEST_INFO: Final = b"cube-e2e/1 request\x00"
_RESPONSE_AAD: Final = b"cube-e2e/1 response\x00"

#: Response record kinds.
WHOLE: Final = 0x01  # a complete non-streaming body (with its content type)
EVENT: Final = 0x02  # one streamed record (an SSE event or an NDJSON line), verbatim
END: Final = 0x03  # the stream is complete (empty plaintext)
_KINDS: Final = (WHOLE, EVENT, END)

HPKE_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_KEY_BYTES: Final = 32
_KEY_ID_BYTES: Final = 32
_ENC_BYTES: Final = 32
_TAG_BYTES: Final = 16
_ID_BYTES: Final = 16
_HEADER_BYTES: Final = len(MAGIC) + 1 + _KEY_ID_BYTES  # magic, direction, key id
_MAX_META: Final = 4096
#: ``issued_at`` must lie in ``[0, 2**40)``: Unix seconds for the next 34 000 years, and small
#: enough for any arithmetic (a huge integer once overflowed the agent's float clock check).
_MAX_ISSUED_AT: Final = 2**40
_MAX_RECORDS: Final = 2**32

Framing = Literal["sse", "ndjson"]


class EnvelopeError(EncryptionError):
    """A sealed message that cannot be accepted. ``code`` is the machine-readable reason;
    ``status`` the HTTP status an agent answers with. Messages never contain body content."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message, check=f"e2e.{code}")
        self.code = code
        self.status = status


def key_id(public_key: bytes) -> bytes:
    """SHA-256 of a raw X25519 public key: names the recipient in a request envelope."""
    return hashlib.sha256(public_key).digest()


def _frame(meta: dict[str, object], body: bytes) -> bytes:
    encoded = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack(">I", len(encoded)) + encoded + body


def _unframe(data: bytes, what: str) -> tuple[dict[str, object], bytes]:
    if len(data) < 4:
        raise EnvelopeError(f"{what}: too short", code="e2e_malformed")
    (size,) = struct.unpack(">I", data[:4])
    if size > _MAX_META or 4 + size > len(data):
        raise EnvelopeError(f"{what}: bad metadata length", code="e2e_malformed")
    try:
        meta = json.loads(data[4 : 4 + size])
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise EnvelopeError(f"{what}: metadata is not JSON", code="e2e_malformed") from None
    if not isinstance(meta, dict):
        raise EnvelopeError(f"{what}: metadata is not an object", code="e2e_malformed")
    return meta, data[4 + size :]


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestMeta:
    """What travels sealed with a request body."""

    request_id: bytes
    issued_at: int  # Unix seconds
    method: str
    path: str
    model: str | None
    response_key: bytes

    def __repr__(self) -> str:  # never show the response key
        return f"RequestMeta(request_id={self.request_id.hex()}, path={self.path!r})"

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": self.request_id.hex(),
            "issued_at": self.issued_at,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "response_key": base64.b64encode(self.response_key).decode(),
        }

    @classmethod
    def from_json(cls, meta: dict[str, object]) -> RequestMeta:
        expected = {"request_id", "issued_at", "method", "path", "model", "response_key"}
        if set(meta) != expected:
            raise EnvelopeError("request metadata: unexpected fields", code="e2e_malformed")
        request_id, issued, method, path, model, rkey = (
            meta["request_id"],
            meta["issued_at"],
            meta["method"],
            meta["path"],
            meta["model"],
            meta["response_key"],
        )
        if not isinstance(request_id, str) or not isinstance(rkey, str):
            raise EnvelopeError("request metadata: bad id or key", code="e2e_malformed")
        try:
            rid = bytes.fromhex(request_id)
            key = base64.b64decode(rkey, validate=True)
        except (ValueError, binascii.Error):
            raise EnvelopeError("request metadata: bad id or key", code="e2e_malformed") from None
        if (
            len(key) != _KEY_BYTES
            or len(rid) != _ID_BYTES
            or type(issued) is not int
            or not 0 <= issued < _MAX_ISSUED_AT
            or not isinstance(method, str)
            or not isinstance(path, str)
            or not path.startswith("/")
            or not (model is None or isinstance(model, str))
        ):
            raise EnvelopeError("request metadata: bad field types", code="e2e_malformed")
        return cls(rid, issued, method, path, model, key)


def body_model(body: bytes, path: str) -> str | None:
    """The model a plaintext request body names: what ``Cube-E2E-Model`` carries (the client
    sets it, the agent requires it to match). Its ``model``; on Ollama's routes (``/api/...``),
    when that is absent or null, its ``name`` (older clients' ``/api/show``, ``/api/pull``), as
    the proxy and the agent read plaintext bodies. None if neither is a string."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if model is None and path.startswith("/api/"):
        model = data.get("name")
    return model if isinstance(model, str) else None


def seal_request(
    body: bytes,
    public_key: bytes,
    *,
    method: str,
    path: str,
    model: str | None,
    now: float | None = None,
) -> tuple[bytes, RequestMeta]:
    """Seal ``body`` to the agent's HPKE ``public_key`` (raw X25519, 32 bytes).

    Returns the envelope (the new request body) and the metadata whose ``response_key`` opens
    the answer (:class:`ResponseOpener`).
    """
    if len(public_key) != _KEY_BYTES:
        raise EnvelopeError("the HPKE public key must be 32 bytes", code="e2e_bad_key")
    meta = RequestMeta(
        request_id=os.urandom(_ID_BYTES),
        issued_at=int(time.time() if now is None else now),
        method=method.upper(),
        path=path,
        model=model,
        response_key=ChaCha20Poly1305.generate_key(),
    )
    recipient = key_id(public_key)
    sealed = HPKE_SUITE.encrypt(
        _frame(meta.to_json(), body),
        x25519.X25519PublicKey.from_public_bytes(public_key),
        info=_REQUEST_INFO + recipient,
    )
    return MAGIC + bytes([_REQUEST]) + recipient + sealed, meta


@dataclass(frozen=True)
class OpenedRequest:
    meta: RequestMeta
    body: bytes
    enc: bytes  # the HPKE encapsulated key: unique per sealing (replay caches key on it)


def request_key_id(envelope: bytes) -> bytes:
    """The recipient key id of a request envelope (checked before any decryption)."""
    if len(envelope) < _HEADER_BYTES + _ENC_BYTES + _TAG_BYTES:
        raise EnvelopeError("the encrypted body is too short", code="e2e_malformed")
    if envelope[: len(MAGIC)] != MAGIC or envelope[len(MAGIC)] != _REQUEST:
        raise EnvelopeError("the body is not a cube-e2e/1 request envelope", code="e2e_malformed")
    return envelope[len(MAGIC) + 1 : _HEADER_BYTES]


def request_enc(envelope: bytes) -> bytes:
    return envelope[_HEADER_BYTES : _HEADER_BYTES + _ENC_BYTES]


def open_request(
    envelope: bytes,
    *,
    recipient_key_id: bytes,
    decrypt: Callable[[bytes, bytes], bytes],
) -> OpenedRequest:
    """Open a request envelope addressed to ``recipient_key_id``.

    ``decrypt(ciphertext, info)`` is the holder of the private key (the agent's
    :meth:`AgentIdentity.hpke_decrypt`). Raises :class:`EnvelopeError`: ``e2e_wrong_recipient``
    (421) for an envelope sealed to another key, ``e2e_undecryptable`` for one that does not
    authenticate, ``e2e_malformed`` for anything that does not parse.
    """
    recipient = request_key_id(envelope)
    if recipient != recipient_key_id:
        raise EnvelopeError(
            "the body is sealed to another agent's key; verify this endpoint again",
            code="e2e_wrong_recipient",
            status=421,
        )
    try:
        plaintext = decrypt(envelope[_HEADER_BYTES:], _REQUEST_INFO + recipient)
    except (InvalidTag, ValueError):
        raise EnvelopeError(
            "the encrypted body does not decrypt (tampered, truncated or not for this key)",
            code="e2e_undecryptable",
        ) from None
    meta, body = _unframe(plaintext, "request")
    return OpenedRequest(RequestMeta.from_json(meta), body, request_enc(envelope))


# -- responses ------------------------------------------------------------------------------------


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


def _aad(request_id: bytes, kind: int) -> bytes:
    return _RESPONSE_AAD + request_id + bytes([kind])


class ResponseSealer:
    """The agent's side of one response: seals records in order under the response key."""

    __slots__ = ("_aead", "_counter", "_request_id", "ended")

    def __init__(self, meta: RequestMeta) -> None:
        self._aead = ChaCha20Poly1305(meta.response_key)
        self._request_id = meta.request_id
        self._counter = 0
        self.ended = False

    def __repr__(self) -> str:
        return f"ResponseSealer(request_id={self._request_id.hex()})"

    def seal(self, kind: int, plaintext: bytes) -> bytes:
        """One record: ``kind`` (1 byte) || ChaCha20-Poly1305(plaintext)."""
        if self.ended:
            raise EnvelopeError("the response is already complete", code="e2e_ended")
        if self._counter >= _MAX_RECORDS:
            raise EnvelopeError("too many records in one response", code="e2e_too_long")
        record = bytes([kind]) + self._aead.encrypt(
            _nonce(self._counter), plaintext, _aad(self._request_id, kind)
        )
        self._counter += 1
        if kind in (WHOLE, END):
            self.ended = True
        return record

    def whole(self, body: bytes, content_type: str, status: int) -> bytes:
        """A sealed non-streaming response body; its HTTP status is sealed with it."""
        framed = _frame({"content_type": content_type, "status": status}, body)
        return MAGIC + bytes([_RESPONSE]) + self.seal(WHOLE, framed)

    def event(self, record: bytes, framing: Framing) -> bytes:
        """One streamed record (an SSE event or NDJSON line, verbatim), framed for the wire."""
        return stream_record(self.seal(EVENT, record), framing)

    def end(self, framing: Framing) -> bytes:
        """The sealed end marker, framed for the wire."""
        return stream_record(self.seal(END, b""), framing)


class ResponseOpener:
    """The client's side of one response: opens records in order."""

    __slots__ = ("_aead", "_counter", "_request_id", "ended")

    def __init__(self, meta: RequestMeta) -> None:
        self._aead = ChaCha20Poly1305(meta.response_key)
        self._request_id = meta.request_id
        self._counter = 0
        self.ended = False

    def open(self, record: bytes) -> tuple[int, bytes]:
        if self.ended:
            raise EnvelopeError("data after the end of the sealed response", code="e2e_trailing")
        if len(record) < 1 + _TAG_BYTES or record[0] not in _KINDS:
            raise EnvelopeError("a sealed response record is malformed", code="e2e_malformed")
        kind = record[0]
        try:
            plaintext = self._aead.decrypt(
                _nonce(self._counter), record[1:], _aad(self._request_id, kind)
            )
        except InvalidTag:
            raise EnvelopeError(
                "a sealed response record does not authenticate (tampered, reordered, "
                "dropped or not for this request)",
                code="e2e_undecryptable",
            ) from None
        self._counter += 1
        if kind in (WHOLE, END):
            self.ended = True
        return kind, plaintext

    def whole(self, body: bytes, status: int | None = None) -> tuple[bytes, str]:
        """Open a sealed non-streaming body: ``(body, content_type)``. ``status``, the HTTP
        status it came with, must be the sealed one (a relay cannot turn an answer into an
        error, or an error into an answer)."""
        header = MAGIC + bytes([_RESPONSE])
        if not body.startswith(header):
            raise EnvelopeError("the body is not a cube-e2e/1 response", code="e2e_malformed")
        kind, plaintext = self.open(body[len(header) :])
        if kind != WHOLE:
            raise EnvelopeError("expected a whole sealed response", code="e2e_malformed")
        meta, inner = _unframe(plaintext, "response")
        content_type = meta.get("content_type")
        sealed_status = meta.get("status")
        if (
            not isinstance(content_type, str)
            or type(sealed_status) is not int
            or set(meta) != {"content_type", "status"}
        ):
            raise EnvelopeError("response metadata: bad fields", code="e2e_malformed")
        if status is not None and status != sealed_status:
            raise EnvelopeError(
                f"the answer came with HTTP status {status}, but the agent sealed "
                f"{sealed_status}: changed on the way",
                code="e2e_status_mismatch",
            )
        return inner, content_type


def seal_whole(meta: RequestMeta, body: bytes, content_type: str, status: int = 200) -> bytes:
    return ResponseSealer(meta).whole(body, content_type, status)


def open_whole(meta: RequestMeta, body: bytes, status: int | None = None) -> tuple[bytes, str]:
    return ResponseOpener(meta).whole(body, status)


# -- stream framing -------------------------------------------------------------------------------


def stream_record(record: bytes, framing: Framing) -> bytes:
    data = base64.b64encode(record)
    if framing == "sse":
        return b"event: " + SSE_EVENT.encode() + b"\ndata: " + data + b"\n\n"
    return b'{"' + SSE_EVENT.encode() + b'":"' + data + b'"}\n'


def usage_record(
    prompt_tokens: int | None, completion_tokens: int | None, framing: Framing
) -> bytes:
    """The plaintext token counts (for the proxy's metering), framed for the wire."""
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    payload = json.dumps({k: v for k, v in counts.items() if v is not None}).encode()
    if framing == "sse":
        return b"event: " + USAGE_EVENT.encode() + b"\ndata: " + payload + b"\n\n"
    return b'{"' + USAGE_EVENT.encode() + b'":' + payload + b"}\n"


def usage_header(prompt_tokens: int | None, completion_tokens: int | None) -> str:
    parts = []
    if prompt_tokens is not None:
        parts.append(f"prompt_tokens={prompt_tokens}")
    if completion_tokens is not None:
        parts.append(f"completion_tokens={completion_tokens}")
    return ", ".join(parts)


_USAGE_PART: Final = re.compile(r"\s*(prompt_tokens|completion_tokens)=(\d{1,12})\s*")


def parse_usage_header(value: str) -> dict[str, int]:
    """``{"prompt_tokens": n, "completion_tokens": n}`` from a ``Cube-Usage`` value (parts that
    do not parse are ignored)."""
    out: dict[str, int] = {}
    for part in value.split(","):
        match = _USAGE_PART.fullmatch(part)
        if match is not None:
            out[match.group(1)] = int(match.group(2))
    return out


_SSE_SEPARATOR: Final = re.compile(rb"\r\n\r\n|\n\n|\r\r|\n\r\n")


def split_records(data: bytes, framing: Framing) -> Iterator[bytes]:
    """Split complete records (each with its terminator) out of ``data``; a tail without a
    terminator comes last, as it is."""
    if framing == "ndjson":
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end < 0:
                yield data[start:]
                return
            yield data[start : end + 1]
            start = end + 1
        return
    start = 0
    for match in _SSE_SEPARATOR.finditer(data):
        yield data[start : match.end()]
        start = match.end()
    if start < len(data):
        yield data[start:]


#: An SSE record that is OpenAI's end marker, ``data: [DONE]`` (the agent's usage note goes
#: just before it).
SSE_DONE: Final = re.compile(rb"^data: ?\[DONE\]\s*$", re.M)
_NDJSON_DONE: Final = re.compile(rb'"done"\s*:\s*true')


def is_last_event(plaintext: bytes) -> bool:
    """Whether a backend's records end its stream (OpenAI's ``[DONE]``, Ollama's top-level
    ``"done": true`` — not one inside a tool call's arguments, after which the rest of the
    stream was held back as if it had ended)."""
    if SSE_DONE.search(plaintext) is not None:
        return True
    if _NDJSON_DONE.search(plaintext) is None:
        return False  # the usual line: no parse
    for line in plaintext.splitlines():
        if _NDJSON_DONE.search(line) is None:
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and value.get("done") is True:
            return True
    return False


class StreamDecoder:
    """The client's decoder of a sealed stream (SSE or NDJSON): feed it what arrives, get the
    backend's original records back; :meth:`finish` raises if the end marker never came.

    Plaintext ``cube-usage`` records are dropped (they are the proxy's business); any other
    plaintext record is refused: nothing unsealed may pass as part of the agent's answer.
    """

    def __init__(self, meta: RequestMeta, framing: Framing) -> None:
        self._opener = ResponseOpener(meta)
        self._framing = framing
        self._pending = b""
        self.usage: dict[str, int] = {}
        #: A decrypted record was the backend's own last one (``data: [DONE]``, or an NDJSON
        #: line with ``"done": true``): what follows is only the end marker.
        self.last_event_seen = False

    @property
    def ended(self) -> bool:
        return self._opener.ended

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        out: list[bytes] = []
        consumed = 0
        for record in split_records(data, self._framing):
            complete = (
                record.endswith(b"\n")
                if self._framing == "ndjson"
                else _SSE_SEPARATOR.search(record) is not None
            )
            if not complete:
                break
            consumed += len(record)
            plaintext = self._record(record)
            if plaintext and not self.last_event_seen and is_last_event(plaintext):
                self.last_event_seen = True
            out.append(plaintext)
        self._pending = data[consumed:]
        if len(self._pending) > 64 * 1024 * 1024:
            raise EnvelopeError("a sealed stream record is too large", code="e2e_malformed")
        return b"".join(out)

    def finish(self) -> None:
        if self._pending.strip():
            raise EnvelopeError(
                "the sealed stream ended in the middle of a record", code="e2e_truncated"
            )
        if not self._opener.ended:
            raise EnvelopeError(
                "the sealed stream ended without its end marker: the answer was cut off",
                code="e2e_truncated",
            )

    def _record(self, record: bytes) -> bytes:
        if self._framing == "ndjson":
            return self._ndjson(record)
        event = ""
        data: list[bytes] = []
        for line in record.splitlines():
            if not line or line.startswith(b":"):
                continue  # blank separator or an SSE comment (keep-alive)
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"event":
                event = value.decode("utf-8", "replace")
            elif name == b"data":
                data.append(value)
        if not data and not event:
            return b""  # comments only
        payload = b"\n".join(data)
        if event == USAGE_EVENT:
            self._note_usage(payload)
            return b""
        if event != SSE_EVENT:
            raise EnvelopeError(
                "a plaintext event in a sealed stream: refused", code="e2e_plaintext"
            )
        return self._open_event(payload)

    def _ndjson(self, line: bytes) -> bytes:
        if not line.strip():
            return b""
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise EnvelopeError("a sealed stream line is not JSON", code="e2e_malformed") from None
        if isinstance(obj, dict) and set(obj) == {USAGE_EVENT}:
            self._note_usage(json.dumps(obj[USAGE_EVENT]).encode())
            return b""
        if (
            not isinstance(obj, dict)
            or set(obj) != {SSE_EVENT}
            or not isinstance(obj[SSE_EVENT], str)
        ):
            raise EnvelopeError(
                "a plaintext line in a sealed stream: refused", code="e2e_plaintext"
            )
        try:
            payload = obj[SSE_EVENT].encode("ascii")  # base64 is ASCII; a lone surrogate is not
        except UnicodeEncodeError:
            raise EnvelopeError("a sealed record is not base64", code="e2e_malformed") from None
        return self._open_event(payload)

    def _open_event(self, payload: bytes) -> bytes:
        try:
            record = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            raise EnvelopeError("a sealed record is not base64", code="e2e_malformed") from None
        kind, plaintext = self._opener.open(record)
        if kind == WHOLE:
            raise EnvelopeError("a whole-body record inside a stream", code="e2e_malformed")
        return plaintext  # END carries b""

    def _note_usage(self, payload: bytes) -> None:
        try:
            usage = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(usage, dict):
            self.usage = {k: v for k, v in usage.items() if isinstance(k, str) and type(v) is int}
