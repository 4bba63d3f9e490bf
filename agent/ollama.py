"""Ollama's native API, forwarded when the backend is Ollama (so Ollama clients such as Continue
work against the agent unchanged).

Routes (all under the ``ollama`` endpoint scope): ``POST /api/chat``, ``/api/generate``,
``/api/embed``, ``/api/embeddings``, ``/api/show``; ``GET /api/tags``, ``/api/ps``,
``/api/version``. Streaming answers (``application/x-ndjson``, Ollama's default for chat and
generate) are relayed line by line as they arrive, through the same relay as the OpenAI routes
(:func:`agent.forward.relay`): body bytes unchanged, headers stripped, disconnects cancelling
the backend, errors as JSON, a backend dying mid-stream ending the stream with an
``{"error": ...}`` line.

Model scopes follow Ollama's naming: ``llama3.2``, ``llama3.2:latest``,
``library/llama3.2`` and ``registry.ollama.ai/library/llama3.2:latest`` are one model
(:func:`canonical_model`), so a token scoped to one spelling is held to it under every
spelling. ``/api/tags`` and ``/api/ps`` list only the models the token may use. Model
management (pull, push, create, copy, delete, blobs) is refused: the VM serves the model it
measured at start, and nothing else.

The wire formats follow Ollama's published API (``docs/api.md`` in the ollama repository); the
tests replay a recording of it (``tests/agent/backends.py``, a labelled stand-in, since the
Ollama server cannot be installed here) and run against a real Ollama when ``OLLAMA_URL`` is
set.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from agent.app import CONFIG
from agent.forward import (
    BackendError,
    Exchange,
    fetch_json,
    inspect_body,
    metric_model,
    model_allowed,
    model_field,
    read_body,
    relay,
    require_model,
    require_principal,
    run_exchange,
)
from cube._model_names import OLLAMA_DEFAULT_HOST, OLLAMA_DEFAULT_NAMESPACE, ollama_canonical

__all__ = ["ENDPOINT", "canonical_model", "ollama_usage", "setup", "short_model"]

#: The endpoint scope (``endpoint:ollama``) every native Ollama route requires.
ENDPOINT: Final = "ollama"


_PROMPT_EVAL_RE: Final = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_EVAL_RE: Final = re.compile(rb'"eval_count"\s*:\s*(\d+)')


canonical_model = ollama_canonical


def short_model(name: str) -> str:
    """:func:`canonical_model` without Ollama's default registry and namespace
    (``llama3.2`` -> ``llama3.2:latest``): one spelling per model, as ``ollama list`` shows it."""
    canonical = canonical_model(name)
    host = f"{OLLAMA_DEFAULT_HOST}/"
    if not canonical.startswith(host):
        return canonical
    short = canonical[len(host) :]
    namespace = f"{OLLAMA_DEFAULT_NAMESPACE}/"
    return short[len(namespace) :] if short.startswith(namespace) else short


def ollama_usage(data: bytes) -> tuple[object, object] | None:
    """``(prompt_eval_count, eval_count)`` from a body or NDJSON lines (the final ``done``
    object carries them), or None when neither is present."""
    prompt = _PROMPT_EVAL_RE.findall(data)
    completion = _EVAL_RE.findall(data)
    if not prompt and not completion:
        return None
    return (
        int(prompt[-1]) if prompt else None,
        int(completion[-1]) if completion else None,
    )


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _model_route(metric: str, path: str, model_keys: tuple[str, ...] = ("model",)) -> Route:
    """A POST route whose body names a model (required, and within the token's scope)."""

    async def handle(request: web.Request, exchange: Exchange) -> web.StreamResponse:
        config = request.app[CONFIG]
        principal = require_principal(request, ENDPOINT)
        body = await read_body(request, config)
        data = await inspect_body(body, model_keys)
        # /api/show takes "model" or (older clients) "name"; every name given must be allowed.
        names = [name for key in model_keys if (name := model_field(data, key)) is not None]
        if not names:
            raise BackendError(400, "model is required", "model_required")
        for name in names:
            require_model(config, principal, name)
        exchange.model = metric_model(config, names[0])
        return await relay(request, exchange, "POST", path, body, usage=ollama_usage)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await run_exchange(request, metric, handle)

    handler.__name__ = f"{metric}_handler"
    return handler


def _listing_route(metric: str, path: str) -> Route:
    """A GET route listing models (``/api/tags``, ``/api/ps``), filtered to the token's scope."""

    async def handle(request: web.Request, exchange: Exchange) -> web.StreamResponse:
        config = request.app[CONFIG]
        principal = require_principal(request, ENDPOINT)
        data: Any = await fetch_json(request, exchange, path)
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise BackendError(502, "the backend's model list is malformed", "backend_invalid")
        kept = []
        for entry in data["models"]:
            if not isinstance(entry, dict):
                continue
            names = [entry[k] for k in ("name", "model") if isinstance(entry.get(k), str)]
            if names and all(model_allowed(config, principal, n) for n in names):
                kept.append(entry)
        data["models"] = kept
        return web.json_response(data)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await run_exchange(request, metric, handle)

    handler.__name__ = f"{metric}_handler"
    return handler


async def _version(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    require_principal(request, ENDPOINT)
    return await relay(request, exchange, "GET", "/api/version", None, usage=ollama_usage)


async def version(request: web.Request) -> web.StreamResponse:
    return await run_exchange(request, "ollama_version", _version)


async def _refuse_management(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    require_principal(request, ENDPOINT)
    raise BackendError(
        403,
        "model management is not available: this VM serves the model it measured at start",
        "management_disabled",
    )


async def refuse_management(request: web.Request) -> web.StreamResponse:
    return await run_exchange(request, "ollama_management", _refuse_management)


def setup(app: web.Application) -> None:
    """Add Ollama's native routes (called by :func:`agent.forward.setup` for an Ollama backend)."""
    router = app.router
    router.add_post("/api/chat", _model_route("ollama_chat", "/api/chat"))
    router.add_post("/api/generate", _model_route("ollama_generate", "/api/generate"))
    router.add_post("/api/embed", _model_route("ollama_embed", "/api/embed"))
    router.add_post("/api/embeddings", _model_route("ollama_embeddings", "/api/embeddings"))
    router.add_post("/api/show", _model_route("ollama_show", "/api/show", ("model", "name")))
    router.add_get("/api/tags", _listing_route("ollama_tags", "/api/tags"), allow_head=False)
    router.add_get("/api/ps", _listing_route("ollama_ps", "/api/ps"), allow_head=False)
    router.add_get("/api/version", version, allow_head=False)
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        router.add_post(path, refuse_management)
    router.add_delete("/api/delete", refuse_management)
    router.add_route("*", "/api/blobs/{digest}", refuse_management)
