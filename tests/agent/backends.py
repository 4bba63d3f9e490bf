"""Fake backends for the agent's forwarding tests: real aiohttp servers on loopback.

- :class:`FakeOpenAI` — an OpenAI-shaped server (what vLLM and llama-server expose): models,
  chat and text completions (streamed as SSE or whole, with ``usage``), embeddings (float or
  base64). Knobs make it fail the ways real backends do: die mid-stream, wait between chunks,
  answer HTTP errors or HTML, reset kept-alive connections (llama-server closes them after every
  streamed response), and it records what it received and whether its client went away.

- :class:`OllamaStandIn` — **a STAND-IN for a real Ollama server**, which cannot be installed on
  these machines. It replays a recording of Ollama's responses written down from Ollama's
  published API documentation (``docs/api.md`` in github.com/ollama/ollama: the request and
  response examples of ``/api/generate``, ``/api/chat``, ``/api/tags``, ``/api/show``,
  ``/api/embed``, ``/api/embeddings``, ``/api/ps``, ``/api/version``, and ``docs/openai.md``
  for ``/v1``), with Ollama's wire behaviour: streaming by default as NDJSON
  (``application/x-ndjson``, one JSON object per line, one line per token, a final
  ``"done": true`` object carrying ``done_reason`` and the timing and eval counts),
  ``"stream": false`` answering one ``application/json; charset=utf-8`` object, and errors as
  ``{"error": "..."}``. It proves the agent's adapter against the documented protocol, not
  against Ollama itself; ``test_ollama.py::test_live_ollama`` does that when ``OLLAMA_URL``
  points at a real server.

Both run on any event loop; :class:`BackgroundLoop` runs one in a thread so synchronous tests
(the ``openai`` SDK, the agent's own background thread) can reach them. Their signals
(:class:`Signal`, :class:`Gate`) are safe to use from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict

T = TypeVar("T")

PROMPT_TOKENS = 11  # what FakeOpenAI reports as usage.prompt_tokens
EMBEDDING_DIMENSIONS = 8


class Signal:
    """A one-way flag set on the server's loop and awaited or polled from any thread."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def set(self) -> None:
        self._flag.set()

    def clear(self) -> None:
        self._flag.clear()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def wait(self, timeout: float) -> bool:
        """Block this (non-loop) thread until set."""
        return self._flag.wait(timeout)

    async def wait_async(self, timeout: float) -> bool:
        """Wait without blocking the calling loop (whichever loop that is)."""
        deadline = time.monotonic() + timeout
        while not self._flag.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True


class Gate:
    """Holds a streaming handler between chunks until opened (from any thread)."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def open(self) -> None:
        self._flag.set()

    async def wait(self) -> None:
        while not self._flag.is_set():
            await asyncio.sleep(0.005)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _FakeServer:
    """An aiohttp server on a free loopback port, cancelling handlers when its client goes."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=1024**3)
        self.received: list[Received] = []
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        # Connections (transports) that have already served a request: the stale keep-alive knob.
        self._served: set[Any] = set()

    async def start(self) -> None:
        # handler_cancellation: a handler is cancelled as soon as the agent closes the connection,
        # which is how a real backend learns that it should stop generating.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> _FakeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _record(self, request: web.Request) -> Received:
        received = Received(
            request.method, request.path, CIMultiDict(request.headers), await request.read()
        )
        self.received.append(received)
        return received

    def requests_to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


# ---------------------------------------------------------------------------------------------
# The OpenAI-shaped fake


class FakeOpenAI(_FakeServer):
    """An OpenAI-compatible backend (vLLM- and llama-server-shaped answers) with failure knobs.

    Knobs (plain attributes; :meth:`reset` restores them):

    - ``tokens``: the content pieces a completion streams, one SSE event each.
    - ``delay``: seconds between streamed events.
    - ``gate``: if set, a stream waits for it after its first event.
    - ``die_after``: abort the connection after this many events (``die_mid_record``: after
      sending half of the next one).
    - ``die_before_response``: abort every inference request's connection without answering.
    - ``reset_reused``: abort a request that arrives on a kept-alive connection which already
      served one, without answering (what a client sees when the server had closed it).
    - ``close_after_stream``: close the connection after each streamed response although the
      response advertised keep-alive (llama-server's behaviour).
    - ``error``: ``(status, body, content_type)`` to answer every request with.
    - ``hold``: if set, every request waits for it before answering at all (``held`` is set
      while it waits).
    - ``linger``: seconds a stream stays open after its last event before it ends.

    Signals: ``stream_started`` (first event written), ``last_sent`` (set just before the last
    event is written), ``held`` (a request is waiting on ``hold``), ``cancelled`` (a handler
    saw its client close the connection).
    """

    def __init__(self, *, models: tuple[str, ...] = ("cube-tiny", "other-model")) -> None:
        super().__init__()
        self.models = list(models)
        self.stream_started = Signal()
        self.last_sent = Signal()
        self.held = Signal()
        self.cancelled = Signal()
        self.reset()
        r = self.app.router
        r.add_get("/v1/models", self._models)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/embeddings", self._embeddings)

    def reset(self) -> None:
        self.tokens = ["Hello", ",", " world", "!"]
        self.delay = 0.0
        self.gate: Gate | None = None
        self.hold: Gate | None = None
        self.die_after: int | None = None
        self.die_mid_record = False
        self.die_before_response = False
        self.reset_reused = False
        self.close_after_stream = False
        self.linger = 0.0
        self.error: tuple[int, bytes, str] | None = None
        self.resets = 0
        self.received.clear()
        self._served.clear()
        for signal in (self.stream_started, self.last_sent, self.held, self.cancelled):
            signal.clear()

    # -- common behaviour ----------------------------------------------------------------------

    async def _prologue(self, request: web.Request) -> tuple[Received, web.Response | None]:
        """Record the request and apply the knobs that answer before any content."""
        transport = request.transport
        reused = transport in self._served
        self._served.add(transport)
        received = await self._record(request)
        if (self.reset_reused and reused) or (
            self.die_before_response and request.path != "/v1/models"
        ):
            self.resets += 1
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("fake backend: connection reset on purpose")
        if self.hold is not None:
            self.held.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.error is not None:
            status, body, content_type = self.error
            return received, web.Response(
                status=status, body=body, headers={"Content-Type": content_type}
            )
        return received, None

    def _model(self, payload: dict[str, Any]) -> tuple[str, web.Response | None]:
        model = payload.get("model", self.models[0])
        if model not in self.models:
            return model, web.json_response(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        return model, None

    # -- routes --------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        _, early = await self._prologue(request)
        if early is not None:
            return early
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": "cube-fake"}
                    for m in self.models
                ],
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "text")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        received, early = await self._prologue(request)
        if early is not None:
            return early
        payload = received.json()
        model, missing = self._model(payload)
        if missing is not None:
            return missing
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(self.tokens),
            "total_tokens": PROMPT_TOKENS + len(self.tokens),
        }
        created = int(time.time())
        if not payload.get("stream"):
            text = "".join(self.tokens)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                if kind == "chat"
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            )
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        events = self._events(kind, model, created, usage if include_usage else None)
        return await self._stream(request, events)

    def _events(
        self, kind: str, model: str, created: int, usage: dict[str, int] | None
    ) -> list[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict[str, Any] | None, finish: str | None, text: str = "") -> bytes:
            choice: dict[str, Any] = (
                {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
                if kind == "chat"
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            )
            data: dict[str, Any] = {
                "id": "cmpl-fake",
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if usage is not None:
                data["usage"] = None
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        events = []
        if kind == "chat":
            events.append(chunk({"role": "assistant", "content": ""}, None))
        for token in self.tokens:
            events.append(chunk({"content": token}, None, token))
        events.append(chunk({}, "stop"))
        if usage is not None:
            final = {
                "id": "cmpl-fake",
                "object": obj,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            events.append(b"data: " + json.dumps(final).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        try:
            for index, event in enumerate(events):
                if self.die_after is not None and index == self.die_after:
                    if self.die_mid_record:
                        await response.write(event[: len(event) // 2])
                    await asyncio.sleep(0.01)  # let the bytes leave before the reset
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if index == len(events) - 1:
                    self.last_sent.set()
                await response.write(event)
                if index == 0:
                    self.stream_started.set()
                    if self.gate is not None:
                        await self.gate.wait()
                elif self.delay:
                    await asyncio.sleep(self.delay)
            if self.linger:
                await asyncio.sleep(self.linger)
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.set()
            raise
        if self.close_after_stream:
            # Headers went out without "Connection: close"; close anyway, as llama-server does.
            response.force_close()
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        received, early = await self._prologue(request)
        if early is not None:
            return early
        payload = received.json()
        model, missing = self._model(payload)
        if missing is not None:
            return missing
        inputs = payload.get("input")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for index, text in enumerate(texts):
            vector = embedding_of(str(text))
            encoded: Any = vector
            if payload.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(str(t).split()) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def embedding_of(text: str) -> list[float]:
    """A deterministic small vector per text (exactly representable in float32)."""
    seed = sum(text.encode()) % 97
    return [((seed + i * 7) % 16) / 16.0 - 0.5 for i in range(EMBEDDING_DIMENSIONS)]


# ---------------------------------------------------------------------------------------------
# The Ollama stand-in: a recording written down from Ollama's docs/api.md


#: /api/tags as Ollama answers it (entries shaped like docs/api.md "List Local Models"; newer
#: servers also repeat the name as "model").
OLLAMA_TAGS: dict[str, Any] = {
    "models": [
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "modified_at": "2024-09-25T14:56:49.277302595-07:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        },
        {
            "name": "codellama:13b",
            "model": "codellama:13b",
            "modified_at": "2023-11-04T14:56:49.277302595-07:00",
            "size": 7365960935,
            "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": None,
                "parameter_size": "13B",
                "quantization_level": "Q4_0",
            },
        },
        {
            "name": "all-minilm:latest",
            "model": "all-minilm:latest",
            "modified_at": "2024-06-04T14:38:31.83753-07:00",
            "size": 45960996,
            "digest": "1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "bert",
                "families": ["bert"],
                "parameter_size": "23M",
                "quantization_level": "F16",
            },
        },
    ]
}

#: /api/show for llama3.2 (docs/api.md "Show Model Information"; verbose fields left empty).
OLLAMA_SHOW: dict[str, Any] = {
    "modelfile": (
        '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this one, '
        "replace the FROM line with:\n# FROM llama3.2:latest\n\nFROM /root/.ollama/models/blobs/"
        "sha256:dde5aa3fc5ffc17176b5e8bdc82f587b24b2678c6c66101bf7da77af9f7ccdff\n"
        'TEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|eot_id|>"'
    ),
    "parameters": 'stop                           "<|start_header_id|>"\n'
    'stop                           "<|end_header_id|>"\n'
    'stop                           "<|eot_id|>"',
    "template": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
        "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
        "<|eot_id|>"
    ),
    "details": {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    },
    "model_info": {
        "general.architecture": "llama",
        "general.file_type": 15,
        "general.parameter_count": 3212749888,
        "general.quantization_version": 2,
        "llama.attention.head_count": 24,
        "llama.attention.head_count_kv": 8,
        "llama.attention.layer_norm_rms_epsilon": 0.00001,
        "llama.block_count": 28,
        "llama.context_length": 131072,
        "llama.embedding_length": 3072,
        "llama.feed_forward_length": 8192,
        "llama.rope.dimension_count": 128,
        "llama.rope.freq_base": 500000,
        "llama.vocab_size": 128256,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.token_type": None,
        "tokenizer.ggml.tokens": None,
    },
    "modified_at": "2024-09-25T14:56:49.277302595-07:00",
}

#: /api/ps (docs/api.md "List Running Models").
OLLAMA_PS: dict[str, Any] = {
    "models": [
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "size": 5137025024,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": OLLAMA_SHOW["details"],
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
        },
        {
            "name": "codellama:13b",
            "model": "codellama:13b",
            "size": 7365960935,
            "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
            "details": OLLAMA_TAGS["models"][1]["details"],
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 7365960935,
        },
    ]
}

#: The pieces a stand-in generation streams (docs/api.md: one object per token).
OLLAMA_TOKENS = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", "."]
#: The final object's statistics (docs/api.md "Chat Request (Streaming)", final response).
OLLAMA_FINAL_STATS: dict[str, Any] = {
    "total_duration": 4883583458,
    "load_duration": 1334875,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 342546000,
    "eval_count": len(OLLAMA_TOKENS),
    "eval_duration": 4535599000,
}
#: /api/embed vectors (docs/api.md "Generate Embeddings", multiple input).
OLLAMA_EMBEDDINGS = [
    [
        0.010071029,
        -0.0017594862,
        0.05007221,
        0.04692972,
        0.054916814,
        0.008599704,
        0.105441414,
        -0.025878139,
        0.12958129,
        0.031952348,
    ],
    [
        -0.0098027075,
        0.06042469,
        0.025257962,
        -0.006364387,
        0.07272725,
        0.017194884,
        0.09032035,
        -0.051705178,
        0.09951512,
        0.09072481,
    ],
]
OLLAMA_VERSION = {"version": "0.5.1"}

_NDJSON = "application/x-ndjson"
_JSON = "application/json; charset=utf-8"


class OllamaStandIn(_FakeServer):
    """STAND-IN for a real Ollama server (see the module docstring): replays the recording above.

    Knobs: ``gate`` (a stream waits after its first line), ``delay`` (between lines),
    ``die_after`` (abort the connection after that many lines). Signals: ``last_sent``,
    ``cancelled``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.models = [m["name"] for m in OLLAMA_TAGS["models"]]
        self.last_sent = Signal()
        self.cancelled = Signal()
        self.reset()
        r = self.app.router
        r.add_post("/api/chat", self._chat)
        r.add_post("/api/generate", self._generate)
        r.add_post("/api/embed", self._embed)
        r.add_post("/api/embeddings", self._embeddings)
        r.add_post("/api/show", self._show)
        r.add_get("/api/tags", self._static(OLLAMA_TAGS))
        r.add_get("/api/ps", self._static(OLLAMA_PS))
        r.add_get("/api/version", self._static(OLLAMA_VERSION))
        r.add_get("/v1/models", self._v1_models)
        r.add_post("/v1/chat/completions", self._v1_chat)

    def reset(self) -> None:
        self.gate: Gate | None = None
        self.delay = 0.0
        self.die_after: int | None = None
        self.received.clear()
        self.last_sent.clear()
        self.cancelled.clear()

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        # Go's encoding/json: compact, no spaces.
        return web.Response(
            body=json.dumps(data, separators=(",", ":")).encode(),
            status=status,
            headers={"Content-Type": _JSON},
        )

    def _static(self, data: dict[str, Any]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            await self._record(request)
            return self._json(data)

        return handler

    def _resolve(self, name: object) -> str | web.Response:
        """The installed model a request names (Ollama's defaults: tag ``latest``)."""
        if not isinstance(name, str) or not name:
            return self._json({"error": "model is required"}, 400)
        full = name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
        if full not in self.models:
            return self._json({"error": f'model "{name}" not found, try pulling it first'}, 404)
        return full

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        model = self._resolve(payload.get("model"))
        if isinstance(model, web.Response):
            return model
        stamp = "2023-08-04T08:52:19.385406455-07:00"
        if payload.get("stream", True) is False:
            return self._json(
                {
                    "model": payload["model"],
                    "created_at": "2023-12-12T14:13:43.416799Z",
                    "message": {"role": "assistant", "content": "".join(OLLAMA_TOKENS)},
                    "done_reason": "stop",
                    "done": True,
                    **OLLAMA_FINAL_STATS,
                }
            )
        lines: list[dict[str, Any]] = [
            {
                "model": payload["model"],
                "created_at": stamp,
                "message": {"role": "assistant", "content": token},
                "done": False,
            }
            for token in OLLAMA_TOKENS
        ]
        lines.append(
            {
                "model": payload["model"],
                "created_at": "2023-08-04T19:22:45.499127Z",
                "message": {"role": "assistant", "content": ""},
                "done_reason": "stop",
                "done": True,
                **OLLAMA_FINAL_STATS,
            }
        )
        return await self._ndjson(request, lines)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        model = self._resolve(payload.get("model"))
        if isinstance(model, web.Response):
            return model
        final = {
            "model": payload["model"],
            "created_at": "2023-08-04T19:22:45.499127Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": [1, 2, 3],
            **OLLAMA_FINAL_STATS,
        }
        if payload.get("stream", True) is False:
            return self._json({**final, "response": "".join(OLLAMA_TOKENS)})
        lines: list[dict[str, Any]] = [
            {
                "model": payload["model"],
                "created_at": "2023-08-04T08:52:19.385406455-07:00",
                "response": token,
                "done": False,
            }
            for token in OLLAMA_TOKENS
        ]
        lines.append(final)
        return await self._ndjson(request, lines)

    async def _ndjson(
        self, request: web.Request, lines: list[dict[str, Any]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _NDJSON})
        await response.prepare(request)
        try:
            for index, line in enumerate(lines):
                if self.die_after is not None and index == self.die_after:
                    await asyncio.sleep(0.01)
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if index == len(lines) - 1:
                    self.last_sent.set()
                # Ollama writes one marshalled object plus "\n" per token and flushes.
                await response.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                if index == 0 and self.gate is not None:
                    await self.gate.wait()
                elif self.delay:
                    await asyncio.sleep(self.delay)
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.set()
            raise
        return response

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        model = self._resolve(payload.get("model"))
        if isinstance(model, web.Response):
            return model
        inputs = payload.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        return self._json(
            {
                "model": payload["model"],
                "embeddings": OLLAMA_EMBEDDINGS[:count],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": 8 * count,
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        model = self._resolve(payload.get("model"))
        if isinstance(model, web.Response):
            return model
        return self._json({"embedding": OLLAMA_EMBEDDINGS[0]})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        # Ollama's ShowHandler takes "model", falling back to the older "name".
        model = self._resolve(payload.get("model") or payload.get("name"))
        if isinstance(model, web.Response):
            return model
        return self._json(OLLAMA_SHOW)

    async def _v1_models(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return self._json(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1727301409, "owned_by": "library"}
                    for m in self.models
                ],
            }
        )

    async def _v1_chat(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        model = self._resolve(payload.get("model"))
        if isinstance(model, web.Response):
            # Ollama's /v1 layer reshapes errors the OpenAI way.
            message = json.loads(model.body)["error"]  # type: ignore[arg-type]
            return self._json(
                {
                    "error": {
                        "message": message,
                        "type": "api_error" if model.status >= 500 else "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                model.status,
            )
        content = "".join(OLLAMA_TOKENS)
        return self._json(
            {
                "id": "chatcmpl-123",
                "object": "chat.completion",
                "created": 1727301409,
                "model": payload["model"],
                "system_fingerprint": "fp_ollama",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": OLLAMA_FINAL_STATS["prompt_eval_count"],
                    "completion_tokens": OLLAMA_FINAL_STATS["eval_count"],
                    "total_tokens": OLLAMA_FINAL_STATS["prompt_eval_count"]
                    + OLLAMA_FINAL_STATS["eval_count"],
                },
            }
        )


# ---------------------------------------------------------------------------------------------
# Running servers from synchronous tests


class BackgroundLoop:
    """An event loop in a daemon thread (for servers that synchronous code talks to)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-backend")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextmanager
def serving(server: _FakeServer) -> Iterator[BackgroundLoop]:
    """Serve ``server`` from a background loop for the duration of the block."""
    loop = BackgroundLoop()
    try:
        loop.run(server.start())
        yield loop
    finally:
        try:
            loop.run(server.stop())
        finally:
            loop.close()
