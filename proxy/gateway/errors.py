"""JSON errors in OpenAI's shape (Ollama's on ``/api/...``), and the exception handlers raise
to produce them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

__all__ = [
    "DATABASE_UNAVAILABLE",
    "ERROR_TYPES",
    "GatewayError",
    "database_unavailable",
    "error_document",
    "json_error",
]

ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


def _fallback_type(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_document(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    ollama: bool = False,
) -> dict[str, Any]:
    """``{"error": {"message", "type", "code"}}`` (OpenAI's shape), or on Ollama's routes
    ``{"error": "<message>", "code": ...}`` (Ollama's: its clients read ``error`` as text)."""
    if ollama:
        return {"error": message, "code": code}
    return {
        "error": {
            "message": message,
            "type": type_ or ERROR_TYPES.get(status) or _fallback_type(status),
            "code": code,
        }
    }


def json_error(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    ollama: bool = False,
) -> web.Response:
    """:func:`error_document` as a response with ``status``."""
    document = error_document(status, message, type_=type_, code=code, ollama=ollama)
    return web.json_response(document, status=status, headers=headers)


#: The answer while the proxy's database cannot be reached (requests it needs can be retried).
DATABASE_UNAVAILABLE: Final = (
    "the proxy's database is unavailable; retry shortly",
    "database_unavailable",
)


def database_unavailable(*, ollama: bool = False) -> web.Response:
    message, code = DATABASE_UNAVAILABLE
    return json_error(503, message, code=code, headers={"Retry-After": "1"}, ollama=ollama)


class GatewayError(Exception):
    """A refusal with a status and a message that is safe to show the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.headers = dict(headers or {})

    def response(self, *, ollama: bool = False) -> web.Response:
        """The JSON error (Ollama's shape on its routes)."""
        return json_error(
            self.status,
            self.message,
            type_=self.type,
            code=self.code,
            headers=self.headers,
            ollama=ollama,
        )
