"""Operations: ``/health``, ``/ready``, ``/metrics``, JSON errors and structured JSON logs.

- ``GET /health``: liveness, ``200 {"status": "ok"}`` while the process serves.
- ``GET /ready``: ``200`` when the backend is reachable (:func:`agent.forward.backend_ready`),
  the configured model is loaded (listed by the backend's ``/v1/models``, or ``/api/tags`` for
  Ollama) and evidence is obtainable (a successful collection in the last minute, else a trial
  one); ``503`` with the failing checks otherwise.
- ``GET /metrics``: Prometheus text from the application's own registry.

Every response's request carries an id (``X-Request-Id``: the client's, if it is a short token,
else a fresh one). The access log writes one JSON line per request: method, route (the route
template, never the raw path's query), status, latency in ms, request id. Never bodies, headers,
tokens or query strings. Unhandled errors become ``500`` JSON errors; the log gets the exception
type and the stack frames, never the exception's message (it could quote request content).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.config import AgentConfig
from agent.metrics import METRICS
from cube._logging import JsonFormatter, configure_logging, log_line

__all__ = [
    "READY_CHECKS",
    "REQUEST_ID",
    "JsonFormatter",
    "ReadyCheck",
    "access_log_middleware",
    "configure_logging",
    "json_error",
    "json_errors_middleware",
    "setup",
]

log = logging.getLogger("cube.agent")
access_log = logging.getLogger("cube.agent.access")

REQUEST_ID = web.RequestKey("request_id", str)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{8,64}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A readiness check: (ok, detail). The detail is shown to callers of /ready.
ReadyCheck = Callable[[web.Application], Awaitable[tuple[bool, str]]]
#: name -> check. create_app fills it; tests may replace entries.
READY_CHECKS: web.AppKey[dict[str, ReadyCheck]] = web.AppKey("ready_checks")


def json_error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped JSON error: ``{"error": {"message", "type", "code"?}}``."""
    error: dict[str, object] = {"message": message, "type": type_}
    if code is not None:
        error["code"] = code
    return web.json_response({"error": error}, status=status, headers=headers)


# -- logging ---------------------------------------------------------------------------------


# -- middlewares -----------------------------------------------------------------------------


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    status = 500
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    else:
        status = response.status
        return response
    finally:
        log_line(
            access_log,
            "request",
            {
                "method": request.method,
                "route": _route(request),
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": request_id,
            },
        )


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


@web.middleware
async def json_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's HTTP errors as JSON; anything unexpected as a bare 500 (no traceback out).
    On Ollama's routes (``/api/...``) every JSON error is in Ollama's shape."""
    response = await _json_errors(request, handler)
    if request.path.startswith("/api/"):
        _to_ollama_shape(response)
    return response


def _to_ollama_shape(response: web.StreamResponse) -> None:
    """``{"error": {"message", "code", ...}}`` → ``{"error": "<message>", "code": ...}``: the
    ``ollama`` client and Open WebUI read ``error`` as text (a dict made the client raise
    TypeError instead of its ResponseError)."""
    if (
        not isinstance(response, web.Response)
        or response.status < 400
        or response.content_type != "application/json"
        or not isinstance(response.body, bytes)
    ):
        return
    try:
        document = json.loads(response.body)
    except ValueError:
        return
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        response.body = json.dumps({"error": error["message"], "code": error.get("code")}).encode()


async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return json_error(
            exc.status,
            exc.reason,
            type_=_ERROR_TYPES.get(exc.status, "server_error"),
            headers=headers,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", extra={"fields": {"route": _route(request)}})
        return json_error(500, "internal error", type_="server_error")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "cube-agent"  # not the framework and its version
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


# -- routes ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = request.app[READY_CHECKS]
    names = list(checks)
    results = await asyncio.gather(*(_run_check(checks[n], request.app) for n in names))
    report = {
        n: {"ok": ok, "detail": detail} for n, (ok, detail) in zip(names, results, strict=True)
    }
    if all(ok for ok, _ in results):
        return web.json_response({"status": "ready", "checks": report})
    failing = [n for n, (ok, _) in zip(names, results, strict=True) if not ok]
    return web.json_response(
        {
            "error": {"message": f"not ready: {', '.join(failing)}", "type": "not_ready"},
            "status": "not_ready",
            "checks": report,
        },
        status=503,
        headers={"Retry-After": "5"},
    )


async def _run_check(check: ReadyCheck, app: web.Application) -> tuple[bool, str]:
    try:
        return await check(app)
    except Exception as exc:
        log.warning("readiness check failed", extra={"fields": {"error": type(exc).__name__}})
        return False, f"check failed ({type(exc).__name__})"


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- readiness checks ------------------------------------------------------------------------


async def backend_check(app: web.Application) -> tuple[bool, str]:
    """The backend is reachable and lists the configured model (agent.forward.backend_ready:
    ``/v1/models``, or ``/api/tags`` for Ollama)."""
    try:
        from agent import forward
    except ImportError:
        return False, "no forwarding module"
    check: ReadyCheck | None = getattr(forward, "backend_ready", None)
    if check is None:
        return False, "no backend readiness check"
    return await check(app)


def setup(app: web.Application, config: AgentConfig) -> None:
    """Routes, the JSON error and access-log middlewares, and the default readiness checks
    (evidence is added by :func:`agent.app.create_app` when it has a collector)."""
    app.middlewares.append(access_log_middleware)
    app.middlewares.append(json_errors_middleware)
    app.on_response_prepare.append(_add_request_id)
    del config
    checks: dict[str, ReadyCheck] = {"backend": backend_check}
    app[READY_CHECKS] = checks
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/ready", ready, name="ready")
    app.router.add_get("/metrics", metrics, name="metrics")
