"""The agent's side of end-to-end encrypted bodies (``cube-e2e/1``, docs/e2e-encryption.md).

A request whose ``Content-Type`` is exactly ``application/cube-e2e`` is sealed to this agent's
attested HPKE key (:mod:`cube_client.e2e` is the codec). :func:`open_body` (called by
:func:`agent.forward.read_body`, so every POST route gets it) opens it, checks it, and leaves a
:class:`~cube_client.e2e.ResponseSealer` on the request; from then on everything the agent
answers to that request is sealed under the response key the client chose:

- a whole answer (success or error) by :func:`seal_response`, with token counts in the
  plaintext ``Cube-Usage`` header for the proxy's metering;
- a stream by :class:`StreamSealing`: each SSE event (NDJSON line for Ollama) sealed on its own,
  then a plaintext ``cube-usage`` record with the token counts, then the sealed end marker.

Checks on a sealed request, in order (each refusal a JSON error; none reveals content):
recipient key (421 ``e2e_wrong_recipient``: the client verifies again and retries if that names
another key), decryption (400), the sealed method and path equal the request's and no query
string, which is not sealed (400 ``e2e_wrong_target``), the issue time within ``WINDOW_SECONDS``
of the agent's clock (400 ``e2e_stale``), not seen before (409 ``e2e_replay``), and the
``Cube-E2E-Model`` header equal to the body's model (:func:`cube_client.e2e.body_model`; 400
``e2e_model_mismatch``: the proxy routes and scopes by that header). A plain request is never
taken for a sealed one: the content type alone decides, and a sealed-type body that does not
open is refused, never forwarded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from aiohttp import hdrs, web

from agent.identity import AgentIdentity
from cube_client.e2e import (
    CONTENT_TYPE,
    MODEL_HEADER,
    USAGE_HEADER,
    EnvelopeError,
    Framing,
    ResponseSealer,
    body_model,
    is_last_event,
    key_id,
    open_request,
    request_key_id,
    split_records,
    usage_header,
    usage_record,
)

__all__ = [
    "E2E",
    "KEPT_KEYS",
    "MAX_SEEN",
    "SEALER",
    "WINDOW_SECONDS",
    "E2EState",
    "EnvelopeError",
    "ReplayCache",
    "StreamSealing",
    "is_sealed",
    "open_body",
    "seal_response",
    "setup",
    "stream_sealing",
]

#: How far a request's issue time may be from the agent's clock (either way), in seconds.
WINDOW_SECONDS: Final = 300
#: Most requests remembered for replay detection; when full of live entries, new sealed
#: requests are refused (503) rather than any entry forgotten early.
MAX_SEEN: Final = 200_000
_OFF_LOOP: Final = 256 * 1024  # bodies above this are opened or sealed in a worker thread


class ReplayCache:
    """Remembers the HPKE ``enc`` of every accepted request until its issue time has left the
    window (kept ``2 * window`` after arrival, which covers that), bounded in size."""

    def __init__(
        self,
        *,
        window: int = WINDOW_SECONDS,
        max_entries: int = MAX_SEEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()  # worker threads open large envelopes

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, enc: bytes, issued_at: int) -> None:
        """Accept a request once, inside the window; :class:`EnvelopeError` otherwise."""
        now = self._clock()
        # Integer bounds, compared exactly with the float clock: nothing here converts
        # issued_at to a float, which overflows for a huge one (RequestMeta bounds it too).
        if not issued_at - self.window <= now <= issued_at + self.window:
            raise EnvelopeError(
                f"the encrypted request was issued {int(now) - issued_at} s from the agent's "
                f"clock; at most {self.window} s either way is accepted (check the clock)",
                code="e2e_stale",
            )
        with self._lock:
            horizon = now - 2 * self.window
            while self._seen:
                oldest, arrived = next(iter(self._seen.items()))
                if arrived >= horizon:
                    break
                del self._seen[oldest]
            if enc in self._seen:
                raise EnvelopeError(
                    "this encrypted request was already received: replay refused",
                    code="e2e_replay",
                    status=409,
                )
            if len(self._seen) >= self.max_entries:
                raise EnvelopeError(
                    "too many encrypted requests in the replay window; retry shortly",
                    code="e2e_busy",
                    status=503,
                )
            self._seen[enc] = now


#: HPKE keys a sealed request may be addressed to: the current one and the one before it (a
#: client that verified just before a rotation); older ones answer 421 (verify again).
KEPT_KEYS: Final = 2


class E2EState:
    """What opening sealed requests needs: the key holders and the replay cache."""

    def __init__(self, identity: AgentIdentity, replay: ReplayCache | None = None) -> None:
        self.replay = replay if replay is not None else ReplayCache()
        self._keys: OrderedDict[bytes, Callable[[bytes, bytes], bytes]] = OrderedDict()
        self.add(identity)

    def add(self, identity: AgentIdentity) -> None:
        """A new current key (agent.rotation); the oldest beyond :data:`KEPT_KEYS` is dropped,
        so nothing sealed to it opens any more."""
        self._keys[key_id(identity.hpke_public_key)] = identity.hpke_decrypt
        while len(self._keys) > KEPT_KEYS:
            self._keys.popitem(last=False)

    @property
    def key_id(self) -> bytes:
        """The current key's id."""
        return next(reversed(self._keys))

    def decrypter(self, recipient: bytes) -> tuple[bytes, Callable[[bytes, bytes], bytes]]:
        """The key ``recipient`` names if this agent still holds it, else the current one (with
        which :func:`open_request` answers 421: verify again)."""
        decrypt = self._keys.get(recipient)
        if decrypt is not None:
            return recipient, decrypt
        return self.key_id, self._keys[self.key_id]


E2E = web.AppKey("e2e", E2EState)
#: Set on a request whose body was sealed: everything answered to it is sealed too.
SEALER = web.RequestKey("e2e_sealer", ResponseSealer)


def setup(app: web.Application, identity: AgentIdentity) -> None:
    app[E2E] = E2EState(identity)


def is_sealed(request: web.BaseRequest) -> bool:
    """Whether the request claims a sealed body (the content type alone decides)."""
    return request.content_type.lower() == CONTENT_TYPE


def _open(state: E2EState, request: web.Request, envelope: bytes) -> tuple[ResponseSealer, bytes]:
    recipient, decrypt = state.decrypter(request_key_id(envelope))
    opened = open_request(envelope, recipient_key_id=recipient, decrypt=decrypt)
    meta = opened.meta
    if meta.method != request.method or meta.path != request.path:
        raise EnvelopeError(
            "the encrypted request was sealed for another method or path", code="e2e_wrong_target"
        )
    if request.rel_url.raw_query_string:
        # Not sealed, so not the client's: whoever relayed the request could have added it, and
        # the backend would read it.
        raise EnvelopeError(
            "an encrypted request must not carry a query string (it is not sealed)",
            code="e2e_wrong_target",
        )
    state.replay.admit(opened.enc, meta.issued_at)
    header = request.headers.get(MODEL_HEADER)
    model = body_model(opened.body, meta.path)  # an unparsable body: refused when forwarded
    if header != model and not (header is None and model is None):
        raise EnvelopeError(
            f"the {MODEL_HEADER} header does not name the model of the encrypted body",
            code="e2e_model_mismatch",
        )
    return ResponseSealer(meta), opened.body


async def open_body(request: web.Request, body: bytes) -> bytes:
    """The plaintext body of ``request``: ``body`` itself unless sealed (then opened, checked,
    and the request marked for sealed answers). Raises :class:`EnvelopeError`."""
    if not is_sealed(request):
        return body
    state = request.app.get(E2E)
    if state is None:
        raise EnvelopeError(
            "end-to-end encryption is not available on this agent", code="e2e_unavailable"
        )
    if len(body) > _OFF_LOOP:
        sealer, plain = await asyncio.to_thread(_open, state, request, body)
    else:
        sealer, plain = _open(state, request, body)
    request[SEALER] = sealer
    return plain


def _counts(usage: tuple[object, object] | None) -> tuple[int | None, int | None]:
    if usage is None:
        return None, None
    prompt, completion = usage
    return (
        prompt if type(prompt) is int and prompt >= 0 else None,
        completion if type(completion) is int and completion >= 0 else None,
    )


async def seal_response(
    request: web.Request,
    response: web.StreamResponse,
    usage: tuple[object, object] | None = None,
) -> web.StreamResponse:
    """Seal a whole (not yet sent) answer to a sealed request; anything else as it is."""
    sealer = request.get(SEALER)
    if (
        sealer is None
        or sealer.ended
        or response.prepared
        or not isinstance(response, web.Response)
    ):
        return response
    body = response.body if isinstance(response.body, bytes) else b""
    content_type = response.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")
    headers = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in ("content-type", "content-length", "content-encoding")
    }
    prompt, completion = _counts(usage)
    if prompt is not None or completion is not None:
        headers[USAGE_HEADER] = usage_header(prompt, completion)
    if len(body) > _OFF_LOOP:
        sealed = await asyncio.to_thread(sealer.whole, body, content_type, response.status)
    else:
        sealed = sealer.whole(body, content_type, response.status)
    out = web.Response(status=response.status, body=sealed, headers=headers)
    out.content_type = CONTENT_TYPE
    return out


class StreamSealing:
    """Seals a relayed stream record by record (one per SSE event or NDJSON line).

    The backend's last event (``data: [DONE]``, Ollama's ``"done": true``) and anything after it
    are held back and go out with the end marker, in one write: a client that closes as soon as
    it sees that event (the openai SDK does) then closes an exchange the proxy, which cannot read
    sealed records, already saw end (otherwise it would audit a delivered answer as abandoned).
    """

    def __init__(self, sealer: ResponseSealer, framing: Framing) -> None:
        self._sealer = sealer
        self._framing = framing
        self._held = b""

    def seal(self, data: bytes) -> bytes:
        """``data`` is one or more complete records (or a record-less blob): each sealed. What
        is returned goes out now; from the last event on, nothing does until :meth:`finish`."""
        sealed = b"".join(
            self._sealer.event(record, self._framing)
            for record in split_records(data, self._framing)
        )
        if self._held or is_last_event(data):
            self._held += sealed
            return b""
        return sealed

    @property
    def ended(self) -> bool:
        """Whether the end marker has been sealed (nothing may follow it)."""
        return self._sealer.ended

    def finish(self, usage: tuple[object, object] | None) -> bytes:
        """What was held back, the plaintext token counts (when known), then the sealed end
        marker."""
        prompt, completion = _counts(usage)
        out, self._held = self._held, b""
        if prompt is not None or completion is not None:
            out += usage_record(prompt, completion, self._framing)
        return out + self._sealer.end(self._framing)


def stream_sealing(request: web.Request, framing: Framing) -> StreamSealing | None:
    sealer = request.get(SEALER)
    return None if sealer is None else StreamSealing(sealer, framing)
