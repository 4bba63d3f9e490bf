"""Operations: ``/health``, ``/ready``, ``/metrics``, JSON logs, and the outermost middleware.

- ``GET /health``: ``200 {"status": "ok"}`` while the process serves.
- ``GET /ready``: ``200`` when every readiness check passes (the directory answers; others may
  be added under :data:`READY_CHECKS`), ``503`` with the failing checks otherwise.
- ``GET /metrics``: Prometheus text from the gateway's own registry. The counters cover every
  tenant, so a deployment serving several tenants sets ``CUBE_PROXY_METRICS_TOKEN`` (environment
  only: a secret): then ``/metrics`` answers only ``Authorization: Bearer <that token>``
  (Prometheus's ``authorization`` / ``bearer_token_file``), compared in constant time.

The middleware gives every request an id (``X-Request-Id``: the client's if it is a short
token, else a fresh one), turns anything unhandled into a ``500`` JSON error (the log gets the
exception type and stack, never its message, which could quote request content), and writes
one JSON access-log line: method, route template (never the raw path or query), status,
milliseconds, request id, and the fields a handler added (domain, backend, model). Never
headers, credentials or bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cube._logging import JsonFormatter, configure_logging, log_line
from proxy.db.engine import is_unavailable
from proxy.gateway.errors import database_unavailable, json_error
from proxy.gateway.metrics import METRICS, exposition

__all__ = [
    "LOG_FIELDS",
    "METRICS_TOKEN_ENV",
    "READY_CHECKS",
    "REQUEST_ID",
    "JsonFormatter",
    "ReadyCheck",
    "configure_logging",
    "metrics_token",
    "observe_middleware",
    "request_id_for",
    "setup",
]

log = logging.getLogger("cube.proxy")
access_log = logging.getLogger("cube.proxy.access")

REQUEST_ID = web.RequestKey("request_id", str)
#: Extra, credential-free fields a handler wants in the access-log line.
LOG_FIELDS: web.RequestKey[dict[str, object]] = web.RequestKey("log_fields")
ReadyCheck = Callable[[web.Application], Awaitable[tuple[bool, str]]]
READY_CHECKS: web.AppKey[dict[str, ReadyCheck]] = web.AppKey("ready_checks")
ACCESS_LOG = web.AppKey("access_log", bool)
METRICS_TOKEN_ENV = "CUBE_PROXY_METRICS_TOKEN"  # noqa: S105 - the variable's name
#: The bearer token ``/metrics`` requires (None: public).
METRICS_TOKEN: web.AppKey[bytes | None] = web.AppKey("metrics_token")
_METRICS_TOKEN_MIN = 16

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{8,64}")
# Request ids need to be unique, not secret: a random per-process prefix and a counter
# (uuid4() per request was 2% of the proxy's CPU under load).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_for(incoming: str | None) -> str:
    """The client's ``X-Request-Id`` if it is a short token, else a fresh id."""
    return incoming if incoming and _REQUEST_ID_RE.fullmatch(incoming) else new_request_id()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = request_id_for(request.headers.get("X-Request-Id"))
    request[REQUEST_ID] = request_id
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and exc.empty_body is False and exc.content_type != "application/json":
            # aiohttp's own refusals (404, 405, 413) as JSON errors.
            response = json_error(
                exc.status, exc.reason, headers=_plain_headers(exc), ollama=_ollama_route(request)
            )
        else:
            raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception as exc:
        if is_unavailable(exc):
            status = 503
            log.error(  # noqa: TRY400 - the type only: an outage, not a bug to trace
                "database unavailable: %s", type(exc).__name__
            )
            response = database_unavailable(ollama=_ollama_route(request))
        else:
            log.exception(
                "unhandled error",
                extra={"fields": {"route": _route(request), "request_id": request_id}},
            )
            response = json_error(
                500, "internal error", code="internal_error", ollama=_ollama_route(request)
            )
    finally:
        if request.app.get(ACCESS_LOG, True):
            fields: dict[str, object] = {
                "method": request.method,
                "route": _route(request),
                "status": status,
                "ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": request_id,
            }
            extra = request.get(LOG_FIELDS)
            if extra:
                fields.update(extra)
            log_line(access_log, "request", fields)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def _ollama_route(request: web.Request) -> bool:
    """``/{domain}/api/...``: Ollama's API, whose clients read errors in Ollama's shape."""
    parts = request.path.split("/", 3)
    return len(parts) > 2 and parts[2] == "api"


def _plain_headers(exc: web.HTTPException) -> dict[str, str]:
    keep = ("Allow", "Retry-After")
    return {k: v for k, v in exc.headers.items() if k in keep}


async def health(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = request.app[READY_CHECKS]
    results: dict[str, dict[str, object]] = {}
    ok_all = True
    for name, check in checks.items():
        try:
            async with asyncio.timeout(5):
                ok, detail = await check(request.app)
        except Exception as exc:  # a check that fails is a failing check, not a 500
            ok, detail = False, f"check failed ({type(exc).__name__})"
        results[name] = {"ok": ok, "detail": detail}
        ok_all = ok_all and ok
    return web.json_response(
        {"status": "ready" if ok_all else "not ready", "checks": results},
        status=200 if ok_all else 503,
    )


def metrics_token(environ: Mapping[str, str]) -> bytes | None:
    """The ``/metrics`` token from ``CUBE_PROXY_METRICS_TOKEN`` (None if unset or empty).

    Raises:
        ValueError: it is too short to be a secret, or not printable ASCII (an HTTP header
            could not carry it); the message never quotes it.
    """
    token = environ.get(METRICS_TOKEN_ENV, "")
    if not token:
        return None
    printable = token.isascii() and token.isprintable() and " " not in token
    if len(token) < _METRICS_TOKEN_MIN or not printable:
        raise ValueError(
            f"{METRICS_TOKEN_ENV} must be at least {_METRICS_TOKEN_MIN} printable ASCII "
            "characters without spaces"
        )
    return token.encode()


def _metrics_allowed(request: web.Request) -> bool:
    expected = request.app.get(METRICS_TOKEN)
    if expected is None:
        return True
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # compare_digest on bytes: the time does not depend on where the bytes differ.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode("latin-1", "replace"), expected
    )


async def metrics(request: web.Request) -> web.Response:
    if not _metrics_allowed(request):
        return json_error(
            401,
            "/metrics needs 'Authorization: Bearer <metrics token>'",
            code="metrics_token_required",
            headers={"WWW-Authenticate": 'Bearer realm="cube-proxy metrics"'},
        )
    body = exposition(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(
    app: web.Application, *, access_log_enabled: bool = True, metrics_token: bytes | None = None
) -> None:
    """Routes and middleware; call before other modules add routes or middlewares."""
    app[ACCESS_LOG] = access_log_enabled
    app[METRICS_TOKEN] = metrics_token
    if READY_CHECKS not in app:
        app[READY_CHECKS] = {}
    app.middlewares.append(observe_middleware)
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_get("/ready", ready, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
